"""evaluate-reward (paper table 7): the t-interval by hand, rewards recomputed from the journalled completions,
paired sampling (a tuned model equal to the base gives the same completions), per-batch resuming, errors."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from irm.artifacts import read_jsonl
from irm.cli import parse_config
from irm.errors import UserError
from irm.sampling import SamplingRule

ROOT = Path(__file__).resolve().parents[1]
RULE = SamplingRule(8)


@pytest.fixture
def cfg(tmp_path):
    torch.set_num_threads(1)
    return parse_config("evaluate-reward", [
        "--config", str(ROOT / "configs" / "tiny.yaml"), "--run_dir", str(tmp_path / "run"),
        "--evaluate_reward.n", "20", "--evaluate_reward.batch_size", "8",  # a ragged last batch
    ])


def save_base_as_tuned(cfg):
    """A "tuned" policy identical to the base: what the rlhf stage would save after zero learning."""
    from irm.models import load_model

    model, tok = load_model(cfg.model, seed=cfg.seed)
    out = Path(cfg.run_dir) / "rlhf" / "policy"
    model.save_pretrained(out)
    tok.save_pretrained(out)


def test_summary_is_the_hand_worked_t_interval():
    from irm.stats import mean_ci as summarize

    s = summarize([1, 2, 3, 4, 5])
    # mean 3, sample std sqrt(2.5), t(0.975, df=4) = 2.776445, half-width 2.776445 * sqrt(2.5 / 5)
    assert s["mean"] == pytest.approx(3.0) and s["std"] == pytest.approx(math.sqrt(2.5)) and s["n"] == 5
    assert s["ci95"] == pytest.approx([3 - 1.963243, 3 + 1.963243], abs=1e-6)
    assert summarize([0.5, 0.5, 0.5])["ci95"] == [0.5, 0.5]


def test_table7_json_from_journalled_completions_with_paired_sampling(cfg, capsys):
    from irm.data import load_texts, prefixes
    from irm.stages.evaluate_reward import run
    from irm.models import tiny_tokenizer
    from irm.reward import LexiconReward

    save_base_as_tuned(cfg)
    run(cfg)
    out = Path(cfg.run_dir)
    result = json.loads((out / "reward_eval.json").read_text())
    assert result["new_tokens"] == cfg.evaluate_reward.new_tokens and result["prefix_tokens"] == cfg.evaluate_reward.prefix_tokens
    base, tuned = (read_jsonl(out / "evaluate" / f"{m}.jsonl") for m in ("base", "tuned"))
    assert [r["batch"] for r in base] == [0, 1, 2]
    # same model, same prefixes, same per-batch seeds: the same completions, a difference of exactly 0
    assert [r["completions"] for r in base] == [r["completions"] for r in tuned]
    assert result["difference"]["mean"] == 0 and result["difference"]["ci95"] == [0, 0]
    assert result["paired"] == {"mean_diff": 0, "ci": [0, 0], "bootstrap_ci": [0, 0], "p_value": 1.0,
                                "p_signflip": 1.0, "n": cfg.evaluate_reward.n}
    assert result["sampling"] == {"max_new_tokens": cfg.evaluate_reward.new_tokens, "stop_at_eos": True,
                                  "temperature": cfg.rlhf.temperature, "top_k": 0, "top_p": 1.0}

    tok = tiny_tokenizer()
    pool = prefixes(load_texts(cfg.corpus, cfg.corpus.eval_split, seed=cfg.seed), tok, cfg.evaluate_reward.prefix_tokens)
    prefix_texts = [tok.decode(pool[i % len(pool)]) for i in range(cfg.evaluate_reward.n)]
    completions = [c for r in base for c in r["completions"]]
    assert len(completions) == cfg.evaluate_reward.n and all(completions)
    # reward of prefix + completion (the word-level tokenizer decodes as words joined by spaces)
    rewards = LexiconReward()([f"{p} {c}" for p, c in zip(prefix_texts, completions)])
    assert [x for r in base for x in r["rewards"]] == pytest.approx(rewards)
    assert result["base"]["mean"] == pytest.approx(np.mean(rewards))
    assert result["base"]["std"] == pytest.approx(np.std(rewards, ddof=1))
    assert result["base"]["n"] == cfg.evaluate_reward.n
    assert result["examples"][0]["prefix"] == prefix_texts[0]

    before = (out / "reward_eval.json").stat().st_mtime_ns
    run(cfg)  # unchanged config and inputs: nothing to do
    assert (out / "reward_eval.json").stat().st_mtime_ns == before
    assert "up to date" in capsys.readouterr().err


def test_killed_evaluation_redoes_no_batch_and_matches_an_uninterrupted_one(cfg, tmp_path):
    from irm.stages.evaluate_reward import sample_rewards
    from irm.models import load_model
    from irm.reward import LexiconReward

    model, tok = load_model(cfg.model, seed=cfg.seed)
    prompts = [tok(f"the film was {w}")["input_ids"] for w in ("good", "bad", "long", "fine", "odd")] * 4
    lexicon = LexiconReward()
    scored = []
    B = cfg.evaluate_reward.batch_size

    def reward(texts):
        if len(scored) == 2 and dying:
            raise KeyboardInterrupt  # killed while scoring the third batch
        scored.append(len(texts))
        return lexicon(texts)

    dying = True
    with pytest.raises(KeyboardInterrupt):
        sample_rewards(model, tok, prompts, reward, RULE, 0, B, tmp_path / "j.jsonl", "fp", "test")
    assert [r["batch"] for r in read_jsonl(tmp_path / "j.jsonl")] == [0, 1]
    dying, scored[:] = False, []
    resumed = sample_rewards(model, tok, prompts, reward, RULE, 0, B, tmp_path / "j.jsonl", "fp", "test")
    assert scored == [4]  # only the third (last, ragged) batch was sampled again
    whole = sample_rewards(model, tok, prompts, reward, RULE, 0, B, tmp_path / "k.jsonl", "fp", "test")
    assert resumed == whole
    # a journal written under another fingerprint (other config or tuned model) is not reused
    scored[:] = []
    sample_rewards(model, tok, prompts, reward, RULE, 0, B, tmp_path / "j.jsonl", "other", "test")
    assert scored == [8, 8, 4]
    assert {r["fingerprint"] for r in read_jsonl(tmp_path / "j.jsonl")} == {"other"}


def test_evaluating_a_run_without_a_tuned_policy_is_a_user_error(cfg):
    from irm.stages.evaluate_reward import run

    with pytest.raises(UserError, match="irm rlhf"):
        run(cfg)


@pytest.mark.parametrize("shift", [0.0, 0.4])
def test_paired_difference_is_the_paired_t_test_by_hand(shift):
    """mean, t-interval and p-value of tuned - base computed from the differences with numpy and the t
    distribution; the bootstrap interval brackets the mean and has about the t-interval's width."""
    from scipy import stats

    from irm.stats import tuned_minus_base

    rng = np.random.default_rng(1)
    base = rng.normal(0.2, 1.0, 300)
    tuned = base + shift + rng.normal(0, 0.8, 300)  # paired: the per-prompt level cancels
    got = tuned_minus_base(tuned, base)
    d = tuned - base
    n, mean, se = len(d), d.mean(), d.std(ddof=1) / math.sqrt(len(d))
    t = mean / se
    half = stats.t.ppf(0.975, n - 1) * se
    assert got["n"] == n and got["mean_diff"] == pytest.approx(mean)
    assert got["ci"] == pytest.approx([mean - half, mean + half])
    assert got["p_value"] == pytest.approx(2 * stats.t.sf(abs(t), n - 1))
    lo, hi = got["bootstrap_ci"]
    assert lo < mean < hi and (hi - lo) == pytest.approx(2 * half, rel=0.2)
    if shift:
        assert got["p_value"] < 1e-6 and got["ci"][0] > 0
    else:
        assert got["p_value"] > 0.01 and got["ci"][0] < 0 < got["ci"][1]
    # an unpaired test of the same numbers is far weaker: the pairing is what the stage relies on
    assert stats.ttest_ind(tuned, base).pvalue > got["p_value"]


