"""The calibration harness can fail (issue 22): in simulated worlds where a claim is false, today's statistics hold
the false-positive rate near 5%, and the statistics they replaced do not. Small world counts (the default suite's
budget); the full harness is benchmarks/calibration.py (benchmarks/RESULTS.md)."""

import numpy as np
import pytest
from scipy.stats import binomtest, bootstrap, kendalltau

import irm.chains
from irm.calibration import core
from irm.calibration.chain import NULL_DELTA, world_of
from irm.calibration.run_level import layer_world
from irm.findings import SUPPORTED, NOT_DISTINGUISHABLE

# Few triples for many words: R's own estimation noise, which the words-only interval ignored, dominates
SMALL = {"words": 300, "triples": 30, "contexts": 2, "bootstrap": 40, "permutations": 1}


def words_only(features, true, masks, scales, multiple, pairs, n_resamples, seed, show_progress=False):
    """The replaced delta_tau interval: the fitted predictions held fixed, words resampled (paired) only."""
    out = {}
    for name, (a, b) in pairs.items():
        out[name] = {}
        for s, m in masks.items():
            t, x, y = true[m], features[a[0]]["pred" + a[1][1:]][m], features[b[0]]["pred" + b[1][1:]][m]

            def stat(t, x, y):
                return kendalltau(t, x).statistic - kendalltau(t, y).statistic

            ci = bootstrap((t, x, y), stat, paired=True, vectorized=False, n_resamples=n_resamples,
                           method="percentile", random_state=np.random.default_rng(seed)).confidence_interval
            out[name][s] = {"delta": float(stat(t, x, y)), "ci95": [float(ci.low), float(ci.high)], "p_value": None,
                            "n": int(m.sum())}
    return out


def false_positives(family: core.Family, n: int, sizes) -> int:
    r = core.run_family(family, n, sizes, seed=1)
    assert r["null"] and r["n"] == n
    return round(r["rate"] * n)


def test_delta_tau_holds_its_false_positives_where_the_words_only_bootstrap_did_not(monkeypatch):
    name = "sentiment-irrelevant linear map"
    family = core.Family("delta_tau", name, 0.0, world_of("delta_tau", **NULL_DELTA[name]))
    n = 20  # measured: 1 of 20 today, 5 of 20 with the words-only interval (separate dictionaries: 1 and 6)
    today = false_positives(family, n, SMALL)
    monkeypatch.setattr(irm.chains, "resampled_deltas", words_only)
    before = false_positives(family, n, SMALL)
    # today: consistent with at most 5% (binomial test); the old interval: far above it
    assert binomtest(today, n, 0.05, alternative="greater").pvalue > 0.05, today
    assert binomtest(before, n, 0.05, alternative="greater").pvalue < 0.01, before


def test_layer_claim_holds_its_false_positives_where_the_per_tensor_null_did_not(monkeypatch):
    import irm.findings.layers

    family = core.Family("layers", "random per-layer factor", 0.0, layer_world(0.0, "log-normal 3%"))
    n = 100
    today = false_positives(family, n, {"layers": 30, "top_k": 3})

    def per_tensor_null(values, k, n_sim=2000, seed=0):  # the replaced test: each tensor's norms permuted
        values = np.asarray(values)
        rng = np.random.default_rng(seed)

        def ratio(v):
            s = np.sort(v)[::-1]
            return s[:k].mean() / s[k:].mean()

        # per-tensor norms are not kept by layer_row's input; the world's values are sums of 9 tensors that all
        # carry the layer's factor, so permuting tensors across layers is permuting 9 rescaled copies
        t = np.stack([values / 9.0] * 9)
        null = [ratio(np.stack([rng.permutation(row) for row in t]).sum(axis=0)) for _ in range(200)]
        return {"statistic": ratio(values), "ratio": ratio(values), "n_sim": 200, "null": "per tensor",
                "p": irm.findings.permutation_p(ratio(values), null)}

    monkeypatch.setattr(irm.findings.layers, "layer_outlier_test", per_tensor_null)
    before = false_positives(family, 20, {"layers": 30, "top_k": 3})
    assert binomtest(today, n, 0.05, alternative="greater").pvalue > 0.05, today
    assert before >= 15, before


def test_planted_delta_tau_is_found_and_measured_effects_give_a_minimal_detectable_effect():
    sizes = {**SMALL, "words": 120, "triples": 60}
    results = [core.run_family(core.Family("delta_tau", "planted", e, world_of("delta_tau", effect=e)), 6,
                               sizes, seed=2) for e in (0.25, 1.0)]
    assert results[1]["rate"] >= 0.75 and results[1]["measured_effect"] > results[0]["measured_effect"] > 0
    mde = core.minimal_detectable_effect(results, "delta_tau", measured=True)
    assert mde is not None and 0 < mde <= results[1]["measured_effect"]


