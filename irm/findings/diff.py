"""The model-diffing claims (issue 27, beyond the paper; diff.json): the tuned model holds latents the base lacks,
they fire on the reward's words, and ablating their directions lowers the reward."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from irm.findings.features import ablation_row
from irm.findings.rows import Row, finding, load, not_tested, num, p_text, row_builder
from irm.findings.verdicts import NOT_DISTINGUISHABLE, SUPPORTED, two_sided, verdict_from_p

DIFF_SPECIFIC_CLAIM = ("the tuned model holds latents the base model lacks (crosscoder with Latent Scaling; model "
                       "diffing, beyond the paper)")


@row_builder
def diff_tuned_specific(root: Path) -> Optional[Row]:
    """Issue 27: how many crosscoder latents the diff stage called tuned-specific (diff.json), against the harness's
    null worlds, where none should be. A count rule, not a test: outside the Holm correction; its false-positive
    rate is the harness's."""
    d = load(root, "diff_summary")
    if not d:
        return None
    layers = d["layers"]
    n = sum(len(r["tuned_specific"]) for r in layers.values())
    live = sum(round(r["latents"] * (1 - r["fractions"]["dead"])) for r in layers.values())
    by_norm = sum(round(r["latents"] * r["fractions_by_norm"]["tuned-specific"]) for r in layers.values())
    per_layer = "; ".join(
        f"layer {layer}: {len(r['tuned_specific'])} specific, {100 * r['fractions']['shared']:.0f}% shared, "
        f"{100 * r['fractions']['tuned-only artifact']:.1f}% tuned-only artifacts, explained variance base "
        f"{num(r['quality']['base']['explained_variance'], 2)} tuned {num(r['quality']['tuned']['explained_variance'], 2)}"
        + (f", diff-SAE {num(r['diff_sae']['explained_variance'], 2)}" if r.get("diff_sae") else "")
        for layer, r in layers.items())
    return finding(
        claim=DIFF_SPECIFIC_CLAIM,
        number=f"{n} tuned-specific of {live} live latents ({by_norm} by decoder norms alone)",
        control="0 (the harness's null worlds: shared latents turned and rescaled by fine-tuning)",
        verdict=SUPPORTED if n else NOT_DISTINGUISHABLE,
        detail=f"{per_layer}. A count rule (at least one latent whose base decoder is at most 1/5 of its tuned one "
               "and that Latent Scaling confirms), outside the Holm correction",
        calibration="diff_specific")


@row_builder
def diff_latents_about_reward(root: Path) -> Optional[Row]:
    """Issue 27: do the tuned-specific latents fire on the reward's words (the planted words of a planted reward)
    more than the shared latents do (diff.json `enrichment`, irm.diff.enrichment)?"""
    d = load(root, "diff_summary")
    if not d or "enrichment" not in d:
        return None
    e, what = d["enrichment"], d["marked_words"]["what"]
    claim = f"the tuned-specific latents fire on the {what} more than shared latents do (model diffing)"
    if e["difference"] is None:
        return not_tested(claim, f"{e['tuned_specific']} tuned-specific and {e['shared']} shared latents: nothing "
                                  "to compare (see the row above)", calibration="diff_enrichment")
    return permutation_row(
        claim, e, f"share on the {what} {num(e['specific_share'])} vs {num(e['shared_share'])} "
                  f"(difference {num(e['difference'], signed=True)})",
        "the shared latents' share (labels permuted within each layer)",
        f"{e['tuned_specific']} tuned-specific and {e['shared']} shared latents; a latent's share is its code mass on "
        f"the tokens that spell one of the {d['marked_words']['n']} {what}", "diff_enrichment")


def permutation_row(claim: str, test: dict, number: str, control: str, detail: str, calibration: str) -> Row:
    """The row of a one-sided pair of permutation p-values (`test`: p_greater, p_less, permutations)."""
    p = two_sided(test["p_greater"], test["p_less"])
    return finding(claim=claim, number=number, control=control, verdict=verdict_from_p(test["p_greater"], test["p_less"]),
                   detail=f"{p_text(p)} ({test['permutations']} permutations); {detail}", calibration=calibration,
                   p_value=p)


DIFF_ABLATION_CLAIM = "ablating the tuned-specific latents' directions lowers the reward (model diffing)"


@row_builder
def diff_ablation_lowers_reward(root: Path) -> Optional[Row]:
    """Issue 27: the tuned-specific latents' directions ablated in the tuned model against as many shared latents
    matched on firing count (diff.json `ablation`, irm.diff.ablate), read by `ablation_row` as table 5's random
    control is."""
    d = load(root, "diff_summary")
    abl = (d or {}).get("ablation")
    if abl is None:
        return None
    if "not_tested" in abl:
        return not_tested(DIFF_ABLATION_CLAIM, abl["not_tested"], "ablation_vs_random")
    n = sum(len(ix) for ix in abl["latents"].values())
    return ablation_row({"modes": {"directional": {"ablated_minus_random": abl["ablated_minus_matched"]}},
                         "n_prompts": abl["n_prompts"], "n_features": n}, "directional", "ablated_minus_random",
                        claim=DIFF_ABLATION_CLAIM,
                        control=f"{len(abl['matched_sets'])} draws of {n} shared latents matched on firing count")
