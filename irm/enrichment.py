"""Features' enrichment where R is high (paper 4.4, table 6): streaming activity counts, each feature's enrichment
over its base rate and its z-score, the comparison of labelled groups, and whether the labels make the test circular.
The validate-features stage, the findings table and the calibration harness use them."""

from __future__ import annotations

from typing import Optional

import numpy as np


N_PERMUTATIONS = 9999  # Monte Carlo label permutations; scipy enumerates every partition when there are fewer


class Frequencies:
    """Streaming counts of active features (code > 0), over all inputs and over those R selects."""

    def __init__(self, n_layers: int, width: int):
        self.active_all = np.zeros((n_layers, width), dtype=np.int64)
        self.active_above = np.zeros((n_layers, width), dtype=np.int64)
        self.n_all = 0
        self.n_above = 0

    def update(self, codes_NLF: np.ndarray, above_N: np.ndarray) -> None:
        active = codes_NLF > 0
        self.active_all += active.sum(axis=0)
        self.active_above += active[above_N].sum(axis=0)
        self.n_all += len(codes_NLF)
        self.n_above += int(above_N.sum())

    def summary(self, layers: list[int], related: dict[int, list[int]]) -> dict:
        """Mean activation frequency of the related features and of all features, among the selected inputs and
        (as a base rate) among all inputs; None where there is nothing to average."""

        def freq(active: np.ndarray, n: int, mask: Optional[np.ndarray] = None) -> Optional[float]:
            if n == 0 or (mask is not None and not mask.any()):
                return None
            per_feature = active / n
            return float(per_feature[mask].mean() if mask is not None else per_feature.mean())

        mask = np.zeros_like(self.active_all, dtype=bool)
        for li, layer in enumerate(layers):
            mask[li, related.get(layer, [])] = True
        per_layer = {}
        for li, layer in enumerate(layers):
            per_layer[str(layer)] = {
                "n_related": int(mask[li].sum()),
                "related_frequency": freq(self.active_above[li], self.n_above, mask[li]),
                "average_frequency": freq(self.active_above[li], self.n_above),
            }
        return {
            "related_frequency": freq(self.active_above, self.n_above, mask),
            "average_frequency": freq(self.active_above, self.n_above),
            "related_frequency_all_inputs": freq(self.active_all, self.n_all, mask),
            "average_frequency_all_inputs": freq(self.active_all, self.n_all),
            "per_layer": per_layer,
        }

    def enrichment(self, layers: list[int], features: dict[int, list[int]]) -> np.ndarray:
        """Each of `features`' P(active | R above) / P(active) (`enrichment`), NaN for one that never fires (and for
        every one when R selects no input)."""
        total = self.per_feature(layers, features, above=False)
        if self.n_above == 0:
            return np.full(total.shape, np.nan)
        return enrichment(self.per_feature(layers, features, above=True), total)

    def enrichment_z(self, layers: list[int], features: dict[int, list[int]]) -> np.ndarray:
        """Each of `features`' enrichment as a z-score (`enrichment_z`), NaN where it is undefined."""
        counts = [(self.active_above[li, i], self.active_all[li, i]) for li, layer in enumerate(layers)
                  for i in features.get(layer, [])]
        above, total = (np.array(c, dtype=np.float64).reshape(-1) for c in zip(*counts)) if counts else (
            np.zeros(0), np.zeros(0))
        return enrichment_z(above, total, self.n_above, self.n_all)

    def per_feature(self, layers: list[int], features: dict[int, list[int]], above: bool = True) -> np.ndarray:
        """Activation frequency of each of `features` (layer -> indices, in `layers` order), over the inputs R
        selects (`above`) or over all inputs; empty when there is no input to count."""
        active, n = (self.active_above, self.n_above) if above else (self.active_all, self.n_all)
        if n == 0:
            return np.zeros(0)
        return np.array([active[li, i] / n for li, layer in enumerate(layers) for i in features.get(layer, [])],
                        dtype=np.float64)


