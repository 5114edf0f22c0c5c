"""The report's opening findings table (irm.findings: each claim, its number, its control, a verdict) and the
base-model control with its nulls (irm.stages.control)."""

from __future__ import annotations

from irm.report.doc import Doc
from irm.report.plots import WIDE, draw_control, figure
from irm.report.tables import ReportInputs
from irm.report.text import fmt, pval


def findings_section(doc: Doc, r: ReportInputs) -> None:
    """The findings table at the top of the report (irm.findings: each claim, its number, its control, a verdict
    from its interval or p-value); summary.json carries the same rows."""
    rows = r.findings
    doc.heading("Findings")
    if rows:
        doc.table(["claim", "number", "control", "verdict", "false positives", "detail"],
                  [[row["claim"], row["number"], row["control"], _verdict_text(row), _fp_text(row), row["detail"]]
                   for row in rows],
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


def control_section(doc: Doc, r: ReportInputs) -> None:
    """The base-model control and nulls (control.json, control_words.csv): taus of both chains, their permutation
    nulls and raw-activation fits, delta_tau, and the words that moved between the two reconstructed lexicons."""
    tables = doc.section("Base-model control and nulls", r.tables["control"])
    if not tables:
        return
    c = r.load("control")
    doc.para(f"The same triples, {c['n_words']} lexicon words and {c['n_contexts']} contexts through the same chain "
             f"on the tuned and on the base model, with {c['sae_choice']} (why: irm/stages/control.py). R is a "
             f"closed-form ridge refit for both; the permutation null refits it on targets whose signs were flipped "
             f"for a random half of the triples; the raw-activation R reads the MLP outputs the SAEs encode.")
    doc.add(tables["models"])
    doc.add(tables["delta_tau"])
    pw = c["per_word"]
    moved_rows = [w for w in pw.get("top", []) if w["moved"]]
    with doc.side_by_side():
        all_rows = r.load("control_words")
        if all_rows:
            doc.image(figure(r.plots / "control.png", draw_control(c, all_rows), (WIDE, 3.8)),
                      "Left: each word's reconstructed value on the base model (x) and the tuned model (y), coloured "
                      "by its true lexicon value; circled: words that moved. Right: Kendall tau of R refit on "
                      "sign-shuffled targets (histograms) against the observed tau (solid) and R on raw "
                      "activations (dashed), per model.")
    doc.table(["word", "true", "base", "tuned", "move", "direction", "held out"],
              [[w["word"], w["true"], fmt(w["base"]), fmt(w["tuned"]), fmt(w["move"]), w["direction"],
                "yes" if w["heldout"] else ""] for w in moved_rows] or [["(none)", "", "", "", "", "", ""]],
              caption=f"Words that moved (|move - median| > {fmt(pw['threshold'])}, {pw['z']} robust SDs): "
                      f"{pw['n_moved_toward']} toward the training reward, {pw['n_moved_away']} away. Over all "
                      f"{pw['n_words']} words, {pw['n_toward']} moved toward and {pw['n_away']} away (sign test "
                      f"p {pval(pw.get('sign_test_p'))}).")
