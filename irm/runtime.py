"""Small runtime conventions shared by the stages: device choice, seeding, progress bars."""

from __future__ import annotations

import random
from typing import Iterable, Optional

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


def progress(iterable: Optional[Iterable] = None, *, desc: str, total: Optional[int] = None, unit: str = "it",
             disable: bool = False):
    """A tqdm bar on stderr (the one transformers and Lightning use)."""
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total, unit=unit, dynamic_ncols=True, mininterval=1.0, disable=disable)


def set_threads(threads: Optional[int]) -> None:
    """`threads: N` caps torch's CPU thread pool (None leaves torch's default, one per core). Several busy processes
    on a few cores run far slower with a pool each the size of the machine (oversubscription)."""
    if threads is None:
        return
    if threads < 1:
        raise UserError(f"threads must be >= 1 (or null for torch's default), not {threads}")
    import torch

    torch.set_num_threads(threads)