def enrichment(above_F: np.ndarray, all_F: np.ndarray) -> np.ndarray:
    """Per feature, its activation frequency among the inputs R selects over its frequency among all inputs: how
    much more often than its own base rate it fires where R is high (NaN where it never fires, or nothing was
    counted)."""
    above_F, all_F = np.asarray(above_F, dtype=np.float64), np.asarray(all_F, dtype=np.float64)
    out = np.full(above_F.shape, np.nan)
    np.divide(above_F, all_F, out=out, where=all_F > 0)
    return out


def enrichment_z(active_above_F: np.ndarray, active_all_F: np.ndarray, n_above: int, n_all: int) -> np.ndarray:
    """Per feature, its count of active inputs among those R selects as a z-score under "the feature ignores R":
    given that it fired on a of the n inputs, the count among the k selected ones is hypergeometric; the z-score is
    the normal quantile of its upper-tail mid-p (P(X > x) + P(X = x) / 2), about N(0, 1) whatever the base rate,
    also for a rare feature's few, lopsided counts, where (x - mean) / sd is skewed. Enrichment over the base rate on
    one scale for every base rate (a rare feature's raw ratio swings wildly, a busy one's hardly moves). NaN where it
    is undefined (a feature that never fires, or always does; no input selected, or every one)."""
    from scipy.special import ndtri_exp
    from scipy.stats import hypergeom

    a = np.asarray(active_all_F, dtype=np.int64)
    x = np.asarray(active_above_F, dtype=np.int64)
    out = np.full(a.shape, np.nan)
    defined = (a > 0) & (a < n_all) & (0 < n_above < n_all)
    if defined.any():
        law, xd = hypergeom(n_all, a[defined], n_above), x[defined]
        # In log space and from the smaller tail, so a count far out in either tail keeps a finite z-score.
        half_pmf = np.log(0.5) + law.logpmf(xd)
        log_upper = np.logaddexp(law.logsf(xd), half_pmf)  # P(X > x) + P(X = x) / 2
        log_lower = np.logaddexp(law.logcdf(xd - 1), half_pmf)  # P(X < x) + P(X = x) / 2
        out[defined] = np.where(log_upper < np.log(0.5), -ndtri_exp(log_upper), ndtri_exp(log_lower))
    return out


def _difference(a, b, axis=-1):
    return a.mean(axis=axis) - b.mean(axis=axis)


def welch_t(a, b, axis=-1):
    """Welch's t of mean(a) - mean(b) along `axis` (vectorised for scipy's permutation_test); a difference over a
    zero spread is +-inf, no difference 0."""
    diff = a.mean(axis=axis) - b.mean(axis=axis)
    se = np.sqrt(a.var(axis=axis, ddof=1) / a.shape[axis] + b.var(axis=axis, ddof=1) / b.shape[axis])
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(diff == 0, 0.0, diff / se)


