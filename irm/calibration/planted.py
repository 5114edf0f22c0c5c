"""Calibration of the planted-reward test (issue 23, `irm.findings.planted_shift`): worlds of per-word implicit
values, base and tuned, over a sample of VADER's values, with a set of planted words whose training value has the
opposite sign. Null worlds: the tuned chain moves the planted words as it moves the others, including the moves that
would fool a naive "moved toward the planted value" count (every value shrinking toward 0, with the planted words
among VADER's strongest, as the shipped planted words are; a drift of the whole scale). Planted worlds: the planted
words' tuned values move toward their planted sign by `effect` (in units of the per-word move's standard deviation)."""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from irm.calibration.core import Family, Sizes

BASE_NOISE = 1.5  # sd of the base chain's implicit value around VADER's (its knowledge of sentiment is loose)
MOVE_NOISE = 1.0  # sd of a word's move tuned - base with nothing planted: the unit of `effect`
EFFECTS = (0.5, 1.0, 2.0)


@lru_cache(maxsize=1)
def _vader_values() -> np.ndarray:
    from irm.reward import vader_lexicon

    return np.array([v for v in vader_lexicon().values() if v != 0], dtype=np.float64)


def world(rng: np.random.Generator, sizes: Sizes, effect: float = 0.0, shrink: float = 1.0, drift: float = 0.0,
          strongest: bool = False) -> str:
    """One world judged by the real test: `sizes["words"]` words (control.max_words; default 800) of which
    `sizes["planted_words"]` (default 20) are planted, drawn at random or (`strongest`) among the 10% of largest
    |VADER value|; tuned = shrink * base + drift + noise, plus `effect` toward the planted sign on planted words."""
    from irm.findings import planted_row, planted_shift

    n, k = int(sizes.get("words", 800)), int(sizes.get("planted_words", 20))
    vader = rng.choice(_vader_values(), size=n)
    base = vader + rng.normal(0.0, BASE_NOISE, n)
    pool = np.argsort(-np.abs(vader))[: max(k, n // 10)] if strongest else np.arange(n)
    chosen = rng.choice(pool, size=k, replace=False)
    planted = np.full(n, np.nan)
    planted[chosen] = -3.0 * np.sign(vader[chosen])
    tuned = shrink * base + drift + rng.normal(0.0, MOVE_NOISE, n)
    tuned[chosen] += effect * np.sign(planted[chosen])
    seed = int(rng.integers(2**31))
    return planted_row(planted_shift(base, tuned, vader, planted, n_resamples=499, seed=seed), [])["verdict"]


UNIT = "planted words' extra move toward the planted sign, in sds of a word's move"
FAMILIES: list[Family] = [
    Family("planted", "no planted shift", 0.0, lambda rng, s: world(rng, s), UNIT),
    Family("planted", "every value shrinks toward 0, planted words among the strongest", 0.0,
           lambda rng, s: world(rng, s, shrink=0.6, strongest=True), UNIT),
    Family("planted", "the whole scale drifts", 0.0, lambda rng, s: world(rng, s, drift=0.8, shrink=1.2), UNIT),
    *(Family("planted", "planted words move toward the planted sign", e,
             lambda rng, s, e=e: world(rng, s, effect=e), UNIT) for e in EFFECTS),
]
