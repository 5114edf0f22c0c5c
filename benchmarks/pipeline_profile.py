"""Wall time and peak memory of every pipeline stage, each run as its own `python -m irm <stage> --config ...` process
(in pipeline order, in a fresh run directory), its peak resident memory read from the kernel when it exits
(`os.wait4`'s rusage). Process start and imports are included: that is what a user running a stage pays.

    python benchmarks/pipeline_profile.py --json benchmarks/results/pipeline_profile.json [--configs tiny quickstart]
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import ROOT, base_parser, environment, parse_args, table, write_json

CONFIGS = {"tiny": ROOT / "configs" / "tiny.yaml", "quickstart": ROOT / "configs" / "quickstart.yaml"}


def run_stage(stage: str, config: Path, run_dir: Path, log_dir: Path, log: Path) -> dict:
    """One stage in a child process: wall seconds, peak RSS (MiB) and exit code; its output goes to `log`."""
    cmd = [sys.executable, "-m", "irm", stage, "--config", str(config), "--run_dir", str(run_dir),
           "--log_dir", str(log_dir)]
    with open(log, "ab") as out:
        out.write(f"\n$ {' '.join(cmd)}\n".encode())
        out.flush()
        t0 = time.perf_counter()
        child = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=run_dir.parent)
        # wait4 rather than child.wait(): the rusage of exactly this child (and whatever it waited for).
        _, status, usage = os.wait4(child.pid, 0)
        seconds = time.perf_counter() - t0
    child.returncode = os.waitstatus_to_exitcode(status)
    # ru_maxrss is in KiB on Linux, in bytes on macOS.
    kib = usage.ru_maxrss / 1024 if sys.platform == "darwin" else usage.ru_maxrss
    return {"stage": stage, "seconds": seconds, "peak_rss_mib": kib / 1024, "returncode": child.returncode,
            "cpu_seconds": usage.ru_utime + usage.ru_stime}


def profile(name: str, config: Path, work: Path, stages: list[str]) -> dict:
    run_dir = work / name / "run"
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    log = work / name / "stages.log"
    rows = []
    for stage in stages:
        row = run_stage(stage, config, run_dir, work / name / "logs", log)
        rows.append(row)
        print(f"{name}: {stage:<18} {row['seconds']:7.1f} s  {row['peak_rss_mib']:7.0f} MiB  exit {row['returncode']}",
              file=sys.stderr)
        if row["returncode"] != 0:
            tail = log.read_text(errors="replace").splitlines()[-15:]
            print(f"{name}: {stage} failed; the stages after it need its outputs. Last lines of {log}:\n  "
                  + "\n  ".join(tail), file=sys.stderr)
            break
    return {"config": name, "path": str(config), "stages": rows, "total_seconds": sum(r["seconds"] for r in rows),
            "max_peak_rss_mib": max(r["peak_rss_mib"] for r in rows), "complete": len(rows) == len(stages)
            and all(r["returncode"] == 0 for r in rows)}


def main(argv: list[str] | None = None) -> dict:
    from irm.stages import ORDER

    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--configs", nargs="+", default=list(CONFIGS),
                   help=f"configs to profile: {', '.join(CONFIGS)} or paths to YAML files")
    p.add_argument("--until", choices=ORDER, default=ORDER[-1], help="last stage to run (default: all)")
    p.add_argument("--workdir", type=Path, default=None,
                   help="where run directories and stage logs go (default: a temporary folder, removed afterwards)")
    args = parse_args(p, argv)
    stages = ORDER[:ORDER.index(args.until) + 1]
    if args.quick:
        args.configs, stages = ["tiny"], ORDER[:1]

    with tempfile.TemporaryDirectory(prefix="irm-profile-") as tmp:
        work = args.workdir or Path(tmp)
        results = [profile(Path(c).stem if c not in CONFIGS else c, CONFIGS.get(c, Path(c)).resolve(), work, stages)
                   for c in args.configs]
    self_usage = resource.getrusage(resource.RUSAGE_SELF)
    record = {"configs": results, "settings": {"stages": stages, **environment(),
                                               "profiler_peak_rss_mib": self_usage.ru_maxrss / 1024}}
    write_json(args.json, record)
    print(report(results))
    if not all(r["complete"] for r in results):
        sys.exit(1)
    return record


def report(results: list[dict]) -> str:
    stages = [s["stage"] for s in max(results, key=lambda r: len(r["stages"]))["stages"]]
    headers = ["stage"] + [f"{r['config']} {what}" for r in results for what in ("s", "peak MiB")]
    by_config = [{s["stage"]: s for s in r["stages"]} for r in results]
    rows = []
    for stage in stages + ["total"]:
        row = [stage]
        for r, found in zip(results, by_config):
            if stage == "total":
                row += [f"{r['total_seconds']:.1f}", f"{r['max_peak_rss_mib']:.0f}"]
            elif stage in found:
                row += [f"{found[stage]['seconds']:.1f}", f"{found[stage]['peak_rss_mib']:.0f}"]
            else:
                row += ["-", "-"]
        rows.append(row)
    return table(headers, rows)


if __name__ == "__main__":
    main()
