"""Findings table (irm.findings): every verdict branch follows from the interval or p-values it is given; the
permutation p-value is hand-worked; the claim rows read their artifacts (reward_eval.json, divergence.json,
control.json) and skip a claim whose artifact is missing; a malformed row is refused."""

import json

import numpy as np
import pytest

from irm.findings import (CONTRADICTED, NOT_DISTINGUISHABLE, NOT_TESTED, ROW_BUILDERS, SUPPORTED, VERDICTS, build_findings,
                          calibrated, finding, heldout_row, layer_outlier_test, layers_moved, permutation_p,
                          reward_raised, verdict_from_interval, verdict_from_p, verdict_from_two_sided)


def test_verdict_words_are_exactly_the_three_agreed_and_not_tested():
    assert VERDICTS == ("supported", "not distinguishable from the control", "contradicted", "not tested")


def test_a_feature_claim_with_nothing_labelled_related_is_not_tested_not_dropped(tmp_path):
    # validate and ablate ran, but no feature was labelled related: both claims appear, "not tested", saying why;
    # with the artifacts absent (stages not run) they are left out
    from irm.findings import ablation_lowers_reward, related_features_fire_where_r_is_high

    assert related_features_fire_where_r_is_high(tmp_path) is None and ablation_lowers_reward(tmp_path) is None
    (tmp_path / "validation.json").write_text(json.dumps({"n_related": 0, "related": {}}))
    (tmp_path / "ablation.json").write_text(json.dumps({"n_features": 0, "modes": {}}))
    rows = build_findings(tmp_path, [related_features_fire_where_r_is_high, ablation_lowers_reward])
    assert [r["verdict"] for r in rows] == [NOT_TESTED, NOT_TESTED]
    assert all("labelled related" in r["detail"] for r in rows)


@pytest.mark.parametrize("ci, control, expected", [
    ([0.1, 0.3], 0.0, SUPPORTED),
    ([-0.3, -0.1], 0.0, CONTRADICTED),
    ([-0.1, 0.2], 0.0, NOT_DISTINGUISHABLE),
    ([0.0, 0.2], 0.0, NOT_DISTINGUISHABLE),  # touching the control's value is not above it
    ([0.0, 0.0], 0.0, NOT_DISTINGUISHABLE),
    ([0.55, 0.7], 0.5, SUPPORTED),  # a control value other than 0
    ([0.3, 0.45], 0.5, CONTRADICTED),
    (None, 0.0, NOT_DISTINGUISHABLE),
    ([float("nan"), 1.0], 0.0, NOT_DISTINGUISHABLE),
])
def test_verdict_from_interval_every_branch(ci, control, expected):
    assert verdict_from_interval(ci, control) == expected


def test_verdict_from_interval_refuses_a_reversed_interval():
    with pytest.raises(ValueError):
        verdict_from_interval([0.3, 0.1])


@pytest.mark.parametrize("p_greater, p_less, expected", [
    (0.001, 0.999, SUPPORTED), (0.999, 0.001, CONTRADICTED), (0.2, 0.8, NOT_DISTINGUISHABLE),
    (0.05, 0.95, NOT_DISTINGUISHABLE), (None, None, NOT_DISTINGUISHABLE), (0.01, None, SUPPORTED),
    (0.03, 0.97, NOT_DISTINGUISHABLE),  # one convention: two-sided 0.05, so 2.5% per direction
])
def test_verdict_from_p_every_branch(p_greater, p_less, expected):
    assert verdict_from_p(p_greater, p_less) == expected


@pytest.mark.parametrize("p, effect, expected", [
    (0.001, 0.3, SUPPORTED), (0.001, -0.3, CONTRADICTED), (0.3, 0.3, NOT_DISTINGUISHABLE),
    (0.001, 0.0, NOT_DISTINGUISHABLE), (None, 0.3, NOT_DISTINGUISHABLE),
])
def test_verdict_from_two_sided_every_branch(p, effect, expected):
    assert verdict_from_two_sided(p, effect) == expected


def test_permutation_p_hand_worked():
    null = [0.1, 0.2, 0.3, 0.4, float("nan")]
    assert permutation_p(0.35, null) == pytest.approx((1 + 1) / (1 + 4))
    assert permutation_p(0.35, null, "less") == pytest.approx((1 + 3) / (1 + 4))
    assert permutation_p(1.0, null) == pytest.approx(1 / 5)  # never 0
    with pytest.raises(ValueError):
        permutation_p(0.0, null, "two-sided")


def write(tmp_path, name, obj):
    (tmp_path / name).write_text(json.dumps(obj))


