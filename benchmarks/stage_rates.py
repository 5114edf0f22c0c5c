"""Seconds per PPO step and activation-cache tokens/s of a finished pipeline run, from its own records
(`pipeline.json`'s stage times, the rlhf stage's own seconds per train() step, the cache manifests' rows, the PPO
steps of the config: the run's resolved `config.yaml` unless one is given). Used by gpu_check.sh.

    python benchmarks/stage_rates.py RUN_DIR [CONFIG.yaml] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Optional

import yaml


def stage_rates(run_dir: Path, config: Optional[Path] = None) -> dict:
    seconds = json.loads((run_dir / "pipeline.json").read_text())["seconds"]
    steps = yaml.safe_load((config or run_dir / "config.yaml").read_text())["rlhf"]["steps"]
    manifests = sorted(run_dir.glob("cache/layer-*/manifest.json"))
    tokens = json.loads(manifests[0].read_text())["rows"] if manifests else 0  # every layer caches the same tokens
    run_manifest = run_dir / "manifest.json"  # the stages' records (irm.artifacts.RunDir)
    rlhf = (json.loads(run_manifest.read_text())["stages"].get("rlhf") or {}) if run_manifest.is_file() else {}
    return {"ppo_seconds_per_step": seconds["rlhf"] / steps, "ppo_steps": steps,
            # train() alone, model loading and saving left out (the stage records it)
            "ppo_train_seconds_per_step": rlhf.get("seconds_per_step"),
            "cache_tokens_per_second": tokens / seconds["cache"] if seconds.get("cache") else None,
            "cache_tokens": tokens, "cache_layers": len(manifests), "stage_seconds": seconds}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir", type=Path)
    p.add_argument("config", type=Path, nargs="?", default=None)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    r = stage_rates(args.run_dir, args.config)
    train = r["ppo_train_seconds_per_step"]
    print(f"PPO: {r['ppo_seconds_per_step']:.2f} s/step over {r['ppo_steps']} steps (stage time, model load included)"
          + (f", {train:.2f} s/step in train()" if train is not None else ""))
    rate = r["cache_tokens_per_second"]
    print(f"cache: {rate or 0:.0f} tokens/s ({r['cache_layers']} layers, {r['cache_tokens']} tokens)")
    print("per stage (s):", json.dumps(r["stage_seconds"]))
    if args.json:
        args.json.write_text(json.dumps(r, indent=2))


if __name__ == "__main__":
    main()