def test_holm_matches_a_hand_worked_example_and_demotes_a_row():
    from irm.findings import correct, finding, holm

    assert holm([0.01, 0.04, None, 0.03]) == pytest.approx([0.03, 0.06, None, 0.06])
    rows = [finding(k, "1", "c", SUPPORTED, "d", p_value=p) for k, p in (("a", 0.01), ("b", 0.04), ("c", 0.03))]
    out = correct(rows)
    assert [r["verdict"] for r in out] == [SUPPORTED, NOT_DISTINGUISHABLE, NOT_DISTINGUISHABLE]
    assert [r["p_holm"] for r in out] == pytest.approx([0.03, 0.06, 0.06]) and "Holm" in out[1]["detail"]


def test_calibrate_reads_this_runs_sizes_from_its_artifacts(tmp_path):
    """Every size the worlds take, read from the artifact that records it (hand-written artifacts, hand-counted
    sizes): control's words/triples/contexts, the paired prompts, layers and top k, validation's groups and inputs,
    ablation's prompts/draws/features, and the fewest chance draws of any layer."""
    from irm.artifacts import write_json
    from irm.stages.calibrate import run_sizes
    from irm.stages import artifact

    root = tmp_path / "run"
    write_json(artifact(root, "control"), {"n_words": 800, "n_triples": 600, "n_contexts": 2})
    write_json(artifact(root, "reward_eval"), {"paired": {"n": 128}})
    write_json(artifact(root, "divergence"), {"values": [1.0] * 30, "top_k": [3, 7, 9]})
    write_json(artifact(root, "validation"), {"n_inputs": 8454, "vs_other_explained": {
        "enrichment over base rate": {"n_related": 18, "n_other": 162}}})
    write_json(artifact(root, "ablation"), {"n_prompts": 64, "random_draws": 8, "n_features": 18})
    write_json(artifact(root, "mmcs"), {"layers": {"3": {"chance": {"max": {"draws": [0.2] * 49}}},
                                                   "7": {"chance": {"max": {"draws": [0.2] * 99}}}}})
    assert run_sizes(root) == {"words": 800, "triples": 600, "contexts": 2, "prompts": 128, "layers": 30, "top_k": 3,
                               "validation_related": 18, "validation_features": 180, "validation_inputs": 8454,
                               "ablation_prompts": 64, "random_draws": 8, "ablated_features": 18, "chance_draws": 49}
    assert run_sizes(tmp_path / "empty") == {}


@pytest.mark.parametrize("hits, worlds, fails", [
    (1001, 20000, False),  # an exact 5% test's reading a hair above 5%: within its Monte Carlo error
    (300, 5000, True),     # 6.0%: above 5% beyond the Monte Carlo error (lower end 5.4%)
    (29, 500, True),       # 5.8% [3.9, 8.2]: could be above 7%
    (106, 2000, False),    # 5.3% [4.4, 6.4]
    (0, 20, True),         # no worlds to speak of: [0, 16.8]
    (20, 1000, False),
])
def test_a_null_family_fails_when_its_rate_is_above_5_percent_beyond_chance_or_could_be_above_7(hits, worlds, fails):
    row = {"null": True, "rate": hits / worlds, "ci95": core.clopper_pearson(hits, worlds)}
    assert bool(core.failures([row])) is fails
    assert core.failures([{**row, "null": False}]) == []  # power rows are never failures


def test_tau_worlds_skip_the_bootstrap_without_changing_a_verdict_or_a_number():
    """lexicon_tau / heldout_tau worlds run analyse with no bootstrap (irm.calibration.chain.NO_BOOTSTRAP): their
    taus, permutation nulls and verdicts equal those of the full analysis of the same world."""
    from irm.calibration import chain

    sizes = {**SMALL, "bootstrap": 30, "permutations": 19}
    for seed, (kind, world) in enumerate((("lexicon_tau", {"signal": 1.0}), ("heldout_tau", {"signal": 0.0}))):
        fast = chain.world_of(kind, **world)(np.random.default_rng(seed), sizes)
        full_c = chain.analysed(np.random.default_rng(seed), sizes, **world)
        assert fast == (chain._row(kind, full_c)["verdict"], chain._number(kind, full_c))
        assert full_c["delta_tau"]["all"]["ci95"] is not None  # the full analysis did run its bootstrap