@pytest.mark.parametrize("ci, p, expected", [
    ([0.06, 0.36], 0.005, SUPPORTED), ([-0.08, 0.09], 0.96, NOT_DISTINGUISHABLE), ([-0.4, -0.1], 0.001, CONTRADICTED),
])
def test_reward_row_reads_the_paired_difference(tmp_path, ci, p, expected):
    write(tmp_path, "reward_eval.json", {"difference": {"mean": sum(ci) / 2, "ci95": ci, "p_value": p, "n": 128}})
    row = reward_raised(tmp_path)
    assert row["verdict"] == expected and f"{ci[0]:.3f}" in row["number"]
    # the PPO helper's "paired" entry takes precedence over "difference"
    write(tmp_path, "reward_eval.json", {"difference": {"mean": 0, "ci95": [-1, 1]},
                                         "paired": {"mean": sum(ci) / 2, "ci95": ci, "p": p, "n": 256}})
    assert reward_raised(tmp_path)["verdict"] == expected
    # evaluate-reward's own `paired` entry: mean_diff, ci, p_value
    write(tmp_path, "reward_eval.json", {"paired": {"mean_diff": sum(ci) / 2, "ci": ci, "p_value": p, "n": 256}})
    row = reward_raised(tmp_path)
    assert row["verdict"] == expected and f"{ci[0]:.3f}" in row["number"] and "n = 256" in row["detail"]


def test_reward_verdict_is_the_sign_flip_tests_when_the_run_has_it(tmp_path):
    """The t-interval excludes 0 but the exact sign-flip p does not reach 5%: the verdict follows the sign-flip test
    (and Holm reads its p); a run from before the test keeps the interval's verdict and says how to refresh it."""
    paired = {"mean_diff": 0.2, "ci": [0.01, 0.39], "p_value": 0.04, "n": 128}
    write(tmp_path, "reward_eval.json", {"paired": {**paired, "p_signflip": 0.07}})
    row = reward_raised(tmp_path)
    assert row["verdict"] == NOT_DISTINGUISHABLE and row["p_value"] == 0.07 and "sign-flip" in row["detail"]
    write(tmp_path, "reward_eval.json", {"paired": {**paired, "p_signflip": 0.03}})
    assert reward_raised(tmp_path)["verdict"] == SUPPORTED
    write(tmp_path, "reward_eval.json", {"paired": {**paired, "mean_diff": -0.2, "ci": [-0.39, -0.01],
                                                    "p_signflip": 0.0001}})
    row = reward_raised(tmp_path)
    assert row["verdict"] == CONTRADICTED and "its floor" in row["detail"]
    write(tmp_path, "reward_eval.json", {"paired": paired})
    row = reward_raised(tmp_path)
    assert row["verdict"] == SUPPORTED and row["p_value"] == 0.04 and "--force" in row["detail"]


def test_layer_outlier_test_is_scale_free_finds_planted_layers_and_its_null_is_uniform():
    rng = np.random.default_rng(0)
    values = np.exp(0.03 * rng.normal(size=30))
    flat = layer_outlier_test(values, 3, n_sim=1000)
    assert flat["p"] > 0.05
    scaled = layer_outlier_test(values * 7.0, 3, n_sim=1000)  # the statistic ignores the scale
    assert scaled["statistic"] == pytest.approx(flat["statistic"])
    assert scaled["p"] == pytest.approx(flat["p"], abs=0.002)
    planted = values.copy()
    planted[[4, 9, 20]] *= 1.3
    strong = layer_outlier_test(planted, 3, n_sim=1000)
    assert strong["p"] < 0.01 and strong["ratio"] == pytest.approx(1.3, rel=0.05)
    # under its null (log-normal layers) the p-value is uniform: 5% of 400 worlds below 0.05, within chance
    ps = [layer_outlier_test(np.exp(rng.normal(size=12)), 2, n_sim=400, seed=i)["p"] for i in range(400)]
    assert 8 <= sum(p < 0.05 for p in ps) <= 34
    assert layer_outlier_test([1.0, 2.0, 3.0], 1)["p"] is None  # fewer than 3 layers besides the top k


def test_layers_row_from_divergence_json(tmp_path):
    values = [1.0 + 0.001 * i for i in range(30)]
    write(tmp_path, "divergence.json", {"values": values, "top_k": [29, 28, 27], "k": 3})
    row = layers_moved(tmp_path)
    assert row["verdict"] == NOT_DISTINGUISHABLE and "29, 28, 27" in row["claim"] and row["calibration"] == "layers"
    write(tmp_path, "divergence.json", {"values": [1.0, 2.0, 3.0], "top_k": [2], "k": 1})
    assert layers_moved(tmp_path)["verdict"] == NOT_TESTED  # too few layers: a row saying so, not a missing row


