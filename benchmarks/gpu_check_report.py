"""The table and JSON of gpu_check.sh: what one or several of its runs left in their output folders (a later folder's
part replaces an earlier one's), read into one record: the SAE throughputs against the plain loop and SAELens with
issue 25.3's targets, each pipeline's stage times, PPO step time and cache tokens/s, and the host-sync test.

    python benchmarks/gpu_check_report.py OUT [OUT ...] --json benchmarks/results/gpu_check.json \
        --md benchmarks/results/gpu_check.md
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from _common import median, ratio_median, table, write_json

PIPELINES = ("tiny", "quickstart")


def read_parts(folders: list[Path]) -> dict[str, dict]:
    """{part: {"exit", "seconds", "note"}} from each folder's parts.tsv (per line: name, exit code or `skipped`,
    seconds, note); a skipped part's exit is None."""
    parts = {}
    for folder in folders:
        path = folder / "parts.tsv"
        for line in path.read_text().splitlines() if path.is_file() else []:
            name, code, seconds, note = (line.split("\t") + [""])[:4]
            parts[name] = {"exit": None if code == "skipped" else int(code), "seconds": int(seconds), "note": note,
                           "folder": str(folder)}
    return parts


def latest(folders: list[Path], name: str) -> Path | None:
    """The last folder's file `name`, if any has it."""
    found = [f / name for f in folders if (f / name).is_file()]
    return found[-1] if found else None


def sae_rows(folders: list[Path]) -> list[dict]:
    """One row per (batch, d_in) from sae_throughput.py's JSON files (sae_b*.json): acts/s per library and irm's
    ratios (medians of per-repetition ratios, the repetitions having run interleaved) with the targets."""
    rows = []
    for path in sorted({p.name: p for f in folders for p in f.glob("sae_b*.json")}.values(),
                       key=lambda p: int(p.stem[5:])):
        record = json.loads(path.read_text())
        by_setting: dict[tuple[int, int], dict[str, list[float]]] = {}
        for r in record["results"]:
            by_setting.setdefault((r["batch"], r["d_in"]), {})[r["lib"]] = r["acts_per_s_reps"]
        for (batch, d_in), reps in by_setting.items():
            row = {"batch": batch, "d_in": d_in, "batches_per_item": record["settings"]["batches_per_item"],
                   "device": record["settings"]["device"], "gemm_gflops": record["gemm_gflops"],
                   "acts_per_s": {lib: median(v) for lib, v in reps.items()}}
            for peer in ("plain", "saelens"):
                if "irm" in reps and peer in reps:
                    row[f"irm_over_{peer}"] = ratio_median(reps["irm"], reps[peer])
            row["targets"] = {"irm >= plain loop": row["irm_over_plain"] >= 1.0 if "irm_over_plain" in row else None,
                              "irm ahead of SAELens": row["irm_over_saelens"] > 1.0 if "irm_over_saelens" in row
                              else None}
            rows.append(row)
    return rows


def pipeline(folders: list[Path], name: str, parts: dict[str, dict]) -> dict:
    part = parts.get(name)
    if part is None:
        return {"ran": False, "note": "not run"}
    rates = latest(folders, f"{name}_rates.json")
    out = {"ran": part["exit"] is not None, **part}
    if rates is not None:
        out.update(json.loads(rates.read_text()))
    return out


def collect(folders: list[Path]) -> dict:
    parts = read_parts(folders)
    env = latest(folders, "env.json")
    return {"env": json.loads(env.read_text()) if env else {}, "parts": parts, "sae": sae_rows(folders),
            "pipelines": {name: pipeline(folders, name, parts) for name in PIPELINES},
            "sync_test": parts.get("sync")}


def fmt(v, digits: int = 2) -> str:
    return "-" if v is None else f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def short(note: str | None, width: int = 70) -> str:
    """A part's note in a table cell: its first `width` characters (the whole note is in the JSON)."""
    note = (note or "-").strip()
    return note if len(note) <= width else note[:width - 3] + "..."


def markdown(record: dict) -> str:
    env = record["env"]
    lines = [f"# GPU check ({env.get('date', '?')})", "",
             f"Device: {env.get('device', '?')}; torch {env.get('torch', '?')}, lightning {env.get('lightning', '?')},"
             f" SAELens {env.get('sae_lens') or 'not importable'}."]
    if env.get("dry"):
        lines += ["", "**Dry run on the CPU at smoke sizes: the numbers below check the script, they are not "
                  "measurements.**"]
    sync = record["sync_test"]
    lines += ["", "## Host reads in the SAE step (tests/test_sae_sync.py)", "",
              "not run" if sync is None else f"exit {sync['exit']} ({sync['seconds']} s): {sync['note']}"]
    lines += ["", "## SAE training throughput (activations/s; ratios: medians of interleaved repetitions)", ""]
    if record["sae"]:
        libs = sorted({lib for r in record["sae"] for lib in r["acts_per_s"]}, key=["irm", "plain", "saelens"].index)
        lines.append(table(
            ["batch", "batches/item", "d_in", *(f"{lib} acts/s" for lib in libs), "irm / plain", "irm / SAELens",
             "targets met"],
            [[r["batch"], r["batches_per_item"], r["d_in"], *(round(r["acts_per_s"][lib]) for lib in libs),
              fmt(r.get("irm_over_plain")), fmt(r.get("irm_over_saelens")),
              ", ".join(f"{k}: {'yes' if v else 'no'}" for k, v in r["targets"].items() if v is not None) or "-"]
             for r in record["sae"]]))
        rates = ", ".join(f"{r['gemm_gflops']:.0f}" for r in record["sae"])
        lines.append(f"\nfp32 GEMM rate measured in the same runs: {rates} GFLOP/s")
    else:
        lines.append("not run")
    lines += ["", "## Pipelines in bf16", ""]
    rows = []
    for name, p in record["pipelines"].items():
        rows.append([name, "no" if not p["ran"] else f"exit {p['exit']}", p.get("seconds", "-"),
                     fmt(p.get("ppo_train_seconds_per_step")), fmt(p.get("ppo_seconds_per_step")),
                     fmt(p.get("cache_tokens_per_second"), 0), short(p.get("note"))])
    lines.append(table(["config", "ran", "wall s", "PPO s/step (train)", "PPO s/step (stage)", "cache tokens/s",
                        "note"], rows))
    for name, p in record["pipelines"].items():
        if p.get("stage_seconds"):
            lines += ["", f"{name}, seconds per stage: " + ", ".join(f"{k} {v:.1f}" for k, v in
                                                                     p["stage_seconds"].items())]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folders", type=Path, nargs="+", help="gpu_check.sh output folders, oldest first")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--md", type=Path, default=None)
    args = p.parse_args(argv)
    record = collect(args.folders)
    text = markdown(record)
    write_json(args.json, record)
    if args.md is not None:
        args.md.write_text(text)
    print(text)
    return record


if __name__ == "__main__":
    main()
