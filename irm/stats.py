"""Interval estimates shared by the stages that report a mean (reward evaluation, ablation)."""

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