def compare_groups(related_F: np.ndarray, other_F: np.ndarray, seed: int = 0,
                   what: str = "activation frequency", n_resamples: int = N_PERMUTATIONS, welch: bool = True) -> dict:
    """Related vs other explained features' values of `what` (one per feature; NaN ones, features that never fired,
    are left out and counted in `n_undefined`): means, lift (ratio of means), difference, and the one-sided
    label-permutation p-values (H1: related features score higher; `p_value_less`: lower) of Welch's t (`welch`;
    else the difference of means, for values on one scale whatever the feature) with scipy
    (exact enumeration when the partitions number at most `n_resamples`). With one feature in a group the
    partitions are enumerated on the difference of means. None where a group is empty. The keys keep the
    frequency names (`related_frequency`: the related group's mean of `what`) for the report's table."""
    from scipy.stats import permutation_test

    related_F, other_F = np.asarray(related_F, dtype=np.float64), np.asarray(other_F, dtype=np.float64)
    undefined = int((~np.isfinite(related_F)).sum() + (~np.isfinite(other_F)).sum())
    related_F, other_F = related_F[np.isfinite(related_F)], other_F[np.isfinite(other_F)]
    out = {"statistic": what, "n_related": int(len(related_F)), "n_other": int(len(other_F)),
           "n_undefined": undefined,
           "related_frequency": float(related_F.mean()) if len(related_F) else None,
           "other_frequency": float(other_F.mean()) if len(other_F) else None,
           "lift": None, "difference": None, "p_value": None, "p_value_less": None,
           "test": "label permutation among the explained features, one-sided (p_value: related higher; "
                   "p_value_less: lower), statistic = " + ("Welch's t of the two groups' means" if welch else
                                                          "difference of the groups' means")}
    if not len(related_F) or not len(other_F):
        return out
    out["difference"] = out["related_frequency"] - out["other_frequency"]
    if out["other_frequency"] > 0:
        out["lift"] = out["related_frequency"] / out["other_frequency"]
    if min(len(related_F), len(other_F)) >= 2:
        for key, alternative in (("p_value", "greater"), ("p_value_less", "less")):
            res = permutation_test((related_F, other_F), welch_t if welch else _difference,
                                   permutation_type="independent", alternative=alternative, vectorized=True,
                                   n_resamples=n_resamples,
                                   rng=np.random.default_rng(seed))
            out[key] = float(res.pvalue)
    else:
        # scipy wants two values per group (and Welch's t a spread in each); with one feature in a group the
        # partitions are just which value it is, so enumerate them on the difference of means (ties count as
        # extreme, as scipy counts them).
        out["test"] = out["test"].replace("Welch's t of the two groups' means", "difference of the groups' means")
        pool = np.concatenate([related_F, other_F])
        total = pool.sum()
        k, n = len(related_F), len(pool)
        if k == 1:
            diffs = pool - (total - pool) / (n - 1)
        else:
            diffs = (total - pool) / (n - 1) - pool
        tol = 1e-12 * max(1.0, abs(out["difference"]))
        out["p_value"] = float(np.mean(diffs >= out["difference"] - tol))
        out["p_value_less"] = float(np.mean(diffs <= out["difference"] + tol))
    return out


ENRICHMENT = "enrichment over base rate"  # the vs_other_explained entry that carries the verdict
WELCH_ON_Z = False  # z-scores share one scale: the plain difference (Welch's t let rare related features through)
ENRICHMENT_TEXT = ("per-feature enrichment over its base rate as a z-score (enrichment_z); related_enrichment and "
                   "other_enrichment: the groups' mean P(active | R > threshold) / P(active)")


def enrichment_comparison(freqs: Frequencies, layers: list[int], related: dict[int, list[int]],
                          other: dict[int, list[int]], seed: int = 0, n_resamples: int = N_PERMUTATIONS) -> dict:
    """The verdict's comparison: related vs other explained features by their enrichment z-scores
    (`compare_groups`), with each group's mean enrichment ratio beside it."""
    out = compare_groups(freqs.enrichment_z(layers, related), freqs.enrichment_z(layers, other), seed,
                         what=ENRICHMENT_TEXT, n_resamples=n_resamples, welch=WELCH_ON_Z)
    for key, group in (("related_enrichment", related), ("other_enrichment", other)):
        ratios = freqs.enrichment(layers, group)
        out[key] = float(np.nanmean(ratios)) if np.isfinite(ratios).any() else None
    return out


def circularity(methods: list[str]) -> Optional[str]:
    """Why validating R against these labels is circular (None when it is not): the offline rule labels by the
    reward lexicon's own tokens, the words R's targets score."""
    from irm.explain.backends import OfflineBackend

    if OfflineBackend.label_method in methods:
        return ("circular: the offline rule labels a feature related when reward-lexicon tokens carry most of its "
                "activation, and R's targets are that lexicon's values, so related features fire where R is high "
                "by construction; label with an LLM (explain.backend local or openai) for a test")
    return None
