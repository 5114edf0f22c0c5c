"""The report's opening findings table (irm.findings: each claim, its number, its control, a verdict) and the
base-model control with its nulls (irm.stages.control)."""

from __future__ import annotations

from pathlib import Path

from irm.report.doc import Doc
from irm.report.plots import WIDE, draw_control, figure
from irm.report.summary import add_findings
from irm.report.text import ci, fmt, load, pval


def findings_section(doc: Doc, root: Path, summary: dict) -> None:
    """The findings table at the top of the report (irm.findings: each claim, its number, its control, a verdict
    from its interval or p-value) and the named numbers of the controls in summary.json: the paired reward
    difference under `reward`, tau_base, delta_tau with its interval, the permutation p-values and the
    raw-activation tau under `control`."""
    from irm.findings import build_findings

    rows = build_findings(root)
    add_findings(summary, root, rows)
    doc.heading("Findings")
    if rows:
        doc.table(["claim", "number", "control", "verdict", "false positives", "detail"],
                  [[r["claim"], r["number"], r["control"], _verdict_text(r), _fp_text(r), r["detail"]] for r in rows],
                  caption="Each claim of the paper as this run measured it. The verdict follows from the interval "
                          "or p-value at one convention (two-sided alpha 0.05: a 95% interval, or 2.5% in each "
                          "direction), Holm-corrected across the table's rows: supported when it excludes the "
                          "control in the claimed direction, contradicted when it excludes it in the other, else "
                          "not distinguishable, with the smallest effect this run could have detected with 80% "
                          "power; not tested when the stage ran but had nothing to measure (the detail says why). "
                          "False positives: the rate at which this verdict said supported or contradicted in "
                          "simulated worlds where the claim is false, in the worst of its null families: first the "
                          "full calibration harness (hundreds of worlds or more per family at its default sizes; "
                          "benchmarks/RESULTS.md section 10), then this run's calibrate stage (a few worlds at this "
                          "run's sizes, hence its wide interval).")
    else:
        doc.para("No claim could be checked: the stages that measure them have not run.")


def _verdict_text(r: dict) -> str:
    """The verdict, with the minimal detectable effect when not distinguishable (calibrate stage)."""
    mde = r.get("minimal_detectable_effect")
    if mde is None:
        return r["verdict"]
    unit = f" {r['effect_unit']}" if r.get("effect_unit") else ""
    return f"{r['verdict']} (detectable with 80% power: {mde:.3g}{unit}; from {r.get('mde_source')})"


def _fp_text(r: dict) -> str:
    """The certified rate of the full harness, then this run's calibrate stage's, each with its interval."""
    if r["verdict"] == "not tested":
        return "n/a"

    def rate(fp, ci, worlds=None):
        if fp is None:
            return "not calibrated"
        return (f"{100 * fp:.1f}%" + (f" [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]" if ci else "")
                + (f" over {worlds:,} worlds" if worlds else ""))

    certified = rate(r.get("certified_false_positive_rate"), r.get("certified_false_positive_ci95"),
                     r.get("certified_worlds"))
    own = rate(r.get("false_positive_rate"), r.get("false_positive_ci95"))
    return f"harness {certified}; this run's sizes {own}"


def control_section(doc: Doc, root: Path, plots: Path) -> None:
    """The base-model control and nulls (control.json, control_words.csv): taus of both chains, their permutation
    nulls and raw-activation fits, delta_tau, and the words that moved between the two reconstructed lexicons."""
    c = doc.section("Base-model control and nulls", load(root, "control"))
    if not c:
        return
    doc.para(f"The same triples, {c['n_words']} lexicon words and {c['n_contexts']} contexts through the same chain "
             f"on the tuned and on the base model, with {c['sae_choice']} (why: irm/stages/control.py). R is a closed-form "
             f"ridge refit for both; the permutation null refits it on targets whose signs were flipped for a random "
             f"half of the triples; the raw-activation R reads the MLP outputs the SAEs encode.")
    rows = []
    for label in ("tuned", "base"):
        m = c[label]
        perm = m["permutation"]["all"]
        rows.append([label, fmt(m["tau"]["all"]["tau"]), fmt(m["tau"]["heldout"]["tau"]),
                     ci({"ci95": perm.get("q95")}), pval(perm["p_greater"]),
                     fmt((m.get("raw_tau") or {}).get("all", {}).get("tau")),
                     fmt(c["sae_fit"]["nmse_at_sentiment_tokens"][label])])
    doc.table(["model", "tau (all)", "tau (held out)", "null tau, 95% range (sign-shuffled R)", "permutation p",
               "tau, R on raw activations", "SAE NMSE at sentiment tokens"], rows,
              caption=f"Kendall tau of R's output against the lexicon; permutation p over "
                      f"{c['tuned']['permutation']['all']['n']} refits (one-sided)")
    d, dh = c["delta_tau"]["all"], c["delta_tau"].get("heldout", {})
    doc.table(["words", "delta_tau = tau_tuned - tau_base", "paired bootstrap 95% CI", "n"],
              [["all", fmt(d["delta"]), ci(d), d["n"]]]
              + ([["held out", fmt(dh.get("delta")), ci(dh), dh.get("n")]] if dh else []),
              caption=d.get("method", ""))
    pw = c["per_word"]
    moved_rows = [r for r in pw.get("top", []) if r["moved"]]
    with doc.side_by_side():
        all_rows = load(root, "control_words")
        if all_rows:
            doc.image(figure(plots / "control.png", draw_control(c, all_rows), (WIDE, 3.8)),
                      "Left: each word's reconstructed value on the base model (x) and the tuned model (y), coloured "
                      "by its true lexicon value; circled: words that moved. Right: Kendall tau of R refit on "
                      "sign-shuffled targets (histograms) against the observed tau (solid) and R on raw "
                      "activations (dashed), per model.")
    doc.table(["word", "true", "base", "tuned", "move", "direction", "held out"],
              [[r["word"], r["true"], fmt(r["base"]), fmt(r["tuned"]), fmt(r["move"]), r["direction"],
                "yes" if r["heldout"] else ""] for r in moved_rows] or [["(none)", "", "", "", "", "", ""]],
              caption=f"Words that moved (|move - median| > {fmt(pw['threshold'])}, {pw['z']} robust SDs): "
                      f"{pw['n_moved_toward']} toward the training reward, {pw['n_moved_away']} away. Over all "
                      f"{pw['n_words']} words, {pw['n_toward']} moved toward and {pw['n_away']} away (sign test "
                      f"p {pval(pw.get('sign_test_p'))}).")