def test_undefined_heldout_tau_is_a_not_tested_row():
    c = {"tuned": {"tau": {"heldout": {"tau": None, "n": 1}}, "permutation": {"heldout": {"p_greater": None}}}}
    row = heldout_row(c)
    assert row["verdict"] == NOT_TESTED and "undefined" in row["detail"] and row["calibration"] == "heldout_tau"


def test_rows_carry_the_calibrated_false_positive_rate_and_the_mde_only_when_not_distinguishable():
    cal = {"findings": {"layers": {"false_positive_rate": 0.02, "false_positive_ci95": [0.01, 0.04],
                                   "minimal_detectable_effect": 1.1, "effect_unit": "ratio"}}}
    rows = [finding("a", "1", "c", NOT_DISTINGUISHABLE, "d", calibration="layers"),
            finding("b", "1", "c", SUPPORTED, "d", calibration="layers"), finding("c", "1", "c", SUPPORTED, "d")]
    out = calibrated(rows, cal)
    assert out[0]["false_positive_rate"] == 0.02 and out[0]["minimal_detectable_effect"] == 1.1
    assert out[0]["mde_source"].startswith("calibration harness")
    assert out[1]["false_positive_rate"] == 0.02 and out[1]["minimal_detectable_effect"] is None
    assert out[2]["false_positive_rate"] is None
    # an interval row: the effect its own interval resolves, 2.8 standard errors (SE 0.1)
    row = finding("d", "1", "c", NOT_DISTINGUISHABLE, "d", calibration="layers", ci=[-0.1959964, 0.1959964])
    own = calibrated([row], cal)[0]
    assert own["minimal_detectable_effect"] == pytest.approx(0.1 * (1.959964 + 0.841621))
    assert own["mde_source"].startswith("this run's")
    # the full harness's certified rate rides beside the run's own
    cert = {"layers": {"false_positive_rate": 0.032, "false_positive_ci95": [0.018, 0.051], "worlds": 500}}
    out = calibrated(rows, cal, cert)
    assert out[0]["certified_false_positive_rate"] == 0.032 and out[0]["certified_worlds"] == 500
    assert out[0]["false_positive_rate"] == 0.02 and out[2]["certified_false_positive_rate"] is None
    # a finding the run's calibrate stage does not simulate takes the full harness's minimal detectable effect
    cert = {"diff_specific": {"false_positive_rate": 0.0, "worlds": 200, "minimal_detectable_effect": 1.3,
                              "effect_unit": "magnitude"}}
    only = calibrated([finding("e", "0", "c", NOT_DISTINGUISHABLE, "d", calibration="diff_specific")], cal, cert)[0]
    assert only["minimal_detectable_effect"] == 1.3 and only["effect_unit"] == "magnitude"
    assert only["mde_source"] == "calibration harness, planted worlds at the harness's sizes"
    assert only["false_positive_rate"] is None and only["certified_false_positive_rate"] == 0.0


def test_the_committed_harness_table_certifies_every_finding_and_rows_quote_it(tmp_path):
    """irm/calibration/certified.json (benchmarks/calibration.py's output) has every declared finding, each null
    family within the limits (rate <= 5%, upper end <= 7%), and the findings table quotes it by default."""
    import irm.calibration as calibration
    import irm.findings

    data = json.loads(irm.findings.CERTIFIED.read_text())
    declared = {f.finding for f in calibration.families()}
    assert declared <= set(irm.findings.read_certified())
    nulls = [r for r in data["families"] if r["null"] and r["finding"] in declared]
    assert {r["finding"] for r in nulls} == declared
    # the statistics kept as descriptions are the ones the harness failed, and no findings row cites them
    verdicts = [r for r in nulls if r["finding"] not in calibration.DESCRIPTIVE]
    assert calibration.failures(verdicts) == []
    for name in calibration.DESCRIPTIVE:
        assert calibration.failures([r for r in nulls if r["finding"] == name])
    from pathlib import Path

    source = "".join(p.read_text() for p in Path(irm.findings.__file__).parent.glob("*.py"))
    assert not any(f'"{name}"' in source for name in calibration.DESCRIPTIVE)
    write(tmp_path, "reward_eval.json", {"paired": {"mean_diff": 0.2, "ci": [0.1, 0.3], "p_value": 0.001,
                                                    "p_signflip": 0.001, "n": 128}})
    row = build_findings(tmp_path)[0]
    assert row["certified_false_positive_rate"] == irm.findings.read_certified()["reward"]["false_positive_rate"]
    assert row["certified_worlds"] >= 500


