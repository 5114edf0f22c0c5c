"""summary.json: the headline numbers of a run, machine-readable. The findings rows are the ones the report's
findings table shows (irm.findings.build_findings, read once)."""

from __future__ import annotations

from pathlib import Path

from irm.report.diffing import diff_summary
from irm.report.text import load


def build_summary(root: Path) -> dict:
    """summary.json before the findings: the headline numbers of each stage's artifact, as the artifacts hold them."""
    reward = load(root, "reward_eval") or {}
    kendall = load(root, "kendall") or {}
    mmcs = load(root, "mmcs") or {}
    ablation = load(root, "ablation") or {}
    validation = load(root, "validation") or {}
    return {
        "reward": {
            "base_mean": reward.get("base", {}).get("mean"),
            "tuned_mean": reward.get("tuned", {}).get("mean"),
            "base_ci95": reward.get("base", {}).get("ci95"),
            "tuned_ci95": reward.get("tuned", {}).get("ci95"),
        },
        "kendall": {
            k: {"tau": kendall.get(k, {}).get("tau"), "p": kendall.get(k, {}).get("p"),
                "ci95": kendall.get(k, {}).get("ci95"), "n": kendall.get(k, {}).get("n")}
            for k in ("all", "negative", "heldout")
        },
        "reference": kendall.get("reference"),  # what the true values are: the training reward's (irm.reward)
        "mmcs": {layer: {"max": v.get("max"), "hungarian": v.get("hungarian"), "max_firing": v.get("max_firing"),
                         "chance": {m: {k: c.get(k) for k in ("mean", "std")} for m, c in (v.get("chance") or {}).items()},
                         "init": v.get("init")}
                 for layer, v in mmcs.get("layers", {}).items()},
        "sae": {layer: {name: {k: m.get(k) for k in ("width", "l0", "l0_fraction", "explained_variance",
                                                     "explained_variance_after_first", "dead_fraction",
                                                     "dead_fraction_all_tokens", "ce_loss_recovered")}
                        for name, m in rec.items()}
                for layer, rec in ((load(root, "sae_metrics") or {}).get("layers") or {}).items()},
        "ablation": {
            "before": ablation.get("before", {}).get("mean"),
            "after": ablation.get("after", {}).get("mean"),
            "n_features": ablation.get("n_features"),
            "paired": {mode: {key: {k: conds[key].get(k) for k in ("mean", "ci95", "p_value", "between_draw_std")}
                              for key in ("ablated_minus_splice", "ablated_minus_random") if key in conds}
                       for mode, conds in ablation.get("modes", {}).items()},
        },
        "validation": {**{k: validation.get(k) for k in ("related_frequency", "average_frequency", "n_inputs_above")},
                       "vs_other_explained": {k: {f: v.get(f) for f in ("n_related", "n_other", "related_frequency",
                                                                         "other_frequency", "lift", "p_value")}
                                              for k, v in (validation.get("vs_other_explained") or {}).items()}},
        "explain": {k: (load(root, "explain_scores") or {}).get(k)
                    for k in ("backend", "model", "explanations", "n_scored", "n_unparsed", "n_retried")},
        **({"diff": diff} if (diff := diff_summary(root)) else {}),
    }


def add_findings(summary: dict, root: Path, rows: list[dict]) -> None:
    """The findings rows and the named numbers of the controls: the paired reward difference under `reward`,
    tau_base, delta_tau with its interval, the permutation p-values and the raw-activation tau under `control`."""
    from irm.findings import paired_reward

    summary["findings"] = rows
    paired = paired_reward(load(root, "reward_eval"))
    if paired:
        summary.setdefault("reward", {})["paired_difference_tuned_minus_base"] = paired
    c = load(root, "control")
    if c:
        def tau(label, key="tau", subset="all"):
            return (c.get(label, {}).get(key) or {}).get(subset, {}).get("tau")

        summary["control"] = {
            "sae_choice": c.get("sae_choice"),
            "tau_tuned": tau("tuned"), "tau_base": tau("base"),
            "tau_tuned_heldout": tau("tuned", subset="heldout"), "tau_base_heldout": tau("base", subset="heldout"),
            "delta_tau_tuned_minus_base": {k: c["delta_tau"]["all"].get(k) for k in ("delta", "ci95", "n")},
            "delta_tau_heldout": {k: c["delta_tau"].get("heldout", {}).get(k) for k in ("delta", "ci95", "n")},
            "permutation_p_tuned": c["tuned"]["permutation"]["all"]["p_greater"],
            "permutation_p_base": c["base"]["permutation"]["all"]["p_greater"],
            "permutation_p_tuned_heldout": c["tuned"]["permutation"].get("heldout", {}).get("p_greater"),
            "permutation_refits": c["tuned"]["permutation"]["all"]["n"],
            "raw_activation_tau_tuned": tau("tuned", "raw_tau"), "raw_activation_tau_base": tau("base", "raw_tau"),
            "words_moved_toward_reward": c.get("per_word", {}).get("n_moved_toward"),
            "words_moved_away_from_reward": c.get("per_word", {}).get("n_moved_away"),
            "sae_nmse_at_sentiment_tokens": c.get("sae_fit", {}).get("nmse_at_sentiment_tokens"),
        }
