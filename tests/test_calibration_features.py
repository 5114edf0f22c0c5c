"""Calibration of the feature-level findings (issue 22; irm/calibration/features.py): in worlds where the claim is
false, today's MMCS chance, validation statistic and ablation interval hold the false-positive rate at or below 5%,
and the statistics they replaced (isotropic chance, raw frequencies compared by a plain difference, the two-level
bootstrap over prompts and draws) do not; the row functions the worlds call give the verdicts they should. Small
worlds and counts here (the default suite's budget, a few seconds); the full harness with 500+ worlds per null
family is the slow test at the end and benchmarks/calibration.py."""

import numpy as np
import pytest
import torch
from scipy.stats import binomtest, hypergeom, norm

import irm.enrichment
import irm.sae.comparison
import irm.stats
from irm.calibration import core, features
from irm.calibration.features import FAMILIES
from irm.findings import NOT_DISTINGUISHABLE, NOT_TESTED, SUPPORTED

torch.set_num_threads(1)
SMALL_MMCS = {"mmcs_width": 16, "mmcs_rows": 600, "chance_draws": 79}
SMALL_VALIDATION = {"validation_features": 40, "validation_related": 6, "validation_inputs": 1000,
                    "validation_permutations": 199}


def family(finding: str, name: str, effect: float = 0.0) -> core.Family:
    return next(f for f in FAMILIES if f.finding == finding and f.name == name and f.effect == effect)


def rate(fam: core.Family, n: int, sizes, seed: int = 1) -> tuple[int, dict]:
    r = core.run_family(fam, n, sizes, seed=seed)
    return round(r["rate"] * n), r


def at_most_5_percent(k: int, n: int) -> bool:
    """k false positives in n worlds are consistent with a rate of at most 5% (one-sided binomial test)."""
    return binomtest(k, n, 0.05, alternative="greater").pvalue > 0.05


# --- MMCS ------------------------------------------------------------------------------------------------------


def test_mmcs_chance_of_the_activations_holds_where_isotropic_chance_did_not(monkeypatch):
    fam = family("mmcs", "1/k spectrum and a mean, unrelated dictionaries")
    n = 100
    today, _ = rate(fam, n, SMALL_MMCS)
    old = irm.sae.comparison.chance_mmcs

    def isotropic(*args, moments=None, **kwargs):  # the replaced chance level: rows uniform on the sphere
        return old(*args, **kwargs)

    monkeypatch.setattr(irm.sae.comparison, "chance_mmcs", isotropic)
    before, _ = rate(fam, 40, SMALL_MMCS)
    print(f"MMCS, 1/k spectrum and a mean: {today}/{n} false positives today, {before}/40 with isotropic chance")
    assert at_most_5_percent(today, n) and before >= 36


def test_mmcs_sees_shared_features_where_the_dictionaries_follow_the_data():
    """Power: with 20% of the small dictionary copied into the large one (1/k spectrum, no mean, width 48) most
    worlds are supported (the MMCS's own standard error in the t costs power at small widths: 10 of 30 at width
    32, measured)."""
    k, _ = rate(family("mmcs", "shared features (1/k spectrum)", 0.2), 30, {**SMALL_MMCS, "mmcs_width": 48})
    assert k >= 20, k  # 147 of 150 measured at width 48, 99 draws


# --- validation ------------------------------------------------------------------------------------------------


def test_enrichment_z_is_the_normal_score_of_scipys_hypergeometric_mid_p():
    above, total = np.array([3, 0, 12, 5, 40]), np.array([4, 7, 20, 0, 40])
    z = irm.enrichment.enrichment_z(above, total, n_above=15, n_all=40)
    for i in range(4):
        if total[i] == 0:
            assert np.isnan(z[i])
            continue
        law = hypergeom(40, total[i], 15)
        assert z[i] == pytest.approx(norm.isf(law.sf(above[i]) + 0.5 * law.pmf(above[i])), rel=1e-10)
    assert np.isnan(z[4])  # fires on every input: no base rate to beat
    ratio = irm.enrichment.enrichment(above / 15, total / 40)
    assert ratio[0] == pytest.approx((3 / 15) / (4 / 40)) and np.isnan(ratio[3])


