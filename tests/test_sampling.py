"""The one sampling rule (irm.sampling) and its three callers: PPO rollouts (irm.rlhf.trainer), table 7
(irm.stages.evaluate_reward) and table 5 (irm.stages.ablate). Checked against a hand-written sampling loop, a chi-square test of the
distribution, batch independence under left padding, and the end-of-text stop in every caller (ablate ignored it)."""

from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats

from irm.config import ModelConfig, RLHFConfig
from irm.errors import UserError
from irm.models import load_model
from irm.sampling import SamplingRule, _GumbelNoise, generate, prompt_seed, rule, sample

PROMPTS = [[11, 12, 13, 14, 15, 16], [21, 22, 23, 24], [31, 32]]


@pytest.fixture(scope="module")
def tiny():
    torch.set_num_threads(1)
    return load_model(ModelConfig(name="tiny-gpt-neox", tiny_layers=2, tiny_d_model=32), seed=0)


@pytest.fixture
def eos_prone(tiny):
    """The tiny model with its end-of-text logit raised so that most completions stop within a few tokens."""
    model, tok = tiny
    head = model.get_output_embeddings()
    saved = head.weight.detach().clone()
    with torch.no_grad():
        head.weight[tok.eos_token_id] = head.weight.mean(0)  # the same for every hidden state ...
    bias = torch.zeros(head.weight.shape[0])
    bias[tok.eos_token_id] = 7.5  # ... plus a lead: about 1 in 5 tokens is end-of-text (7.7k near-flat logits)

    handle = head.register_forward_hook(lambda _m, _i, out: out + bias)
    yield model, tok
    handle.remove()
    with torch.no_grad():
        head.weight.copy_(saved)


def by_hand(model, prompt, seed, r: SamplingRule, eos):
    """Full forward at every step, warp (temperature, top-k), Gumbel noise from the prompt's own generator,
    argmax; stop after end-of-text when the rule says so. Returns the completion's ids."""
    g, ids = torch.Generator().manual_seed(seed), list(prompt)
    with torch.no_grad():
        for _ in range(r.max_new_tokens):
            scores = model(torch.tensor([ids])).logits[0, -1].float() / r.temperature
            if r.top_k:
                scores[scores < scores.topk(r.top_k).values[-1]] = -float("inf")
            u = torch.rand(scores.shape[-1], generator=g).clamp_min(torch.finfo(torch.float32).tiny)
            ids.append(int((scores - torch.log(-torch.log(u))).argmax()))
            if r.stop_at_eos and ids[-1] == eos:
                break
    return ids[len(prompt):]


@pytest.mark.parametrize("r", [SamplingRule(9), SamplingRule(9, temperature=0.7, top_k=5),
                               SamplingRule(9, stop_at_eos=False)])
def test_sample_is_the_hand_written_loop(eos_prone, r):
    model, tok = eos_prone
    seeds = [prompt_seed(3, i) for i in range(len(PROMPTS))]
    config = model.generation_config
    trap = config.__class__.from_dict(config.to_dict())
    trap.repetition_penalty, trap.eos_token_id = 50.0, None  # generate() must take nothing from the model's config
    model.generation_config = trap
    try:
        got = sample(model, tok, PROMPTS, r, seeds)
        assert model.generation_config is trap
    finally:
        model.generation_config = config
    expected = [by_hand(model, p, s, r, tok.eos_token_id) for p, s in zip(PROMPTS, seeds)]
    assert got.new_ids == expected
    assert got.texts == [tok.decode(p + e, skip_special_tokens=True) for p, e in zip(PROMPTS, expected)]
    if r.stop_at_eos:
        assert any(len(e) < r.max_new_tokens for e in expected)  # the test exercises the stop
    else:
        assert all(len(e) == r.max_new_tokens for e in expected)


def test_a_prompt_samples_the_same_in_any_batch(tiny):
    model, tok = tiny
    r = SamplingRule(8)
    seeds = [prompt_seed(1, i) for i in range(len(PROMPTS))]
    whole = sample(model, tok, PROMPTS, r, seeds)
    alone = sample(model, tok, PROMPTS[2:], r, seeds[2:])  # no padding: the shortest prompt
    assert whole.new_ids[2] == alone.new_ids[0]
    assert whole.new_ids[0] != whole.new_ids[1]


@pytest.mark.parametrize("r", [SamplingRule(1), SamplingRule(1, temperature=0.5, top_k=3),
                               SamplingRule(1, top_p=0.8)])