def test_missing_artifacts_skip_their_claims_and_bad_rows_are_refused(tmp_path):
    assert build_findings(tmp_path) == []
    assert len(ROW_BUILDERS) >= 5
    with pytest.raises(ValueError):
        finding("c", "1", "ctl", "probably", "d")
    with pytest.raises(ValueError):
        build_findings(tmp_path, [lambda root: {"claim": "only a claim"}])
    rows = build_findings(tmp_path, [lambda root: [finding("a", "1", "c", SUPPORTED, "d"), None][:1]])
    assert rows == [{"claim": "a", "number": "1", "control": "c", "verdict": SUPPORTED,
                     "detail": "d; outside the Holm correction (no p-value)", "calibration": None, "p_value": None,
                     "interval_mde": None, "p_holm": None, "false_positive_rate": None, "false_positive_ci95": None,
                     "minimal_detectable_effect": None, "effect_unit": None, "mde_source": None,
                     "certified_false_positive_rate": None, "certified_false_positive_ci95": None,
                     "certified_worlds": None}]


def test_divergence_records_per_tensor_norms_that_sum_to_each_layer(tmp_path):
    from irm.config import ModelConfig
    from irm.stages.divergence import layer_divergence
    from irm.models import load_model

    base, _ = load_model(ModelConfig(name="tiny-gpt-neox", tiny_layers=3), seed=0)
    tuned, _ = load_model(ModelConfig(name="tiny-gpt-neox", tiny_layers=3), seed=1)
    per_tensor = {}
    values = layer_divergence(base, tuned, per_tensor)
    assert len(per_tensor) > 4 and all(len(v) == 3 for v in per_tensor.values())
    np.testing.assert_allclose(np.sum(list(per_tensor.values()), axis=0), values, rtol=1e-12)
    name = next(n for n in per_tensor if n.endswith("weight"))
    p0 = {k: v.detach() for k, v in base.named_parameters()}
    p1 = {k: v.detach() for k, v in tuned.named_parameters()}
    full = next(k for k in p0 if k.endswith(name) and ".0." in k)
    assert per_tensor[name][0] == pytest.approx(float((p0[full].double() - p1[full].double()).norm()))


def test_ce_gaps_are_the_two_loss_differences_behind_ce_loss_recovered():
    from irm.findings import ce_gaps

    gaps = ce_gaps({"ce_clean": 5.0, "ce_zero_ablated": 5.04, "ce_spliced": 4.99})
    assert gaps == pytest.approx((-0.01, 0.04))  # recovered = (5.04 - 4.99) / 0.04 = 1.25: a ratio above 1
    assert ce_gaps({"ce_clean": 5.0, "ce_spliced": 4.99}) is None


def test_two_sided_permutation_p_uses_the_null_normal_tail_only_beyond_every_draw():
    from scipy.stats import norm

    from irm.findings import permutation_two_sided

    beyond = {"p_greater": 1 / 201, "p_less": 1.0, "n": 200, "mean": 0.01, "sd": 0.04}
    assert permutation_two_sided(0.21, beyond) == pytest.approx(2 * norm.sf(5.0))
    inside = {"p_greater": 0.2, "p_less": 0.8, "n": 200, "mean": 0.0, "sd": 0.04}
    assert permutation_two_sided(0.05, inside) == pytest.approx(0.4)


def test_a_not_distinguishable_ablation_row_states_the_smallest_effect_it_could_have_seen():
    """Every "not distinguishable" row says what it could have detected: for an ablation difference, from its own
    95% interval, (z_0.975 + z_0.8) standard errors with the standard error the interval's half-width / 1.96."""
    from scipy.stats import norm

    from irm.findings import NOT_DISTINGUISHABLE, ablation_row

    abl = {"n_features": 10, "n_prompts": 64, "random_draws": 8, "modes": {"reconstruction": {
        "ablated_minus_splice": {"mean": -0.072, "ci95": [-0.262, 0.118], "p_value": 0.45, "interval": "paired t"}}}}
    row = ablation_row(abl, "reconstruction", "ablated_minus_splice")
    assert row["verdict"] == NOT_DISTINGUISHABLE
    se = (0.118 + 0.262) / 2 / norm.ppf(0.975)
    assert row["interval_mde"] == pytest.approx((norm.ppf(0.975) + norm.ppf(0.8)) * se, rel=1e-3)
