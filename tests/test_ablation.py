"""Ablation (paper 5.2, table 5): features are zeroed in the SAE's code space and only their decoder contribution
changes; the error-term splice with nothing ablated is the model itself; the controls and intervals are right; a
killed run resumes without redoing a batch; the stage writes every condition."""

import numpy as np
import pytest
import torch
from scipy import stats

from irm.ablation import condition_rewards, draw_random_features, mean_ci, prompt_seed, _per_prompt_sampler

torch.set_num_threads(1)


# --- intervals -------------------------------------------------------------------------------------------------


def test_mean_ci_is_scipys_one_sample_t_interval():
    x = np.random.default_rng(0).normal(1.5, 2.0, size=37)
    got = mean_ci(x)
    lo, hi = stats.ttest_1samp(x, 0.0).confidence_interval(0.95)
    assert got["n"] == 37 and got["mean"] == pytest.approx(x.mean())
    assert got["ci95"] == pytest.approx([lo, hi], rel=1e-12)


def test_paired_difference_interval_is_scipys_paired_t_interval():
    rng = np.random.default_rng(1)
    before = rng.normal(2.0, 1.0, size=25)
    after = before - 0.3 + rng.normal(0.0, 0.2, size=25)
    lo, hi = stats.ttest_rel(after, before).confidence_interval(0.95)
    assert mean_ci(after - before)["ci95"] == pytest.approx([lo, hi], rel=1e-12)


def test_mean_ci_of_one_value_has_no_interval():
    assert mean_ci([2.0]) == {"mean": 2.0, "ci95": None, "n": 1}


# --- random control --------------------------------------------------------------------------------------------


def test_random_control_never_draws_labelled_features_and_matches_their_count():
    labelled = {2: [0, 5, 7], 3: [1], 4: []}
    widths = {2: 16, 3: 8, 4: 8}
    draws = draw_random_features(labelled, widths, draws=50, seed=3)
    assert len(draws) == 50
    for d in draws:
        assert {layer: len(ix) for layer, ix in d.items()} == {2: 3, 3: 1, 4: 0}
        for layer, ix in d.items():
            assert len(set(ix)) == len(ix)
            assert not set(ix) & set(labelled[layer])
            assert all(0 <= i < widths[layer] for i in ix)
    # Every unlabelled feature of layer 2 turns up: the draws range over all the others, not a fixed few.
    assert set().union(*(d[2] for d in draws)) == set(range(16)) - {0, 5, 7}


def test_random_draws_are_reproducible_and_adding_draws_keeps_the_earlier_ones():
    labelled, widths = {1: [3, 4]}, {1: 32}
    assert draw_random_features(labelled, widths, 5, seed=0)[:3] == draw_random_features(labelled, widths, 3, seed=0)
    assert draw_random_features(labelled, widths, 3, seed=0) != draw_random_features(labelled, widths, 3, seed=1)


def test_random_control_too_large_is_a_user_error():
    from irm.errors import UserError

    with pytest.raises(UserError, match="too few"):
        draw_random_features({0: [0, 1, 2]}, {0: 4}, draws=1, seed=0)


# --- sampling --------------------------------------------------------------------------------------------------


def test_per_prompt_sampler_draws_from_the_softmax():
    """Gumbel-max followed by argmax samples softmax(logits): chi-square test of 20,000 rows, one seed each."""
    n = 20_000
    logits = torch.tensor([0.0, 1.0, 2.0, -1.0, 0.5])
    sampler = _per_prompt_sampler([prompt_seed(0, i) for i in range(n)])
    counts = np.bincount(sampler(None, logits.repeat(n, 1)).argmax(-1).numpy(), minlength=5)
    expected = torch.softmax(logits.double(), -1).numpy() * n
    assert stats.chisquare(counts, expected).pvalue > 1e-3


def test_per_prompt_sampler_noise_depends_on_the_prompt_not_its_batch():
    scores = torch.zeros(4, 11)
    seeds = [prompt_seed(7, i) for i in range(4)]
    whole = _per_prompt_sampler(seeds)(None, scores)
    part = _per_prompt_sampler(seeds[2:])(None, scores[2:])
    assert torch.equal(whole[2:], part)
    assert not torch.equal(whole[0], whole[1])


# --- resume ----------------------------------------------------------------------------------------------------


def test_condition_rewards_resumes_without_redoing_a_finished_batch(tmp_path):
    path = tmp_path / "ablate" / "cond.jsonl"
    calls, kill_at = [], {3}

    def score(indices):
        calls.append(list(indices))
        if len(calls) in kill_at:
            raise RuntimeError("killed")
        return [f"t{i}" for i in indices], [float(i) ** 2 for i in indices]

    with pytest.raises(RuntimeError, match="killed"):
        condition_rewards(path, 10, 3, score, "test")
    assert calls == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    calls.clear()
    kill_at.clear()
    rewards = condition_rewards(path, 10, 3, score, "test")
    assert calls == [[6, 7, 8], [9]]
    assert rewards.tolist() == [float(i) ** 2 for i in range(10)]
    calls.clear()
    assert condition_rewards(path, 10, 3, score, "test").tolist() == rewards.tolist()
    assert calls == []
