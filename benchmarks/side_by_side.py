"""Two commits' pipelines side by side on one machine (issue 25): each commit checked out in its own git worktree,
each stage of its own `configs/<config>.yaml` run as `python -m irm <stage>` in its own process and run directory,
the two commits' runs of a stage back to back (old first on even repetitions, new first on odd ones), so a drift in
the machine's speed lands on both. Prints per stage the wall seconds of each and the ratio new / old, and the
totals: a stage only one commit has (e.g. the newer calibrate or diff) counts in that commit's total only, so the
total ratio charges the newer work to the newer commit.

    python benchmarks/side_by_side.py --old 30b0573 --new HEAD --config quickstart --threads 2 \
        --json benchmarks/results/side_by_side_quickstart.json

Each side runs its own commit's code (the worktree first on PYTHONPATH) with the packages installed here, and its
own config of that name. Wall time includes process start and imports, as a user running the stages pays them.
"""

from __future__ import annotations

import _common  # noqa: F401, I001  (first: it sets TQDM_DISABLE, inherited by the child processes)

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import ROOT, base_parser, environment, median, parse_args, table, write_json


def worktree(commit: str, where: Path) -> Path:
    """`commit` checked out (detached) at `where`; its resolved hash is the folder's name."""
    sha = subprocess.run(["git", "-C", str(ROOT), "rev-parse", commit], check=True, capture_output=True,
                         text=True).stdout.strip()
    path = where / sha[:12]
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(path), sha], check=True,
                   capture_output=True)
    return path


def env_for(tree: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": f"{tree}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}


def stages_of(tree: Path) -> list[str]:
    """The pipeline's stages as that commit declares them, in order."""
    out = subprocess.run([sys.executable, "-c", "from irm.stages import STAGES; print(' '.join(s.name for s in STAGES))"],
                         cwd=tree, env=env_for(tree), check=True, capture_output=True, text=True).stdout
    return out.split()


def run_stage(tree: Path, stage: str, config: str, run_dir: Path, threads: int | None, log: Path) -> float:
    """Wall seconds of one stage of `tree`'s pipeline in its own process; a failed stage stops the benchmark."""
    cmd = [sys.executable, "-m", "irm", stage, "--config", f"configs/{config}.yaml", "--run_dir", str(run_dir),
           "--log_dir", str(run_dir.parent / "logs")] + ([] if threads is None else ["--threads", str(threads)])
    with open(log, "ab") as out:
        out.write(f"\n$ {' '.join(cmd)}\n".encode())
        out.flush()
        t0 = time.perf_counter()
        code = subprocess.run(cmd, cwd=tree, env=env_for(tree), stdout=out, stderr=subprocess.STDOUT).returncode
        seconds = time.perf_counter() - t0
    if code:
        sys.exit(f"{stage} failed in {tree} (exit {code}); its output is in {log}")
    return seconds


def compare(old: Path, new: Path, config: str, reps: int, threads: int | None, scratch: Path) -> dict:
    """Per stage and repetition, both sides' seconds (None for a stage a side does not have)."""
    order = {"old": stages_of(old), "new": stages_of(new)}
    names = order["new"] + [s for s in order["old"] if s not in order["new"]]
    seconds: dict[str, dict[str, list]] = {s: {"old": [], "new": []} for s in names}
    for rep in range(reps):
        sides = [("old", old), ("new", new)]
        if rep % 2:
            sides.reverse()
        run_dirs = {side: scratch / f"rep{rep}-{side}" / "run" for side, _ in sides}
        for stage in names:
            for side, tree in sides:
                if stage in order[side]:
                    t = run_stage(tree, stage, config, run_dirs[side], threads, scratch / f"{side}.log")
                    seconds[stage][side].append(t)
                    print(f"rep {rep} {stage:>18} {side}: {t:8.1f} s", flush=True)
    return {"stages": {s: {side: v for side, v in sides.items()} for s, sides in seconds.items()},
            "order": order}


def summarise(result: dict) -> tuple[list[list], dict]:
    rows, totals = [], {"old": 0.0, "new": 0.0}
    for stage, sides in result["stages"].items():
        med = {side: median(v) if v else None for side, v in sides.items()}
        for side, m in med.items():
            totals[side] += m or 0.0
        ratio = med["new"] / med["old"] if med["old"] and med["new"] else None
        rows.append([stage, "-" if med["old"] is None else med["old"], "-" if med["new"] is None else med["new"],
                     "-" if ratio is None else ratio])
    rows.append(["total", totals["old"], totals["new"], totals["new"] / totals["old"]])
    return rows, totals


def main(argv: list[str] | None = None) -> None:
    p = base_parser(__doc__.split("\n\n")[0])
    p.add_argument("--old", default="30b0573", help="the baseline commit (default: issue 25's 30b0573)")
    p.add_argument("--new", default="HEAD")
    p.add_argument("--config", default="quickstart", help="configs/<name>.yaml of each commit (tiny, quickstart)")
    p.add_argument("--reps", type=int, default=1, help="repetitions; medians per stage")
    p.add_argument("--keep", action="store_true", help="keep the worktrees and run directories")
    args = parse_args(p, argv)
    scratch = Path(tempfile.mkdtemp(prefix="irm-side-by-side-"))
    trees = {}
    try:
        trees = {side: worktree(getattr(args, side), scratch / "trees") for side in ("old", "new")}
        result = compare(trees["old"], trees["new"], args.config, 1 if args.quick else args.reps, args.threads,
                         scratch)
    finally:
        if not args.keep:
            for tree in trees.values():
                subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)],
                               capture_output=True)
    rows, totals = summarise(result)
    print(f"\n{args.config}: {args.old} (old) vs {args.new} (new), threads {args.threads}, "
          f"{1 if args.quick else args.reps} repetition(s); scratch {scratch}\n")
    print(table(["stage", "old s", "new s", "new / old"], rows))
    write_json(args.json, {"config": args.config, "old": args.old, "new": args.new, "threads": args.threads,
                           "trees": {k: v.name for k, v in trees.items()}, **result, "totals": totals,
                           "environment": environment()})


if __name__ == "__main__":
    main()
