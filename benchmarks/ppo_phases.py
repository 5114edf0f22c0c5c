"""Where a PPO step's time goes: `python -m irm rlhf` of a config (a fresh run directory, a few steps, no periodic
checkpoint) run in this process with a wall-clock timer around each of TRL's phases: the rollouts' generation, the
reference pass, the critic's passes (`get_reward` on the value model), the training forward (policy and critic
together) and backward, and the optimizer step. Seconds per step of each; the rest is TRL's bookkeeping.

    python benchmarks/ppo_phases.py --threads 2 --config quickstart --steps 4 --json ...
"""

from __future__ import annotations

import collections
import functools
import tempfile
import time

from _common import ROOT, base_parser, environment, parse_args, table, write_json


def timed(totals: collections.Counter, calls: collections.Counter, name: str, fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            totals[name] += time.perf_counter() - t0
            calls[name] += 1
    return wrapper


def main(argv: list[str] | None = None) -> None:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--config", default="quickstart", help="configs/<name>.yaml")
    p.add_argument("--steps", type=int, default=4)
    args = parse_args(p, argv)
    import accelerate
    import torch
    import trl.experimental.ppo.ppo_trainer as trl_ppo

    from irm.cli import parse_config
    from irm.rlhf.trainer import ResumablePPOTrainer
    from irm.stages.rlhf import run

    config, steps = ("tiny", 2) if args.quick else (args.config, args.steps)
    totals, calls = collections.Counter(), collections.Counter()
    # TRL's module-level `forward` serves the reference pass and (through the wrapper) each training forward
    trl_ppo.forward = timed(totals, calls, "forward (reference + training)", trl_ppo.forward)
    trl_ppo.PolicyAndValueWrapper.forward = timed(totals, calls, "training forward", trl_ppo.PolicyAndValueWrapper.forward)
    trl_ppo.get_reward = timed(totals, calls, "critic and reward passes", trl_ppo.get_reward)
    ResumablePPOTrainer._batch_generation = timed(totals, calls, "generation", ResumablePPOTrainer._batch_generation)
    accelerate.Accelerator.backward = timed(totals, calls, "backward", accelerate.Accelerator.backward)
    torch.optim.AdamW.step = timed(totals, calls, "optimizer step", torch.optim.AdamW.step)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = parse_config("rlhf", ["--config", str(ROOT / "configs" / f"{config}.yaml"), "--run_dir", f"{tmp}/run",
                                    "--log_dir", f"{tmp}/tb", "--rlhf.steps", str(steps),
                                    "--rlhf.checkpoint_every", "100000"])
        t0 = time.perf_counter()
        run(cfg)
        wall = time.perf_counter() - t0
    totals["reference pass"] = totals.pop("forward (reference + training)") - totals["training forward"]
    calls["reference pass"] = calls.pop("forward (reference + training)") - calls["training forward"]
    rows = [[name, calls[name], totals[name], totals[name] / steps] for name in
            ("generation", "reference pass", "critic and reward passes", "training forward", "backward",
             "optimizer step")]
    print(table(["phase", "calls", "seconds", "s / step"], rows))
    write_json(args.json, {"environment": environment(), "config": config, "steps": steps, "stage_seconds": wall,
                           "phases": {name: {"calls": c, "seconds": s} for name, c, s, _ in rows}})


if __name__ == "__main__":
    main()
