"""summary.json: the headline numbers of a run, machine-readable, built from the report's own table objects
(irm.report.tables) and findings rows, so the two cannot disagree. The explainer's bookkeeping (backend, counts) and
the diff stage's tests, which the report writes in prose, are read from their artifacts."""

from __future__ import annotations

from typing import Any, Optional

from irm.report.tables import SAE_NUMBERS, VS_OTHER, ReportInputs, Table


def _get(table: Optional[Table], row: Any, key: str) -> Any:
    return None if table is None else table.get(row, key)


def _values(table: Optional[Table], row: Any, keys: tuple[str, ...]) -> dict:
    return {k: _get(table, row, k) for k in keys}


def _rows(table: Optional[Table]) -> dict:
    return {} if table is None else table.rows


def build_summary(r: ReportInputs) -> dict:
    """The headline numbers of each table, then the findings rows and the named numbers of the controls."""
    t = r.tables
    reward, kendall, abl, val = t["reward"], t["kendall"], t["ablation"] or {}, t["validation"] or {}
    sae: dict = {}
    for (layer, name), row in _rows(t["sae"]).items():
        sae.setdefault(layer, {})[name] = {k: row.get(k) for k in SAE_NUMBERS}
    conditions = abl.get("conditions")
    summary = {
        "reward": {"base_mean": _get(reward, "base", "mean"), "tuned_mean": _get(reward, "tuned", "mean"),
                   "base_ci95": _get(reward, "base", "ci95"), "tuned_ci95": _get(reward, "tuned", "ci95")},
        "kendall": {k: _values(kendall, k, ("tau", "p", "ci95", "n")) for k in ("all", "negative", "heldout")},
        "reference": kendall.facts.get("reference") if kendall else None,  # the training reward's (irm.reward)
        "mmcs": {layer: {"max": v["max"], "hungarian": v["hungarian"], "max_firing": v["max_firing"],
                         "chance": {m: {k: c.get(k) for k in ("mean", "std")} for m, c in v["chance"].items()},
                         "init": v["init"]}
                 for layer, v in _rows(t["mmcs"]).items()},
        "sae": sae,
        "ablation": {
            "before": _get(conditions, "before", "mean"),
            "after": conditions.facts["after"] if conditions else None,
            "n_features": conditions.facts["n_features"] if conditions else None,
            "paired": {mode: {key: _values(abl["paired"], (mode, key), ("mean", "ci95", "p_value", "between_draw_std"))
                              for key in ("ablated_minus_splice", "ablated_minus_random")
                              if (mode, key) in abl["paired"].rows}
                       for mode in (conditions.facts["modes"] if conditions else ())},
        },
        "validation": {**{k: _get(val.get("quantities"), k, "value")
                          for k in ("related_frequency", "average_frequency", "n_inputs_above")},
                       "vs_other_explained": {k: _values(val["vs_other"], k, VS_OTHER)
                                              for k in _rows(val.get("vs_other"))}},
        "explain": {k: (r.load("explain_scores") or {}).get(k)
                    for k in ("backend", "model", "explanations", "n_scored", "n_unparsed", "n_retried")},
        **({"diff": diff} if (diff := _diff(r)) else {}),
    }
    _add_findings(summary, r)
    return summary


def _diff(r: ReportInputs) -> Optional[dict]:
    """`diff`: per layer the class counts and reconstruction quality (the report's diff table), and the stage's
    tests; None when the diff stage has not run."""
    from irm.report.diffing import explained_counts

    table = r.tables["diff"]
    if table is None:
        return None
    d = r.load("diff_summary")
    ablation = d.get("ablation") or {}
    keys = ("latents", "tuned_specific", "fractions", "fractions_by_norm", "explained_variance",
            "diff_sae_explained_variance")
    return {"layers": {layer: {k: row[k] for k in keys} for layer, row in table.rows.items()},
            "enrichment": d.get("enrichment"), "lean": d.get("lean"),
            "ablation": ablation.get("not_tested") or {k: ablation.get(k) for k in (
                "ablated_minus_matched", "ablated_minus_before", "n_prompts")},
            "marked_words": d.get("marked_words"),
            "explanations": explained_counts(d),
            "seconds": d.get("seconds")}


def _add_findings(summary: dict, r: ReportInputs) -> None:
    """The findings rows and the named numbers of the controls: the paired reward difference under `reward`,
    tau_base, delta_tau with its interval, the permutation p-values and the raw-activation tau under `control`."""
    from irm.findings import paired_reward

    summary["findings"] = r.findings
    paired = paired_reward(r.load("reward_eval"))
    if paired:
        summary.setdefault("reward", {})["paired_difference_tuned_minus_base"] = paired
    c = r.tables["control"]
    if c:
        models, delta = c["models"], c["delta_tau"]
        per_word = models.facts["per_word"]
        summary["control"] = {
            "sae_choice": models.facts["sae_choice"],
            "tau_tuned": models.get("tuned", "tau"), "tau_base": models.get("base", "tau"),
            "tau_tuned_heldout": models.get("tuned", "tau_heldout"),
            "tau_base_heldout": models.get("base", "tau_heldout"),
            "delta_tau_tuned_minus_base": delta.values("all", ("delta", "ci95", "n")),
            "delta_tau_heldout": delta.values("heldout", ("delta", "ci95", "n")),
            "permutation_p_tuned": models.get("tuned", "p"), "permutation_p_base": models.get("base", "p"),
            "permutation_p_tuned_heldout": models.get("tuned", "p_heldout"),
            "permutation_refits": models.facts["refits"],
            "raw_activation_tau_tuned": models.get("tuned", "raw_tau"),
            "raw_activation_tau_base": models.get("base", "raw_tau"),
            "words_moved_toward_reward": per_word.get("n_moved_toward"),
            "words_moved_away_from_reward": per_word.get("n_moved_away"),
            "sae_nmse_at_sentiment_tokens": models.facts["nmse"],
        }
