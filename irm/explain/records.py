"""Top-activating examples of SAE features (paper 4.4, after Bills et al. 2023): the activation cache cut into
fixed-length token windows, each window scored by a feature's largest activation in it, the best windows and a
sample from lower quantiles shown as token/activation records, scaled to integers 0-10 by the feature's maximum
over all its records (the authors' code scaled each example by its own maximum, which hides how weak it is).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from irm.runtime import progress

BATCH_ROWS = 8192  # cache rows per read: ~37 MB of float32 activations at width 1152
SCALE = 10  # discrete activations run 0..SCALE (Bills et al.)


@dataclass
class Windows:
    """Token windows over the cache: window i is cache rows [row[i], row[i] + length[i]), all of document doc[i],
    starting at token position start[i]. A window is the part of a document between two multiples of `window`."""

    row: np.ndarray
    length: np.ndarray
    doc: np.ndarray
    start: np.ndarray

    def __len__(self) -> int:
        return len(self.row)

    def rows(self, i: int) -> np.ndarray:
        return np.arange(self.row[i], self.row[i] + self.length[i])


def window_maxima(cache, encode: Callable[[torch.Tensor], torch.Tensor], window: int,
                  batch_rows: int = BATCH_ROWS, desc: str = "feature maxima") -> tuple[Windows, np.ndarray, np.ndarray]:
    """One pass over `cache`: for every window, the largest value of each column of `encode(acts_BD) -> codes_BF`
    (the features being explained, all dictionaries of a layer at once). Returns the windows, maxima_WF and
    active_F, the number of cache rows (tokens) where each column is above zero (its activation density's count)."""
    starts, docs, positions, chunks = [], [], [], []
    active_F = None
    prev_key = None  # (doc, window number) of the previous batch's last row: a window may straddle two batches
    offset = 0
    total = -(-cache.rows // batch_rows)
    for batch in progress(cache.iter_batches(batch_rows), desc=desc, total=total, unit="batch"):
        doc, pos = batch["doc_ids"].numpy(), batch["positions"].numpy()
        with torch.inference_mode():
            codes_BF = encode(batch["acts"]).float().cpu().numpy()
        fired = (codes_BF > 0).sum(axis=0)
        active_F = fired if active_F is None else active_F + fired
        part = pos // window
        new = np.ones(len(doc), dtype=bool)
        new[1:] = (doc[1:] != doc[:-1]) | (part[1:] != part[:-1])
        if prev_key is not None:
            new[0] = (int(doc[0]), int(part[0])) != prev_key
        first = np.flatnonzero(new)
        # Windows are contiguous rows, so a segment max does it; segment 0 is the carried-over window, if any.
        maxima = np.maximum.reduceat(codes_BF, np.union1d(0, first), axis=0)
        if not new[0]:
            chunks[-1][-1] = np.maximum(chunks[-1][-1], maxima[0])
            maxima = maxima[1:]
        if len(maxima):
            chunks.append(maxima)
        starts.append(first + offset)
        docs.append(doc[first])
        positions.append(pos[first])
        prev_key = (int(doc[-1]), int(part[-1]))
        offset += len(doc)
    row = np.concatenate(starts) if starts else np.zeros(0, dtype=np.int64)
    length = np.diff(np.append(row, offset))
    wins = Windows(row=row, length=length, doc=np.concatenate(docs) if docs else row.copy(),
                   start=np.concatenate(positions) if positions else row.copy())
    maxima_WF = np.concatenate(chunks) if chunks else np.zeros((0, 0), dtype=np.float32)
    return wins, maxima_WF, (active_F if active_F is not None else np.zeros(maxima_WF.shape[1], dtype=np.int64))


@dataclass
class Selection:
    """Windows chosen for one feature: shown to the explainer (top, then quantile samples) and, held out from
    those, activating and inactive windows for detection scoring."""

    top: list[int]
    quantile: list[int]
    active: list[int]
    inactive: list[int]
    # per quantile window: (lowest, highest window maximum of its bin, the bin's share of the activating windows)
    bins: list[tuple[float, float, float]] = field(default_factory=list)


def select_windows(maxima_W: np.ndarray, n_top: int, n_quantile: int, n_score: int,
                   rng: np.random.Generator) -> Selection:
    """Top `n_top` activating windows; one random window from each of `n_quantile` equal-count quantile bins of
    the remaining activating windows (strongest bin first); `n_score` other activating and `n_score` inactive
    (activation <= 0) windows at random for scoring."""
    order = np.argsort(-maxima_W, kind="stable")
    active = order[maxima_W[order] > 0]
    top = active[:n_top]
    rest = active[n_top:]
    bins = np.array_split(rest, min(n_quantile, len(rest))) if len(rest) and n_quantile > 0 else []
    quantile = [int(rng.choice(b)) for b in bins]
    spans = [(float(maxima_W[b].min()), float(maxima_W[b].max()), len(b) / len(active)) for b in bins]
    shown = set(top.tolist()) | set(quantile)
    held = np.array([w for w in rest.tolist() if w not in shown], dtype=np.int64)
    inactive = np.flatnonzero(maxima_W <= 0)
    pick = lambda pool: sorted(rng.choice(pool, size=min(n_score, len(pool)), replace=False).tolist())  # noqa: E731
    return Selection(top=top.tolist(), quantile=quantile, active=pick(held), inactive=pick(inactive), bins=spans)


def discretise(acts: list[np.ndarray], max_act: float) -> list[list[int]]:
    """Activations scaled to integers 0..10 by one maximum shared by all of a feature's records (rounded half up;
    negative values count as 0). A feature that never activates gives all zeros."""
    if max_act <= 0:
        return [[0] * len(a) for a in acts]
    return [np.clip(np.floor(SCALE * np.asarray(a, dtype=np.float64) / max_act + 0.5), 0, SCALE).astype(int).tolist()
            for a in acts]


def read_windows(cache, encode: Callable[[torch.Tensor], torch.Tensor], wins: Windows,
                 ids: list[int]) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Token ids and per-token codes_TF of the windows `ids`: one read of just their rows, encoded again (cheaper
    than keeping token-level codes of the whole cache)."""
    ids = sorted(set(ids))
    if not ids:
        return {}
    rows = np.concatenate([wins.rows(i) for i in ids])
    batch = cache.read_rows(torch.from_numpy(rows))
    with torch.inference_mode():
        codes = encode(batch["acts"]).float().cpu().numpy()
    token_ids = batch["token_ids"].numpy()
    out, at = {}, 0
    for i in ids:
        n = int(wins.length[i])
        out[i] = (token_ids[at:at + n], codes[at:at + n])
        at += n
    return out


def token_strings(tokenizer, ids) -> list[str]:
    """Each token's text in a window, decoded in order by the fast tokenizer's streaming decoder
    (`tokenizers.decoders.DecodeStream`): a character split over several byte-level tokens belongs whole to the token
    that completes it, the others show "" (decoding `[id]` alone would show each part as U+FFFD). A slow tokenizer
    falls back to one `decode([id])` per token."""
    backend = getattr(tokenizer, "_tokenizer", None)
    if backend is None:
        return [tokenizer.decode([int(i)]) for i in ids]
    from tokenizers.decoders import DecodeStream

    stream = DecodeStream(skip_special_tokens=False)
    return [stream.step(backend, int(i)) or "" for i in ids]


def feature_records(sel: Selection, column: int, wins: Windows, windows: dict, window_tokens) -> list[dict]:
    """The records shown for one feature (column `column` of the codes): tokens, raw and 0-10 activations; a
    quantile record also carries its bin (`bin`: lowest and highest window maximum, share of activating windows)."""
    shown = [(w, "top") for w in sel.top] + [(w, "quantile") for w in sel.quantile]
    bins = [None] * len(sel.top) + ([list(b) for b in sel.bins] if len(sel.bins) == len(sel.quantile)
                                     else [None] * len(sel.quantile))
    acts = [windows[w][1][:, column] for w, _ in shown]
    max_act = max((float(a.max()) for a in acts if len(a)), default=0.0)
    discrete = discretise(acts, max_act)
    return [
        {
            "kind": kind,
            "doc": int(wins.doc[w]),
            "start": int(wins.start[w]),
            "token_ids": windows[w][0].tolist(),
            "tokens": list(window_tokens(w)),
            "activations": [float(x) for x in a],
            "discrete": d,
            **({"bin": bins[i]} if bins[i] is not None else {}),
        }
        for i, ((w, kind), a, d) in enumerate(zip(shown, acts, discrete))
    ]



def token_gap(token_lists) -> str:
    """What goes between a feature's decoded tokens (an iterable of its records' token lists) to spell their text:
    nothing for tokenizers whose tokens carry their spaces (BPE: " great"), a space for word-level ones."""
    return "" if any(t[:1].isspace() for tokens in token_lists for t in tokens) else " "
