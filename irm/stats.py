"""Interval estimates shared by the stages that report a mean (reward evaluation, ablation)."""

from __future__ import annotations

import math

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
    half = float(stats.t.ppf(0.975, x.size - 1) * std / math.sqrt(x.size))
    return {"mean": mean, "ci95": [mean - half, mean + half], "std": std, "n": int(x.size)}
