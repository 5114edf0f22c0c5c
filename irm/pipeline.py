"""`python -m irm pipeline`: every stage in order from one config, skipping stages whose config and inputs are
unchanged since they completed (irm.stages), so a rerun after a crash or an edit redoes only what is needed."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from irm.artifacts import write_json
from irm.config import RunConfig
from irm.stages import ORDER, artifact, is_done, run_stage


def _say(msg: str) -> None:
    print(msg, flush=True)


def run(cfg: RunConfig) -> dict[str, str]:
    """Run the pipeline; returns {stage: "ran" | "skipped"}."""
    root = Path(cfg.run_dir)
    _say(
        f"irm pipeline: {cfg.model.name} -> PPO against the {cfg.reward.kind} reward, then layer divergence, "
        f"activation cache, SAEs, feature explanations ({cfg.explain.backend}), the implicit reward model, lexicon "
        f"reconstruction, validation, ablation and a report.\n"
        f"  run directory: {root}   TensorBoard: tensorboard --logdir {cfg.log_dir}"
    )
    outcome: dict[str, str] = {}
    timings: dict[str, float] = {}
    start = time.perf_counter()
    n = len(ORDER)
    for i, stage in enumerate(ORDER, 1):
        if is_done(cfg, stage):
            outcome[stage] = "skipped"
            _say(f"[{i:>2}/{n}] {stage:<18} up to date, skipped")
            continue
        _say(f"[{i:>2}/{n}] {stage:<18} running ...")
        t0 = time.perf_counter()
        run_stage(cfg, stage)
        timings[stage] = time.perf_counter() - t0
        if not is_done(cfg, stage):
            raise RuntimeError(f"stage {stage} returned without recording its completion in {root}/manifest.json")
        outcome[stage] = "ran"
        _say(f"[{i:>2}/{n}] {stage:<18} done in {timings[stage]:.1f} s")
    total = time.perf_counter() - start
    write_json(root / "pipeline.json", {"outcome": outcome, "seconds": timings, "total_seconds": total})
    _say(f"irm pipeline: finished in {total:.0f} s. Report: {artifact(root, 'report_html')} (also report.md, summary.json)")
    summary = artifact(root, "summary")
    if summary.exists():
        s = json.loads(summary.read_text())
        kt = s.get("kendall", {}).get("all", {})
        if kt.get("tau") is not None and kt.get("p") is not None:
            # scipy's p underflows to exactly 0 for thousands of words: say how small it is, not "0"
            p_text = "p < 1e-300" if kt["p"] == 0 else f"p={kt['p']:.2g}"
            _say(f"  Kendall tau (reconstructed vs true lexicon, all words): {kt['tau']:.3f} ({p_text})")
    sys.stdout.flush()
    return outcome