def test_validation_by_enrichment_holds_where_raw_frequencies_did_not(monkeypatch):
    fam = family("validation", "related features fire often everywhere")
    n = 100
    today, _ = rate(fam, n, SMALL_VALIDATION)

    def raw_frequencies(freqs, layers, related, other, seed=0, n_resamples=999):  # the replaced statistic
        return irm.enrichment.compare_groups(freqs.per_feature(layers, related), freqs.per_feature(layers, other),
                                           seed, n_resamples=n_resamples, welch=False)

    monkeypatch.setattr(irm.enrichment, "enrichment_comparison", raw_frequencies)
    before, _ = rate(fam, 30, SMALL_VALIDATION)
    print(f"validation, busy related features: {today}/{n} false positives today, {before}/30 by raw frequency")
    assert at_most_5_percent(today, n) and before >= 27


def test_circular_labels_are_not_a_finding(monkeypatch):
    """Offline lexicon labels: the row says "not tested" (and why); the same worlds judged as if the labels were an
    independent judgement are supported far more often than 5% (the related features include negative-word ones,
    which R > 3 never selects, so not always): the circle the row names."""
    from irm.explain.backends import OfflineBackend
    from irm.findings import validation_row

    assert irm.enrichment.circularity(["LLM judgement of the explanation"]) is None
    k, r = rate(family("validation", "circular labels (offline lexicon rule)"), 20, SMALL_VALIDATION)
    assert k == 0 and r["verdicts"] == {NOT_TESTED: 20}
    row = validation_row({"n_related": 3, "n_inputs": 100, "n_inputs_above": 10, "threshold": 3.0,
                          "circular": irm.enrichment.circularity([OfflineBackend.label_method]),
                          "vs_other_explained": {irm.enrichment.ENRICHMENT: {
                              "n_related": 3, "n_other": 9, "related_frequency": 2.0, "other_frequency": 0.1,
                              "related_enrichment": 3.0, "other_enrichment": 1.0, "p_value": 0.001,
                              "p_value_less": 0.999}}})
    assert row["verdict"] == NOT_TESTED and "circular" in row["detail"] and row["p_value"] is None
    assert "enrichment over base rate 3.00" in row["number"]
    # the same worlds judged as if the labels were an independent judgement: supported far above 5% of the time
    monkeypatch.setattr(irm.enrichment, "circularity", lambda methods: None)
    uncircled = sum(features.circular_world(np.random.default_rng(seed), {}) == SUPPORTED for seed in range(20))
    assert uncircled >= 5, uncircled  # 10 of 20 measured


# --- ablation --------------------------------------------------------------------------------------------------


def two_level_bootstrap(ablated_P, draws_DP, resamples=1000, seed=0):
    """The replaced interval: prompts and draws resampled independently (percentile)."""
    diff = np.asarray(ablated_P)[None, :] - np.asarray(draws_DP)
    n_d, n_p = diff.shape
    rng = np.random.default_rng(seed)
    cd = rng.multinomial(n_d, np.full(n_d, 1 / n_d), size=resamples)
    cp = rng.multinomial(n_p, np.full(n_p, 1 / n_p), size=resamples)
    stats = np.einsum("bd,dp,bp->b", cd, diff, cp) / (n_d * n_p)
    lo, hi = np.percentile(stats, [2.5, 97.5])
    return {"mean": float(diff.mean()), "ci95": [float(lo), float(hi)], "p_value": None, "n": n_p, "draws": n_d,
            "between_draw_std": None, "interval": "two-level bootstrap"}


def test_ablation_prediction_interval_holds_where_the_two_level_bootstrap_did_not(monkeypatch):
    fam = family("ablation_vs_random", "labelled set like a random draw")
    sizes = {"random_draws": 3}  # the quickstart's count before issue 22
    n = 300
    today, _ = rate(fam, n, sizes)
    monkeypatch.setattr(irm.stats, "difference_vs_draws", two_level_bootstrap)
    before, _ = rate(fam, n, sizes)
    print(f"ablation vs 3 random draws: {today}/{n} false positives today, {before}/{n} with the two-level bootstrap")
    assert at_most_5_percent(today, n) and binomtest(before, n, 0.05, alternative="greater").pvalue < 1e-3


