"""The report's model-diffing section and its part of summary.json (issue 27): what the crosscoder says RLHF added,
per layer, the tuned-specific latents with their words, explanations and feature pages, and its answer beside the
paper's instruments (delta_tau, the per-word moves of the planted words, MMCS). Reads diff.json, the diff stage's
explanations and the findings rows; writes nothing itself."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

SHOWN_LATENTS = 20  # tuned-specific latents listed with their words


def explained_counts(d: dict) -> Optional[dict | str]:
    """diff.json's `explanations` for summary.json: counts and mean detection accuracy, or why there are none."""
    e = d.get("explanations")
    if not e or "not_tested" in e:
        return (e or {}).get("not_tested")
    mean = (e.get("scores") or {}).get("mean") or {}
    return {k: e.get(k) for k in ("latents", "explained", "related", "backend", "model")} | {
        "mean_detection_accuracy": mean.get("accuracy")}


def explanation_lines(root: Path) -> list[dict]:
    """The tuned-specific latents' explanation lines (irm.diff.explain), [] when none were written."""
    from irm.artifacts import read_jsonl
    from irm.stages import artifact

    return read_jsonl(artifact(root, "diff_explanations"))


def _answer(row: Optional[dict], absent: str = "not measured") -> str:
    """A findings row as an answer: its number and verdict, why it was not tested, or `absent` without a row."""
    from irm.findings import NOT_TESTED

    if row is None:
        return absent
    if row["verdict"] == NOT_TESTED:
        return f"not tested: {row['detail']}"
    mde = row.get("minimal_detectable_effect")
    power = "" if mde is None else f" (detectable with 80% power: {mde:.3g}{' ' + row['effect_unit'] if row.get('effect_unit') else ''})"
    return f"{row['number']}: {row['verdict']}{power}"


def diff_section(doc, r) -> None:
    """Model diffing (beyond the paper): the crosscoder's classes per layer, the tuned-specific latents, and its
    answer next to the paper's (`r`: irm.report.tables.ReportInputs)."""
    from irm import findings

    doc.heading("Model diffing: what the crosscoder says RLHF added (beyond the paper)")
    if not r.tables["diff"]:
        doc.para("Not run (`python -m irm diff`).")
        return
    d = r.load("diff_summary")
    doc.para("One BatchTopK crosscoder per layer on the base and the tuned model's activations at the same tokens "
             "(Minder, Dumas et al. 2025). A latent is tuned-specific when its base decoder is at most a fifth of its "
             "tuned one and Latent Scaling confirms that the base activations do not hold it; latents that pass "
             "the norm rule only are artifacts of the sparsity penalty. The diff-SAE (an SAE on tuned - base "
             "activations) is the simpler baseline.")
    doc.add(r.tables["diff"])
    named = [(layer, j, words) for layer, r in d["layers"].items()
             for j, words in (r.get("tuned_specific_words") or {}).items()]
    if named:
        doc.table(["layer", "latent", "top words (share of its activation)"],
                  [[layer, j, ", ".join(f"{w} ({100 * s:.0f}%)" for w, s in words)]
                   for layer, j, words in named[:SHOWN_LATENTS]],
                  caption=f"The tuned-specific latents ({len(named)}; the first {SHOWN_LATENTS} shown), named by "
                          "the words carrying most of their activation over the cached tokens")
    explained_section(doc, d, explanation_lines(r.root))
    # The findings table's own rows (Holm-corrected across the table), so the two places read alike.
    rows = r.findings

    def row(key: str, claim: Optional[str] = None) -> Optional[dict]:
        return next((x for x in rows if x["calibration"] == key and claim in (None, x["claim"])), None)

    specific, enrich = row("diff_specific"), row("diff_enrichment")
    ablation = row("ablation_vs_random", findings.DIFF_ABLATION_CLAIM)
    delta, moved = row("delta_tau"), row("planted")
    mmcs = [x for x in rows if x["calibration"] == "mmcs"]
    questions = [
        ("crosscoder (this section)", "does the tuned model hold latents the base lacks?", specific),
        ("crosscoder", "are they about the reward's words?", enrich),
        ("crosscoder", "does ablating the tuned-specific latents' directions lower the reward?", ablation),
        ("delta_tau (paper's chain on both models)", "does the tuned model's implicit reward differ from the base's?",
         delta),
        ("per-word moves (planted words)", "did the planted words' implicit values move?", moved),
    ] + [("MMCS (two SAEs of the tuned model)", x["claim"], x) for x in mmcs]
    absent = {"per-word moves (planted words)": "no planted words in this reward"}
    doc.table(["instrument", "question", "answer"],
              [[who, what, _answer(row, absent.get(who, "not measured"))] for who, what, row in questions]
              + [["crosscoder, descriptive", "do latents leaning toward the tuned model fire more on the reward's "
                  "words?", lean_text(d)]],
              caption=agreement(specific, delta, moved))


