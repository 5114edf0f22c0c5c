"""What every benchmark script shares: the fp32 GEMM rate (the roofline the SAE numbers are read against), medians
of interleaved repetitions, the printed table and the JSON file. Scripts import it as `_common` (their own folder is
on sys.path when run as `python benchmarks/<script>.py`)."""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Sequence

# The peers' progress bars (SAELens, TRL, datasets) would interleave with the tables. tqdm reads TQDM_* variables
# when it is imported (torch imports it), so scripts import this module before torch.
os.environ.setdefault("TQDM_DISABLE", "1")
# Lightning's advice for short fits (fewer batches than log_every_n_steps, no validation data) would repeat for
# every repetition; the measurements are what these scripts print.
for message in (".*log_every_n_steps.*", ".*Total length of .* across ranks is zero.*", ".*LeafSpec.*"):
    warnings.filterwarnings("ignore", message=message)

ROOT = Path(__file__).resolve().parents[1]


def base_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--json", type=Path, default=None, help="write the measurements to this JSON file")
    p.add_argument("--quick", action="store_true", help="tiny sizes and one repetition (smoke test, not a measurement)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (default: torch's choice, one per core). On a machine other processes keep "
                        "busy, 1 avoids threads waiting on each other's time slices, which slows small steps tenfold")
    return p


def check_torchvision() -> None:
    """Exit with the fix when torchvision is installed but cannot load. `pip install -e ".[bench]"` pulls it in
    (dictionary-learning -> nnsight -> torchvision) as a CUDA build from PyPI, which fails against a CPU-only torch;
    Lightning (through torchmetrics) and SAELens (through transformers) then fail on import. Nothing here needs it."""
    import importlib.util

    if importlib.util.find_spec("torchvision") is None:
        return
    try:
        import torchvision  # noqa: F401
    except (ImportError, RuntimeError) as e:
        sys.exit(f"torchvision is installed but cannot load against this torch ({str(e).splitlines()[0]}); it came "
                 "with dictionary-learning's nnsight and none of irm, SAELens or dictionary_learning needs it to "
                 "train: run `pip uninstall -y torchvision`")


def apply_threads(threads: int | None) -> None:
    """--threads for this process (irm's own `threads` knob) and, through OMP_NUM_THREADS, the processes it starts."""
    if threads is None:
        return
    from irm.runtime import set_threads

    set_threads(threads)
    os.environ["OMP_NUM_THREADS"] = str(threads)


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Every benchmark's start: its arguments, then the torchvision check and --threads."""
    args = parser.parse_args(argv)
    check_torchvision()
    apply_threads(args.threads)
    return args


def quiet_lightning() -> None:
    """Lightning's banners (accelerator, tips, "max_steps reached") would repeat for every repetition. Call after
    importing lightning: its import sets its logger's level to INFO."""
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)


def gemm_gflops(n: int = 1024, repeats: int = 5) -> float:
    """Best-of-`repeats` fp32 rate of one n x n x n matrix product, in GFLOP/s (2 n^3 FLOPs)."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    out = torch.empty(n, n)
    torch.mm(a, b, out=out)  # first call allocates the BLAS workspace
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b, out=out)
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n**3 / best / 1e9


def warm_up_cpu(seconds: float = 2.0, n: int = 1024) -> None:
    """Run GEMMs for `seconds`: an idle CPU clocks down, and the first repetition would otherwise run slow."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        gemm_gflops(n, repeats=1)


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs))


def ratio_median(num: Sequence[float], den: Sequence[float]) -> float:
    """Median over repetitions of num[i] / den[i]: each repetition's pair ran back to back, so their ratio cancels
    most of the machine's drift, which a ratio of two medians would not."""
    return median([a / b for a, b in zip(num, den)])


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table (pastes into README/RESULTS.md as is); floats shown with 3 significant digits or as x.xx."""

    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.2f}" if abs(v) < 100 else f"{v:,.0f}"
        return str(v)

    cells = [[cell(v) for v in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    line = lambda vals: "| " + " | ".join(v.rjust(w) for v, w in zip(vals, widths)) + " |"  # noqa: E731
    sep = "|" + "|".join("-" * (w + 1) + ":" for w in widths) + "|"
    return "\n".join([line(headers), sep, *(line(r) for r in cells)])


def environment() -> dict[str, Any]:
    """What the numbers were measured on: they mean little without it."""
    import platform

    import torch

    return {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
            "python": platform.python_version(), "machine": platform.machine(),
            "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None}


def write_json(path: Path | None, record: dict) -> None:
    if path is None:
        return
    from irm.artifacts import write_json as write_atomically

    write_atomically(path, record)
    print(f"wrote {path}", file=sys.stderr)