def test_a_constant_difference_has_a_point_interval():
    from irm.stats import tuned_minus_base

    got = tuned_minus_base([1.5, 2.5, 3.5], [1.0, 2.0, 3.0])
    # every sign pattern but the two constant ones has a smaller |mean|: p = (1 + hits) / 10,000 with hits the
    # draws that were all + or all - (1/4 of the draws for n = 3)
    assert got["p_signflip"] == pytest.approx(0.25, abs=0.02)
    got.pop("p_signflip")
    assert got == {"mean_diff": 0.5, "ci": [0.5, 0.5], "bootstrap_ci": [0.5, 0.5], "p_value": 0.0, "n": 3}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sign_flip_p_is_the_exact_enumeration_of_sign_patterns(seed):
    """For 10 differences all 1,024 sign patterns can be listed: the random-flip p (9,999 draws) estimates the
    share of patterns whose |mean| reaches the observed one, within the Monte Carlo error of 9,999 draws."""
    import itertools

    from irm.stats import sign_flip_p

    d = np.random.default_rng(seed).exponential(1.0, 10) - 0.6
    patterns = np.array(list(itertools.product([-1.0, 1.0], repeat=10)))
    exact = float((np.abs(patterns @ d) >= abs(d.sum()) - 1e-12).mean())
    got = sign_flip_p(d)
    assert got == pytest.approx(exact, abs=4 * math.sqrt(exact * (1 - exact) / 9999) + 2e-4)
    assert sign_flip_p(d) == got  # seeded


def test_sign_flip_p_holds_its_level_on_heavy_tailed_differences():
    """Small n, heavy-tailed differences of exchangeable pairs: over 2,000 null worlds the sign-flip test's
    rejections at 5% stay at 5% up to two Monte Carlo errors (it is exact); a shifted world is found."""
    from irm.stats import sign_flip_p

    rng = np.random.default_rng(0)
    rejections = 0
    for _ in range(2000):
        a, b = rng.lognormal(0, 1.5, 12), rng.lognormal(0, 1.5, 12)
        rejections += sign_flip_p(a - b, n_resamples=999, seed=int(rng.integers(2**31))) < 0.05
    assert rejections / 2000 <= 0.05 + 2 * math.sqrt(0.05 * 0.95 / 2000)
    assert sign_flip_p(rng.normal(1.0, 1.0, 40)) < 1e-3