def test_ablation_rows_one_sided_and_not_tested_without_a_spread():
    from irm.findings import ablation_row

    abl = {"n_features": 2, "n_prompts": 10, "random_draws": 1, "modes": {"error": {
        "ablated_minus_splice": {"mean": 0.3, "ci95": [0.1, 0.5], "p_value": 0.01, "interval": "paired t, 95%"},
        "ablated_minus_random": irm.stats.difference_vs_draws(np.zeros(10), np.ones((1, 10)))}}}
    rise = ablation_row(abl, "error", "ablated_minus_splice")
    assert rise["verdict"] == NOT_DISTINGUISHABLE and "reverse" in rise["detail"]
    assert rise["calibration"] == "ablation_vs_splice" and rise["p_value"] == 0.01
    one = ablation_row(abl, "error", "ablated_minus_random")
    assert one["verdict"] == NOT_TESTED and "random_draws >= 2" in one["detail"]
    assert one["calibration"] == "ablation_vs_random"
    assert ablation_row(abl, "reconstruction", "ablated_minus_splice") is None
    # A saturated reward (the planted run at 48 PPO steps: every completion at the clip, 10): the same reward under
    # every condition, a zero-width interval; "not tested" with the reason, never "not distinguishable" with a
    # minimal detectable effect of 0.
    flat = irm.stats.paired_difference(np.full(12, 10.0), np.full(12, 10.0))
    saturated = {"n_features": 2, "n_prompts": 12, "random_draws": 2, "modes": {"error": {
        "ablated_minus_splice": flat,
        "ablated_minus_random": irm.stats.difference_vs_draws(np.full(12, 10.0), np.full((2, 12), 10.0))}}}
    for key in ("ablated_minus_splice", "ablated_minus_random"):
        row = ablation_row(saturated, "error", key)
        assert row["verdict"] == NOT_TESTED and "no spread" in row["detail"], (key, row)


# --- the runner ------------------------------------------------------------------------------------------------


def test_runner_on_the_fast_families_of_this_group():
    """The harness's runner on every fast family of this module at small sizes and counts: the null families break
    no limit by more than chance allows, and the largest planted effects are found."""
    sizes = {**SMALL_MMCS, **SMALL_VALIDATION}
    fast = [f for f in FAMILIES if f.cost == "fast"]
    results = core.run(fast, lambda f: 100 if f.finding.startswith("ablation") else 40, sizes, seed=2)
    for r in results:
        if r["null"]:
            assert at_most_5_percent(round(r["rate"] * r["n"]), r["n"]), r
    strongest = {}
    for r in results:
        if not r["null"]:
            strongest[r["finding"]] = max(strongest.get(r["finding"], r), r, key=lambda x: x["effect"])
    assert {k: v["rate"] >= 0.5 for k, v in strongest.items()} == dict.fromkeys(
        ("mmcs", "validation", "ablation_vs_random", "ablation_vs_splice"), True), strongest


# Rows that share a strong mean (2x the activations' spread, along their top axis) are fitted less well by a Gaussian
# of the unit rows' moments as the width grows, and the fitted law's MMCS draws vary less than the real MMCS does
# (0.46x and 0.6x at width 48, measured): with the draws' spread alone, 500 worlds gave 11.8% [9.1, 15.0] (the whole
# mean) and 11.0% [8.4, 14.1] (half of it) false positives. The verdict adds the MMCS's own standard error.
MEAN_SHIFTED_ROWS = ("1/k spectrum and a mean, unrelated dictionaries",
                     "1/k spectrum and a mean, unrelated dictionaries, decoder bias half the mean")


def full_run(families):
    results = core.run(families, lambda f: 2000 if f.finding.startswith("ablation") else 500, {}, seed=0)
    for r in results:
        print(f"{r['finding']}: {r['family']}: {r['rate']:.3f} [{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}] "
              f"({r['n']} worlds, {r['seconds']:.0f} s)")
    return results


@pytest.mark.slow
def test_every_null_family_holds_5_percent_at_500_worlds_or_more():
    """The full check at the default sizes: every null family of this group at or below 5% false positives with the
    upper end of its 95% interval at or below 7% (core.failures), 500 worlds (2000 for the cheap ablation ones)."""
    assert core.failures(full_run([f for f in FAMILIES if f.null])) == []


@pytest.mark.slow
def test_without_the_mmcs_standard_error_rows_sharing_a_mean_break_the_limit(monkeypatch):
    """The harness can fail: with the chance draws' spread alone (the MMCS's standard error dropped from the t, as
    before), the mean-sharing families break the limit again."""
    import irm.findings.features

    chance_p = irm.findings.features.chance_p
    monkeypatch.setattr(irm.findings.features, "chance_p", lambda observed, draws, se=0.0: chance_p(observed, draws))
    results = core.run([f for f in FAMILIES if f.name in MEAN_SHIFTED_ROWS], lambda f: 300, {}, seed=0)
    assert {r["family"] for r in core.failures(results)} == set(MEAN_SHIFTED_ROWS)
