"""`python -m irm calibrate`: the calibration harness at this run's sizes (README "How far to trust a verdict").

Reads the sizes that set each finding's power from the run's artifacts (words, triples and contexts of the control;
paired prompts of evaluate-reward; layers and top k of divergence; validation's feature groups and inputs; ablation's
prompts, random draws and ablated features; MMCS's chance draws), runs every "fast" family of `irm.calibration`
(the main null family of each finding and its planted families) with `calibrate.worlds` worlds each, and writes
calibration.json: every family's verdict counts, false-positive rate or power with its Clopper-Pearson interval,
and per finding the largest false-positive rate over its null families and the minimal detectable effect at 80%
power, in the finding's own number where the worlds report it (delta_tau, tau, reward difference, top-k ratio).
The report's findings table reads it. The full harness, every family with hundreds of worlds at fixed sizes, is
`python benchmarks/calibration.py` (benchmarks/RESULTS.md).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from irm.config import RunConfig


def run_sizes(root: Path) -> dict:
    """The sizes of this run that the simulated worlds take, from its artifacts (absent ones keep the defaults)."""
    from irm.stages import read_artifact

    sizes: dict = {}
    c = read_artifact(root, "control", missing_ok=True) or {}
    for key, name in (("n_words", "words"), ("n_triples", "triples"), ("n_contexts", "contexts")):
        if c.get(key):
            sizes[name] = int(c[key])
    ev = read_artifact(root, "reward_eval", missing_ok=True) or {}
    n = ((ev.get("paired") or {}).get("n")) or ((ev.get("difference") or {}).get("n"))
    if n:
        sizes["prompts"] = int(n)
    div = read_artifact(root, "divergence", missing_ok=True) or {}
    if div.get("values") and div.get("top_k"):
        sizes["layers"], sizes["top_k"] = len(div["values"]), len(div["top_k"])
    # the feature-level findings (irm.calibration.features): validation's groups and inputs, ablation's prompts, draws
    # and ablated features, MMCS's chance draws (MMCS worlds stay at their fixed width: a full-width world costs more)
    val = read_artifact(root, "validation", missing_ok=True) or {}
    groups = (val.get("vs_other_explained") or {}).get("enrichment over base rate") or {}
    if groups.get("n_related") and groups.get("n_other") is not None:
        sizes["validation_related"] = int(groups["n_related"])
        sizes["validation_features"] = int(groups["n_related"]) + int(groups["n_other"])
    if val.get("n_inputs"):
        sizes["validation_inputs"] = int(val["n_inputs"])
    abl = read_artifact(root, "ablation", missing_ok=True) or {}
    for key, name in (("n_prompts", "ablation_prompts"), ("random_draws", "random_draws"),
                      ("n_features", "ablated_features")):
        if abl.get(key):
            sizes[name] = int(abl[key])
    mmcs = read_artifact(root, "mmcs", missing_ok=True) or {}
    draws = [len(((rec.get("chance") or {}).get("max") or {}).get("draws") or [])
             for rec in (mmcs.get("layers") or {}).values()]
    if draws and min(draws) > 1:
        sizes["chance_draws"] = min(draws)
    return sizes


def summarise(results: list[dict]) -> dict:
    """Per finding: the largest false-positive rate over its null families (with that family's interval and
    name) and the minimal detectable effect at 80% power (measured units where the worlds report a number)."""
    from irm.calibration.core import TARGET_POWER, minimal_detectable_effect

    out: dict = {}
    for finding in dict.fromkeys(r["finding"] for r in results):
        nulls = [r for r in results if r["finding"] == finding and r["null"]]
        worst = max(nulls, key=lambda r: (r["rate"], r["ci95"][1]), default=None)
        planted = [r for r in results if r["finding"] == finding and not r["null"]]
        measured = bool(planted) and all(r.get("measured_effect") is not None for r in planted)
        out[finding] = {
            "false_positive_rate": worst["rate"] if worst else None,
            "false_positive_ci95": worst["ci95"] if worst else None,
            "worst_null_family": worst["family"] if worst else None,
            "worlds": worst["n"] if worst else None,  # the worst null family's
            "minimal_detectable_effect": minimal_detectable_effect(results, finding, TARGET_POWER, measured),
            "effect_unit": planted[0]["unit"] if planted else None,
            "effect_measured": measured,  # the effect is the finding's own number in the planted worlds
            "power": TARGET_POWER,
        }
    return out


def calibrate(sizes: dict, worlds: int, seed: int, cost: Optional[str] = "fast", progress=None) -> dict:
    """Run the harness's families (of `cost`, all when None) at `sizes` and summarise."""
    from irm.calibration import families, run

    results = run(families(cost), worlds, sizes, seed, progress)
    return {"sizes": sizes, "worlds": worlds, "seed": seed, "families": results, "findings": summarise(results)}


def stage_sizes(cfg: RunConfig, measured: dict) -> dict:
    """The sizes the stage's worlds take: the run's (`run_sizes`) with the calibrate section's bootstrap and
    permutation counts, and its caps on words and triples."""
    cc = cfg.calibrate
    sizes = {**measured, "bootstrap": cc.bootstrap, "permutations": cc.permutations}
    caps = {"words": cc.max_words, "triples": cc.max_triples}
    sizes.update({k: min(sizes[k], cap) for k, cap in caps.items() if k in sizes})
    return sizes


def run(cfg: RunConfig) -> dict:
    from irm.artifacts import write_json
    from irm.stages import artifact, mark_done

    root = Path(cfg.run_dir)
    measured = run_sizes(root)
    out = {"run_sizes": measured, **calibrate(
        stage_sizes(cfg, measured), cfg.calibrate.worlds, cfg.seed,
        progress=lambda f: print(f"calibrate: {f.finding}: {f.name} (effect {f.effect:g})", flush=True))}
    path = artifact(root, "calibration")
    write_json(path, out)
    mark_done(cfg, "calibrate", [path])
    for finding, s in out["findings"].items():
        fp = s["false_positive_rate"]
        print(f"calibrate: {finding}: false positives {'n/a' if fp is None else f'{100 * fp:.1f}%'}, minimal "
              f"detectable effect {s['minimal_detectable_effect']}")
    return out
