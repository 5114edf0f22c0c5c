"""Small runtime conventions shared by the stages: device choice, seeding, progress bars, resuming a training run."""

from __future__ import annotations

import random
import shutil
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional

from irm.errors import UserError


def resolve_device(name: str = "auto"):
    """`auto` -> cuda when available, else cpu; `cpu`, `cuda`, `cuda:N` as given (refused if absent)."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {name!r} requested but no CUDA GPU is visible; use device: cpu or auto")
    return dev


def seed_all(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def start(seed: int, device: str = "auto", ranks=None):
    """A stage's start-up, the same for every stage (`run`, or a worker of `irm.parallel.launch`):
    `device = start(cfg.seed, cfg.device)` (`start(cfg.seed, ranks=ranks)` in a worker). Every RNG is seeded with
    `seed` (a stage draws the same whatever ran before it in the process) and the device it computes on is returned:
    `ranks.device` in a worker, else `device` resolved. The seed is passed, not the config, so a stage's source shows
    that it reads `cfg.seed` (tests/test_stages.py). Threads (`cfg.threads`), the run-directory lock and the "already
    done?" check are the CLI's, once per process (`irm.cli.run_stage`)."""
    seed_all(seed)
    if ranks is not None and ranks.device is not None:
        return ranks.device
    return resolve_device(device)


def progress(iterable: Optional[Iterable] = None, *, desc: str, total: Optional[int] = None, unit: str = "it",
             disable: bool = False):
    """A tqdm bar on stderr (the one transformers and Lightning use)."""
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total, unit=unit, dynamic_ncols=True, mininterval=1.0, disable=disable)


def one_blas_thread():
    """A context in which numpy's and scipy's BLAS/LAPACK run on one thread (threadpoolctl): for loops of many small
    solves and products (the control's bootstrap and nulls, the calibration worlds), where OpenBLAS's threads cost
    more in start-up and spinning than they gain. Measured on 2 cores, one bootstrap refit of the quickstart's size
    (760 distinct rows, 2,400 predicted items): 52 ms with OpenBLAS's 2 threads, 20 ms with one."""
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=1, user_api="blas")


def worker_threads() -> int:
    """How many threads a loop of independent numpy/LAPACK work may run on: torch's CPU thread count, which the
    run's `threads` sets (one per core by default)."""
    import torch

    return max(1, torch.get_num_threads())


def thread_map(fn: Callable, items: Iterable, workers: Optional[int] = None) -> Iterator:
    """`map(fn, items)` on `workers` threads (default `worker_threads()`), results in order; in this thread when
    one. For work that releases the GIL (numpy, LAPACK) and whose result does not depend on the order it runs in."""
    workers = worker_threads() if workers is None else workers
    if workers <= 1:
        yield from map(fn, items)
        return
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(workers) as pool:
        yield from pool.map(fn, items)


def set_threads(threads: Optional[int]) -> None:
    """`threads: N` caps torch's CPU thread pool (None leaves torch's default, one per core). Several busy processes
    on a few cores run far slower with a pool each the size of the machine (oversubscription)."""
    if threads is None:
        return
    import torch

    torch.set_num_threads(threads)


def resume_from(checkpoints: Path, stamp: Path, fingerprint: str) -> Optional[Path]:
    """The one resume rule of the Lightning stages (sae, regression): `checkpoints/last.ckpt` when `stamp` says the
    checkpoints were made under `fingerprint` (this config, these inputs). Otherwise None: the checkpoints folder,
    stale whatever it holds, is removed (never resumed) and `stamp` records `fingerprint` for the fit about to start."""
    from irm.artifacts import read_json, write_json

    last = Path(checkpoints) / "last.ckpt"
    if last.is_file() and Path(stamp).is_file() and read_json(stamp).get("fingerprint") == fingerprint:
        return last
    shutil.rmtree(checkpoints, ignore_errors=True)
    write_json(stamp, {"fingerprint": fingerprint})
    return None