def explained_section(doc, d: dict, lines: list[dict]) -> None:
    """The tuned-specific latents' explanations, labels and scores, then their feature pages."""
    e = d.get("explanations") or {}
    if "not_tested" in e or not lines:
        doc.para(f"Explanations of tuned-specific latents: {e.get('not_tested', 'not run')}.")
        return

    def score(ln: dict) -> str:
        s = ln.get("score") or {}
        return "" if s.get("accuracy") is None else f"{s['accuracy']:.2f}" + (" (at chance)" if s.get("at_chance")
                                                                                else "")

    label = {1: "yes", 0: "no", None: ""}
    doc.table(["layer", "latent", "explanation", "related to the reward?", "detection accuracy"],
              [[ln["layer"], ln["index"], ln.get("explanation") or ln.get("status", ""), label.get(ln.get("label"), ""),
                score(ln)] for ln in lines[:SHOWN_LATENTS]],
              caption=f"{e['explained']} tuned-specific latents explained by {e['backend']}/{e['model']}, "
                      f"{e['related']} labelled related to the reward ({e['latents'] - e['explained']} more beyond "
                      f"explain.max_features have a page only; the first {SHOWN_LATENTS} listed). The labels and "
                      "scores are the explain stage's, read the same way.")
    from irm.report.features import dashboard_section

    dashboard_section(doc, lines, heading="Tuned-specific latents: feature pages",
                      intro="Per tuned-specific latent, as for the SAE features above: its activation density over "
                            "the paired cache, its top-activating windows and one window from each lower quantile "
                            "bin (each token shaded by the latent's crosscoder code, which reads both models), the "
                            "histogram of its largest code per window, the tokens its tuned decoder direction "
                            "promotes and suppresses through the tuned model's unembedding, and its explanation, "
                            "label and scores.", where="; the lines in diff/explanations.jsonl")


def lean_text(d: dict) -> str:
    """diff.json's `lean` (irm.diff.enrichment.lean_test) as a description, with the harness's measured false-positive
    rate that keeps it out of the findings table (irm.calibration.DESCRIPTIVE)."""
    from irm.calibration import DESCRIPTIVE
    from irm.findings import read_certified

    t = d.get("lean")
    if not t or t.get("rho") is None:
        return "not measured"
    c = read_certified().get("diff_lean") or {}
    fp = c.get("false_positive_rate")
    rate = "" if fp is None else (f" In the harness's null worlds it gave a verdict (either direction) in "
                                  f"{100 * fp:.0f}% of {c.get('worlds')}, where a 5% test may in 5%:")
    return (f"Spearman rho {t['rho']:+.3f} over {t['latents']} latents, one-sided permutation p "
            f"{t['p_greater']:.4f}: a description, not a verdict.{rate} {DESCRIPTIVE['diff_lean']}")


def agreement(specific: dict, delta: Optional[dict], moved: Optional[dict]) -> str:
    """One sentence: do the crosscoder and the paper's base-vs-tuned instruments agree that something changed?"""
    from irm.findings import SUPPORTED, CONTRADICTED

    cc = specific["verdict"] == SUPPORTED
    paper = [r for r in (delta, moved) if r is not None]
    if not paper:
        return "The paper's base-vs-tuned instruments did not run: nothing to compare."
    changed = any(r["verdict"] in (SUPPORTED, CONTRADICTED) for r in paper)
    if cc == changed:
        return ("They agree: " + ("both find a change RLHF made." if cc else
                                  "neither finds a change distinguishable from its control."))
    return ("They disagree: " + ("the crosscoder finds latents only the tuned model holds, while the paper's "
                                 "instruments see no change in the implicit reward." if cc else
                                 "the paper's instruments see the implicit reward change, while the crosscoder finds "
                                 "no latent only the tuned model holds."))