def test_seeded_noise_after_the_warps_samples_the_warped_softmax(r):
    """Chi-square of 20,000 one-token draws against softmax(logits / T) cut to the top k / the nucleus by hand."""
    n = 20_000
    logits = torch.tensor([0.0, 1.0, 2.0, -1.0, 0.5, 1.5])
    p = torch.softmax(logits.double() / r.temperature, -1)
    order = p.argsort(descending=True)
    keep = torch.ones_like(p, dtype=torch.bool)
    if r.top_k:
        keep[order[r.top_k:]] = False
    if r.top_p < 1:  # the smallest set of most likely tokens whose mass reaches top_p
        mass = p[order].cumsum(0)
        keep[order[1:][mass[:-1] >= r.top_p]] = False
    expected = torch.where(keep, p, 0) / p[keep].sum()
    scores = logits.repeat(n, 1)
    for w in r.warpers():
        scores = w(None, scores)
    draws = _GumbelNoise([prompt_seed(0, i) for i in range(n)])(None, scores).argmax(-1).numpy()
    counts = np.bincount(draws, minlength=6)
    assert counts[~keep.numpy()].sum() == 0
    assert stats.chisquare(counts[keep.numpy()], expected[keep].numpy() * n).pvalue > 1e-3


def test_unseeded_generate_returns_the_tempered_logits_ppo_reads(tiny):
    model, tok = tiny
    r = SamplingRule(5, temperature=0.5)
    ids = torch.tensor([PROMPTS[0]])
    torch.manual_seed(0)
    seq, scores = generate(model, ids, torch.ones_like(ids), r, tok, output_scores=True)
    with torch.no_grad():
        logits = model(seq).logits[0, ids.shape[1] - 1:-1]
    assert scores.shape == (1, 5, logits.shape[-1])
    torch.testing.assert_close(scores[0], logits / 0.5, rtol=1e-4, atol=1e-4)


def test_the_three_callers_use_one_rule_and_stop_at_end_of_text(eos_prone, tmp_path):
    """PPO's rollout rule, table 7's and table 5's are the run's rule at their lengths; evaluate and ablate draw the
    same completion for the same prompt and seed, and both stop at end-of-text (ablate did not: it sampled exactly
    new_tokens tokens whatever came)."""
    from irm.stages.evaluate_reward import sample_rewards
    from irm.sampling import sample_prompts  # what the ablate stage draws its completions with
    from irm.rlhf.trainer import rollout_rule

    rlhf = RLHFConfig(temperature=0.9, response_length=7)
    assert rollout_rule(rlhf) == rule(rlhf, 7) == SamplingRule(7, stop_at_eos=True, temperature=0.9, top_k=0, top_p=1.0)
    model, tok = eos_prone
    r = rule(rlhf, 12)
    records = sample_rewards(model, tok, PROMPTS, lambda texts: [0.0] * len(texts), r, seed=4, batch_size=2,
                             journal=tmp_path / "j.jsonl", fp="x", desc="t")
    evaluated = [c for rec in records for c in rec["completions"]]
    ablated = sample_prompts(model, tok, PROMPTS, list(range(len(PROMPTS))), r, 4).texts
    expected = [by_hand(model, p, prompt_seed(4, i), r, tok.eos_token_id) for i, p in enumerate(PROMPTS)]
    assert any(len(e) < 12 for e in expected)
    assert evaluated == [tok.decode(e, skip_special_tokens=True) for e in expected]
    assert ablated == [tok.decode(p + e, skip_special_tokens=True) for p, e in zip(PROMPTS, expected)]


def test_ppo_rollouts_sample_through_the_rule(tiny):
    """The trainer's replacement of TRL's batch_generation returns what sampling.generate returns from the same RNG
    state, in TRL's shapes (query + response, right-padded across rollout chunks; tempered logits)."""
    from irm.rlhf.trainer import ResumablePPOTrainer

    model, tok = tiny
    pad = tok.pad_token_id
    queries = torch.tensor([[pad, pad, 11, 12], [21, 22, 23, 24], [pad, pad, pad, 31]])

    class Host:
        rule = SamplingRule(6, temperature=0.8)
        processing_class = tok
        _trunk = None  # no head-only critic
        _context_length = None

    torch.manual_seed(5)
    host = Host()
    seqs, logits = ResumablePPOTrainer._batch_generation(host, model, queries, 2, pad, None)
    assert host._context_length == queries.shape[1]  # the step's prompt width, where its response logits start
    torch.manual_seed(5)
    mask = queries[:2] != pad
    first, first_scores = generate(model, queries[:2].masked_fill(~mask, 0), mask.long(), Host.rule, tok,
                                   output_scores=True)
    assert torch.equal(seqs[:2, :first.shape[1]], torch.cat((queries[:2], first[:, 4:]), 1))
    torch.testing.assert_close(logits[:2, :first_scores.shape[1]], first_scores)
    assert seqs.shape[0] == logits.shape[0] == 3


def test_bad_rules_are_user_errors():
    for bad in (dict(max_new_tokens=0), dict(max_new_tokens=4, temperature=0), dict(max_new_tokens=4, top_p=0)):
        with pytest.raises(UserError):
            SamplingRule(**bad)
