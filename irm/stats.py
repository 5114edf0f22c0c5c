"""Interval estimates and tests shared by the stages that report a mean (reward evaluation, ablation)."""

from __future__ import annotations

import numpy as np


def mean_ci(values) -> dict:
    """Mean, two-sided 95% Student-t interval of the mean, sample standard deviation and n.
    `ci95` is None below two values; with zero spread the interval is the point."""
    from scipy import stats

    x = np.asarray(values, dtype=np.float64).ravel()
    mean = float(x.mean())
    if x.size < 2:
        return {"mean": mean, "ci95": None, "std": 0.0, "n": int(x.size)}
    std = float(x.std(ddof=1))
    if std == 0:
        return {"mean": mean, "ci95": [mean, mean], "std": 0.0, "n": int(x.size)}
    ci = stats.ttest_1samp(x, 0.0).confidence_interval(confidence_level=0.95)
    return {"mean": mean, "ci95": [float(ci.low), float(ci.high)], "std": std, "n": int(x.size)}


SIGN_FLIPS = 9999  # resamples of `sign_flip_p`: its smallest p is 1 / 10,000


def sign_flip_p(differences, n_resamples: int = SIGN_FLIPS, seed: int = 0) -> float:
    """Two-sided p-value of "the paired differences are centred on 0" by random sign flips: the observed |mean|
    against the |mean| of the differences with each sign flipped at random, the observed one counted among the
    draws, (1 + #{|flipped mean| >= |mean|}) / (1 + n_resamples). Exact, whatever the differences' law, under the
    null that each pair's two members are exchangeable (a paired difference is then symmetric about 0), so
    P(p <= a) <= a: a t-test on skewed, heavy-tailed rewards only approaches its level. Seeded: the same
    differences give the same p."""
    d = np.asarray(differences, dtype=np.float64).ravel()
    observed = abs(d.mean())
    rng = np.random.default_rng(seed)
    hits, done = 0, 0
    tol = 1e-12 * max(1.0, float(np.abs(d).max(initial=0.0)))  # a flip equal to the observed up to rounding counts
    while done < n_resamples:  # in blocks: n_resamples x len(d) signs at once would be large for long inputs
        m = min(2048, n_resamples - done)
        signs = rng.integers(0, 2, size=(m, d.size), dtype=np.int8).astype(np.float64) * 2.0 - 1.0
        hits += int((np.abs(signs @ d) / max(d.size, 1) >= observed - tol).sum())
        done += m
    return (1 + hits) / (1 + n_resamples)
