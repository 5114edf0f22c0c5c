"""Seconds per PPO step of `python -m irm rlhf` against a bare TRL PPOTrainer script (bare_trl_ppo.py) with the same
model, prompts, reward, batch and lengths, each in its own process, interleaved. A step's time is train()'s wall
time over the steps run (irm records it in the run manifest as `seconds_per_step`; the bare script times its own
train() the same way), so process start, imports and model loading are left out of both, and irm's checkpoints
(every rlhf.checkpoint_every steps), clipping, TensorBoard scalars and progress bar are counted in.

irm freezes the garbage collector during train() (TRL runs gc.collect() every step); `--frozen-gc-baseline` adds a
third side, the bare script with the same freeze, so irm's additions can be read apart from that gain.

    python benchmarks/ppo_overhead.py --json benchmarks/results/ppo_overhead.json
"""

from __future__ import annotations

import _common  # noqa: F401, I001  (first: it sets TQDM_DISABLE, inherited by the child processes)

import json
import subprocess
import sys
import tempfile
from pathlib import Path

from _common import ROOT, base_parser, environment, median, parse_args, ratio_median, table, write_json

CONFIGS = {"tiny": ROOT / "configs" / "tiny.yaml", "smollm2": ROOT / "configs" / "quickstart.yaml"}
# PPO steps per run: the tiny config's own 8; SmolLM2 (about 12 s a step on 2 cores) 4, which keeps quickstart's
# one checkpoint per 4 steps.
STEPS = {"tiny": None, "smollm2": 4}


def _run(cmd: list[str], log: Path) -> None:
    with open(log, "ab") as out:
        out.write(f"\n$ {' '.join(cmd)}\n".encode())
        out.flush()
        done = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=log.parent)
    if done.returncode != 0:
        tail = "\n  ".join(log.read_text(errors="replace").splitlines()[-15:])
        raise SystemExit(f"{' '.join(cmd[:4])} ... failed (exit {done.returncode}); last lines of {log}:\n  {tail}")


def irm_step(config: Path, overrides: list[str], run_dir: Path, log: Path) -> float:
    from irm.artifacts import RunDir

    _run([sys.executable, "-m", "irm", "rlhf", "--config", str(config), "--run_dir", str(run_dir),
          "--log_dir", str(run_dir.parent / "logs"), *overrides], log)
    return float(RunDir(run_dir).stage_record("rlhf")["seconds_per_step"])


def bare_step(config: Path, overrides: list[str], run_dir: Path, log: Path, freeze_gc: bool = False) -> float:
    out = run_dir.parent / f"{run_dir.name}.json"
    _run([sys.executable, str(Path(__file__).with_name("bare_trl_ppo.py")), "--out", str(out), "--config",
          str(config), "--run_dir", str(run_dir), *(["--freeze-gc"] if freeze_gc else []), *overrides], log)
    result = json.loads(out.read_text())
    return result["seconds"] / result["steps"]


def measure(name: str, config: Path, steps: int | None, reps: int, work: Path, frozen_gc_baseline: bool,
            checkpoint_every: int | None = None) -> dict:
    overrides = ["--device", "cpu"] + (["--rlhf.steps", str(steps)] if steps else [])
    overrides += ["--rlhf.checkpoint_every", str(checkpoint_every)] if checkpoint_every else []
    log = work / f"{name}.log"
    work.mkdir(parents=True, exist_ok=True)
    sides = ["irm", "trl"] + (["trl_frozen_gc"] if frozen_gc_baseline else [])
    seconds: dict[str, list[float]] = {side: [] for side in sides}
    for rep in range(reps):
        for side in sides[rep % len(sides):] + sides[:rep % len(sides)]:
            run_dir = work / f"{name}-{side}-{rep}"  # fresh: irm skips a stage it has already completed
            if side == "irm":
                seconds[side].append(irm_step(config, overrides, run_dir, log))
            else:
                seconds[side].append(bare_step(config, overrides, run_dir, log, freeze_gc=side == "trl_frozen_gc"))
        print(f"{name} rep {rep + 1}/{reps}: " + ", ".join(f"{side} {seconds[side][-1]:.2f}" for side in sides)
              + " s/step", file=sys.stderr)
    from irm.cli import parse_config

    r = parse_config("rlhf", ["--config", str(config), *overrides]).rlhf
    return {"model": name, "config": str(config), "steps": r.steps, "batch_size": r.batch_size,
            "mini_batch_size": r.mini_batch_size, "ppo_epochs": r.ppo_epochs, "response_length": r.response_length,
            "checkpoint_every": r.checkpoint_every, "irm_s_per_step": median(seconds["irm"]),
            "trl_s_per_step": median(seconds["trl"]), "irm_over_trl": ratio_median(seconds["irm"], seconds["trl"]),
            **({"trl_frozen_gc_s_per_step": median(seconds["trl_frozen_gc"]),
                "irm_over_trl_frozen_gc": ratio_median(seconds["irm"], seconds["trl_frozen_gc"])}
               if frozen_gc_baseline else {}),
            "seconds": seconds}


def main(argv: list[str] | None = None) -> dict:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", choices=list(CONFIGS), default=list(CONFIGS))
    p.add_argument("--reps", type=int, default=3, help="interleaved repetitions (medians reported)")
    p.add_argument("--steps", type=int, default=None, help="PPO steps per run (default: per model)")
    p.add_argument("--frozen-gc-baseline", action="store_true",
                   help="also time the bare script with the garbage collector frozen, as irm runs TRL")
    p.add_argument("--checkpoint-every", type=int, default=None,
                   help="irm's rlhf.checkpoint_every (default: the config's); above --steps, irm writes no checkpoint")
    p.add_argument("--workdir", type=Path, default=None,
                   help="run directories and logs (default: a temporary folder, removed afterwards)")
    args = parse_args(p, argv)
    if args.quick:
        args.models, args.reps, args.steps = ["tiny"], 1, 2
    with tempfile.TemporaryDirectory(prefix="irm-ppo-bench-") as tmp:
        work = args.workdir or Path(tmp)
        results = [measure(m, CONFIGS[m], args.steps or STEPS[m], args.reps, work / m, args.frozen_gc_baseline,
                           args.checkpoint_every) for m in args.models]
    record = {"results": results, "settings": {"reps": args.reps, **environment()}}
    write_json(args.json, record)
    print(report(results))
    return record


def report(results: list[dict]) -> str:
    frozen = all("irm_over_trl_frozen_gc" in r for r in results)
    headers = ["model", "batch", "mini-batch", "epochs", "new tokens", "steps", "irm s/step", "TRL s/step",
               "irm / TRL"] + (["TRL frozen-gc s/step", "irm / TRL frozen-gc"] if frozen else [])
    rows = [[r["model"], r["batch_size"], r["mini_batch_size"], r["ppo_epochs"], r["response_length"], r["steps"],
             f"{r['irm_s_per_step']:.2f}", f"{r['trl_s_per_step']:.2f}", f"{r['irm_over_trl']:.3f}"]
            + ([f"{r['trl_frozen_gc_s_per_step']:.2f}", f"{r['irm_over_trl_frozen_gc']:.3f}"] if frozen else [])
            for r in results]
    return table(headers, rows)


if __name__ == "__main__":
    main()
