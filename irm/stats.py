"""Interval estimates and tests shared by the stages that report a mean (reward evaluation, ablation, model diffing)
and by the calibration harness that judges their findings."""

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


def tuned_minus_base(tuned, base) -> dict:
    """tuned - base over the same prompts: mean, 95% t-interval and two-sided p-value of the paired t-test
    (scipy.stats.ttest_rel), a 95% BCa bootstrap interval of the mean difference (scipy.stats.bootstrap, 9,999
    resamples of the pairs, seeded), the two-sided p of the exact sign-flip test (`irm.stats.sign_flip_p`, the
    verdict's: a lexicon reward is a clipped, skewed sum, on which the t-test only approaches its level), and the
    number of pairs."""
    from scipy import stats

    tuned, base = np.asarray(tuned, dtype=np.float64), np.asarray(base, dtype=np.float64)
    diff = tuned - base
    if np.ptp(diff) == 0:  # one and the same difference everywhere: no spread to test (scipy would give nan)
        m = float(diff[0])
        return {"mean_diff": m, "ci": [m, m], "bootstrap_ci": [m, m], "p_value": 1.0 if m == 0 else 0.0,
                "p_signflip": 1.0 if m == 0 else sign_flip_p(diff), "n": len(diff)}
    test = stats.ttest_rel(tuned, base)
    ci = test.confidence_interval(0.95)
    boot = stats.bootstrap((diff,), np.mean, n_resamples=9999, confidence_level=0.95, method="BCa",
                           random_state=np.random.default_rng(0)).confidence_interval
    return {"mean_diff": float(diff.mean()), "ci": [float(ci.low), float(ci.high)],
            "bootstrap_ci": [float(boot.low), float(boot.high)], "p_value": float(test.pvalue),
            "p_signflip": sign_flip_p(diff), "n": len(diff)}


def paired_difference(ablated: np.ndarray, control: np.ndarray) -> dict:
    """Ablated minus a control on the same prompts: mean, paired t interval (95%), the paired t-test's two-sided p."""
    from scipy.stats import ttest_1samp

    diff = np.asarray(ablated, dtype=np.float64) - np.asarray(control, dtype=np.float64)
    out = {**mean_ci(diff), "interval": "paired t, 95%", "p_value": None}
    if diff.size >= 2 and diff.std() > 0:
        out["p_value"] = float(ttest_1samp(diff, 0.0).pvalue)
    return out


def difference_vs_draws(ablated_P: np.ndarray, draws_DP: np.ndarray) -> dict:
    """Ablated minus the random control, paired on prompts: per draw d the mean over prompts of
    ablated[p] - draw[d, p] (m_d), their mean, and a 95% t prediction interval over draws, mean(m) +- t(D-1) s_m
    sqrt(1 + 1/D): the labelled set compared with the distribution of random sets, its own place in that
    distribution counted (the 1) beside the uncertainty of the random sets' mean (the 1/D). `p_value` is the
    matching two-sided t test. With one draw there is no spread to compare with: no interval, and it says so."""
    from scipy import stats

    diff_DP = np.asarray(ablated_P, dtype=np.float64)[None, :] - np.asarray(draws_DP, dtype=np.float64)
    n_d, n_p = diff_DP.shape
    per_draw = diff_DP.mean(axis=1)
    out = {"mean": float(per_draw.mean()), "ci95": None, "p_value": None, "n": int(n_p), "draws": int(n_d),
           "per_draw_means": [float(x) for x in per_draw], "between_draw_std": None,
           "interval": "one random draw: no spread between draws to compare the labelled set with, no interval"}
    if n_d < 2:
        return out
    sd = float(per_draw.std(ddof=1))
    scale = sd * np.sqrt(1.0 + 1.0 / n_d)
    half = float(stats.t.ppf(0.975, n_d - 1) * scale)
    out.update(ci95=[out["mean"] - half, out["mean"] + half], between_draw_std=sd,
               interval=f"t prediction interval over {n_d} random draws (df {n_d - 1}), 95%")
    if scale > 0:
        out["p_value"] = float(2 * stats.t.sf(abs(out["mean"]) / scale, n_d - 1))
    return out
