"""The findings table's verdicts (README "What the numbers mean") and the p-value arithmetic they read: a 95% interval
or a p-value against the control's value, at one two-sided level ALPHA for the whole table; Holm's correction across
it."""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

SUPPORTED = "supported"
NOT_DISTINGUISHABLE = "not distinguishable from the control"
CONTRADICTED = "contradicted"
NOT_TESTED = "not tested"
VERDICTS = (SUPPORTED, NOT_DISTINGUISHABLE, CONTRADICTED, NOT_TESTED)
ALPHA = 0.05  # two-sided level of every verdict: 95% intervals, one-sided p-values against ALPHA / 2
Z_POWER = 1.959964 + 0.841621  # two-sided 5% plus 80% power, in standard errors


def interval_mde(ci: Optional[Sequence[float]]) -> Optional[float]:
    """The smallest effect a 95% interval of this width detects with 80% power (two-sided 5%): (z_0.975 + z_0.8)
    standard errors, the standard error read off the interval as its width over 2 x 1.96. None without an
    interval."""
    if not ci or any(v is None or not np.isfinite(v) for v in ci):
        return None
    return Z_POWER * (float(ci[1]) - float(ci[0])) / (2 * 1.959964)


def verdict_from_interval(ci: Optional[Sequence[float]], control: float = 0.0) -> str:
    """The verdict on "the effect is above `control`" from its 95% interval [lo, hi]. No interval (too few data)
    cannot tell the effect from the control."""
    if ci is None or any(v is None or not np.isfinite(v) for v in ci):
        return NOT_DISTINGUISHABLE
    lo, hi = float(ci[0]), float(ci[1])
    if lo > hi:
        raise ValueError(f"an interval runs from low to high, got [{lo}, {hi}]")
    if lo > control:
        return SUPPORTED
    if hi < control:
        return CONTRADICTED
    return NOT_DISTINGUISHABLE


def verdict_from_p(p_greater: Optional[float], p_less: Optional[float], alpha: float = ALPHA) -> str:
    """The verdict on "the effect is above the control" from the two one-sided p-values of a test (e.g. the upper and
    lower tail of a permutation null): supported when the upper one is below `alpha` / 2, contradicted when the
    lower one is, else not distinguishable (the table's one convention: two-sided level `alpha`)."""
    if p_greater is not None and p_greater < alpha / 2:
        return SUPPORTED
    if p_less is not None and p_less < alpha / 2:
        return CONTRADICTED
    return NOT_DISTINGUISHABLE


def two_sided(p_greater: Optional[float], p_less: Optional[float]) -> Optional[float]:
    """The two-sided p-value of two one-sided ones (twice the smaller, at most 1)."""
    ps = [p for p in (p_greater, p_less) if p is not None]
    return min(1.0, 2 * min(ps)) if ps else None


def holm(p_values: Sequence[Optional[float]]) -> list[Optional[float]]:
    """Holm's step-down adjustment of the p-values that are not None (scipy.stats.false_discovery_control has no Holm;
    statsmodels' multipletests would be a dependency for five lines)."""
    idx = [i for i, p in enumerate(p_values) if p is not None]
    m = len(idx)
    out: list[Optional[float]] = [None] * len(p_values)
    running = 0.0
    for rank, i in enumerate(sorted(idx, key=lambda j: p_values[j])):
        running = max(running, min(1.0, (m - rank) * float(p_values[i])))
        out[i] = running
    return out


def verdict_from_two_sided(p: Optional[float], effect: Optional[float], alpha: float = ALPHA) -> str:
    """The verdict on "the effect is above the control" from a two-sided p-value and the effect's sign (effect =
    estimate minus the control's value)."""
    if p is None or effect is None or not p < alpha or effect == 0:
        return NOT_DISTINGUISHABLE
    return SUPPORTED if effect > 0 else CONTRADICTED


def permutation_p(observed: float, null: Sequence[float], alternative: str = "greater") -> float:
    """Permutation p-value with the observed statistic counted among the null draws, (1 + #{null >= observed}) /
    (1 + n) for `greater` (`less`: <=), so it is never 0 and is exact under exchangeability. NaN draws (a refit whose
    statistic is undefined) are dropped."""
    null = np.asarray(null, dtype=np.float64)
    null = null[np.isfinite(null)]
    if alternative == "greater":
        hits = int((null >= observed).sum())
    elif alternative == "less":
        hits = int((null <= observed).sum())
    else:
        raise ValueError(f"alternative must be 'greater' or 'less', got {alternative!r}")
    return (1 + hits) / (1 + len(null))
