"""Mean max cosine similarity between two dictionaries (paper eq. 2), the maths alone: `mmcs` (the best match of
each row of the small dictionary in the large one, or a one-to-one Hungarian assignment) and the row helpers it is
built from. A library below the stages: the dictionaries stage (chance levels, shared pairs, the findings) and the SAE
module (MMCS of the two dictionaries at initialisation) both read it."""

from __future__ import annotations

from typing import NamedTuple

METHODS = ("max", "hungarian")
# Cosine entries held at once by the chunked `max` search (float64: 32 MiB). A 4096 x 8192 pair of dictionaries
# would need 256 MiB for the full matrix; the chunked search needs this much whatever the sizes.
CHUNK_ELEMENTS = 1 << 22
# Row norms at or below this are zero rows (no direction). Decoder rows of live features are O(1e-3) or larger.
ZERO_NORM = 1e-12


class Pair(NamedTuple):
    """A matched feature pair: `small` indexes the small dictionary, `large` the large one."""

    small: int
    large: int
    cosine: float


def as_float64(dictionary, device=None):
    import torch

    t = torch.as_tensor(dictionary)
    if t.ndim != 2:
        raise ValueError(f"a dictionary is a 2-D [features, width] matrix, got shape {tuple(t.shape)}")
    return t.to(device=device if device is not None else t.device, dtype=torch.float64)


def unit_rows(d_FW):
    """Rows scaled to unit norm; zero rows stay zero (so their cosine with anything is 0). Returns (unit, n_zero)."""
    norms_F = d_FW.norm(dim=-1, keepdim=True)
    zero_F = norms_F <= ZERO_NORM
    unit_FW = d_FW / norms_F.masked_fill(zero_F, 1.0)
    unit_FW.masked_fill_(zero_F, 0.0)
    return unit_FW, int(zero_F.sum())


def row_chunks(n_rows: int, n_cols: int, chunk_elements: int):
    step = max(1, chunk_elements // max(1, n_cols))
    for start in range(0, n_rows, step):
        yield start, min(n_rows, start + step)


def max_cosines(unit_small_NW, unit_large_MW, chunk_elements: int):
    """Per small row, its largest cosine with a large row and that row's index (unit rows in; chunked)."""
    import torch

    n, m = unit_small_NW.shape[0], unit_large_MW.shape[0]
    best_N = torch.empty(n, dtype=torch.float64, device=unit_small_NW.device)
    arg_N = torch.empty(n, dtype=torch.long, device=unit_small_NW.device)
    for lo, hi in row_chunks(n, m, chunk_elements):
        best_N[lo:hi], arg_N[lo:hi] = (unit_small_NW[lo:hi] @ unit_large_MW.T).max(dim=1)
    return best_N.clamp(-1.0, 1.0), arg_N


def _check(small, large, method: str):
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if small.shape[1] != large.shape[1]:
        raise ValueError(f"dictionaries of different widths: {small.shape[1]} vs {large.shape[1]}")
    if small.shape[0] == 0 or large.shape[0] == 0:
        raise ValueError("an empty dictionary has no MMCS")
    if method == "hungarian" and small.shape[0] > large.shape[0]:
        raise ValueError(
            f"hungarian matching needs the small dictionary first ({small.shape[0]} rows > {large.shape[0]})"
        )


def mmcs(small, large, method: str = "max", *, device=None,
         chunk_elements: int = CHUNK_ELEMENTS) -> tuple[float, list[Pair]]:
    """MMCS of dictionary `small` [n, width] against `large` [m, width] (torch tensors or numpy arrays).

    Returns (score, pairs): `pairs` has one `Pair` per matched small row (every row for `max`; all n rows for
    `hungarian`, which needs n <= m), sorted by cosine descending (ties: small index ascending); `score` is the
    mean of their cosines. The top-k shared features are `pairs[:k]`. Computed in float64 on `device` (default:
    where `small` lives). `max` holds at most `chunk_elements` cosines at once; `hungarian` needs the full n x m
    matrix (the assignment solver takes it whole).
    """
    import numpy as np
    import torch

    small_NW = as_float64(small, device)
    large_MW = as_float64(large, small_NW.device)
    _check(small_NW, large_MW, method)
    unit_small_NW, _ = unit_rows(small_NW)
    unit_large_MW, _ = unit_rows(large_MW)
    n, m = unit_small_NW.shape[0], unit_large_MW.shape[0]

    if method == "max":
        best_N, arg_N = max_cosines(unit_small_NW, unit_large_MW, chunk_elements)
        rows = np.arange(n)
        cols = arg_N.cpu().numpy()
        cos = best_N.cpu().numpy()
    else:
        from scipy.optimize import linear_sum_assignment

        # The cost 1 - cos is filled in place chunk by chunk: the n x m float64 matrix is the only full-size array
        # (`maximize=True` on cos would make scipy hold a negated copy as well).
        cost_NM = np.empty((n, m), dtype=np.float64)
        for lo, hi in row_chunks(n, m, chunk_elements):
            cost_NM[lo:hi] = (1.0 - unit_small_NW[lo:hi] @ unit_large_MW.T).cpu().numpy()
        rows, cols = linear_sum_assignment(cost_NM)
        cos = 1.0 - cost_NM[rows, cols]
    # Rounding can put a unit vector's cosine with itself a hair above 1.
    cos = np.clip(cos, -1.0, 1.0)
    order = np.lexsort((rows, -cos))
    pairs = [Pair(int(rows[i]), int(cols[i]), float(cos[i])) for i in order]
    return float(cos.mean()), pairs
