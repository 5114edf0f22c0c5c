"""Ablation (paper 5.2, table 5): features are zeroed in the SAE's code space and only their decoder contribution
changes; the error-term splice with nothing ablated is the model itself; the controls and intervals are right; a
killed run resumes without redoing a batch; the stage writes every condition."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats
from scipy.linalg import hadamard

from irm.stats import difference_vs_draws, mean_ci, paired_difference
from irm.stages.ablate import (
    _random_summary,
    condition_rewards,
    draw_matched_features,
    feature_statistics,
    intervention,
    result_files,
    run,
)
from irm.artifacts import append_jsonl, read_jsonl
from irm.sampling import SamplingRule, prompt_seed, sample_prompts
from irm.sampling import _GumbelNoise as _per_prompt_sampler  # the per-prompt noise ablate's completions draw
from irm.config import ModelConfig
from irm.models import capture, load_model, splice
from irm.parallel import Ranks
from irm.sae import SparseAutoencoder, sae_dir, save_sae

torch.set_num_threads(1)
D = 64  # tiny model width (configs/tiny.yaml)
LAYERS = [1, 2]


@pytest.fixture(scope="module")
def tiny():
    model, tokenizer = load_model(ModelConfig(name="tiny-gpt-neox", tiny_layers=4, tiny_d_model=D), seed=0)
    batch = tokenizer(["the film was great and the music", "boring plot", "i love this actor"],
                      return_tensors="pt", padding=True)
    return model, tokenizer, batch


def random_sae(seed: int, d_hidden: int = D) -> SparseAutoencoder:
    """An SAE with random (not unit) decoder rows and non-zero biases, so no term of the maths can hide."""
    g = torch.Generator().manual_seed(seed)
    sae = SparseAutoencoder(D, d_hidden)
    with torch.no_grad():
        sae.W_dec.copy_(torch.randn(d_hidden, D, generator=g) * 0.5)
        sae.b_enc.copy_(torch.randn(d_hidden, generator=g) * 0.1)
        sae.b_dec.copy_(torch.randn(D, generator=g) * 0.1)
    return sae.eval().requires_grad_(False)


def hadamard_sae() -> SparseAutoencoder:
    """Identity-like SAE with known decoder rows: feature k reads and writes H[k] (a Hadamard row / 8, spread evenly
    over all 64 dimensions) and feature 64 + k reads and writes -H[k], so decode(encode(x)) = H^T H x = x."""
    h = torch.tensor(hadamard(D), dtype=torch.float32) / np.sqrt(D)
    sae = SparseAutoencoder(D, 2 * D)
    with torch.no_grad():
        sae.W_dec.copy_(torch.cat([h, -h]))
    return sae.eval().requires_grad_(False)


def logits(model, batch, fns=None):
    with torch.no_grad(), splice(model, fns or {}):
        return model(**batch).logits


def sae_codes_np(sae: SparseAutoencoder, x: np.ndarray) -> np.ndarray:
    """Codes computed in float64 numpy from the SAE's parameters: ReLU(x W_dec^T + b_enc) (tied)."""
    w = sae.W_dec.double().numpy()
    return np.maximum(x @ w.T + sae.b_enc.double().numpy(), 0.0)


# --- splicing maths --------------------------------------------------------------------------------------------


def test_error_splice_with_nothing_ablated_reproduces_the_models_logits_exactly(tiny):
    model, _, batch = tiny
    plain = logits(model, batch)
    saes = {layer: random_sae(layer) for layer in LAYERS}
    error = logits(model, batch, {layer: intervention(saes[layer], [], "error") for layer in LAYERS})
    assert torch.equal(error, plain)
    # The same SAEs in reconstruction mode do change the model: the equality above is not vacuous.
    recon = logits(model, batch, {layer: intervention(saes[layer], [], "reconstruction") for layer in LAYERS})
    assert not torch.allclose(recon, plain, atol=1e-3)


def test_reconstruction_splice_with_an_identity_like_sae_is_close_to_the_model(tiny):
    model, _, batch = tiny
    sae = hadamard_sae()
    recon = logits(model, batch, {layer: intervention(sae, [], "reconstruction") for layer in LAYERS})
    torch.testing.assert_close(recon, logits(model, batch), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("mode", ["reconstruction", "error"])
def test_ablating_a_feature_removes_exactly_its_decoder_contribution(tiny, mode):
    model, _, batch = tiny
    sae = random_sae(7)
    with torch.no_grad(), capture(model, [1]) as acts:
        model(**batch)
    x = acts[1]
    codes = sae_codes_np(sae, x.double().numpy())
    j, other = (int(i) for i in np.argsort(-(codes > 0).sum(axis=(0, 1)), kind="stable")[:2])  # fire often
    contribution = codes[..., [j]] * sae.W_dec[j].double().numpy()
    base = x.double().numpy() if mode == "error" else codes @ sae.W_dec.double().numpy() + sae.b_dec.double().numpy()
    got = intervention(sae, [j], mode)(x)
    np.testing.assert_allclose(got.double().numpy(), base - contribution, atol=1e-5)
    both = codes[..., [j, other]] @ sae.W_dec[[j, other]].double().numpy()
    np.testing.assert_allclose(intervention(sae, [j, other], mode)(x).double().numpy(), base - both, atol=1e-5)
    # Spliced into the model, layer 1 passes on exactly that output (activations before the splice are unchanged).
    with torch.no_grad(), splice(model, {1: intervention(sae, [j], mode)}), capture(model, [1]) as spliced:
        model(**batch)
    np.testing.assert_allclose(spliced[1].double().numpy(), base - contribution, atol=1e-5)


def test_ablation_zeroes_a_feature_not_a_dimension_of_the_reconstruction():
    """Feature k's decoder row is H[k], spread over every dimension. Zeroing the feature subtracts ReLU(x . H[k]) H[k]
    from all dimensions; the authors' bug (zeroing dimension k of the reconstruction) would leave the others alone."""
    sae, k = hadamard_sae(), 5
    x = torch.randn(3, 7, D, generator=torch.Generator().manual_seed(0))
    h_k = torch.tensor(hadamard(D)[k], dtype=torch.float64) / np.sqrt(D)
    code_k = torch.relu(x.double() @ h_k)
    got = intervention(sae, [k], "reconstruction")(x).double()
    torch.testing.assert_close(got, x.double() - code_k[..., None] * h_k, atol=1e-5, rtol=0)
    fired = code_k > 0
    assert fired.any() and (~fired).any()
    changed = (got - x.double()).abs() > 1e-6
    assert changed[fired].all()  # every dimension moves where the feature fired ...
    assert not changed[~fired].any()  # ... and nothing moves where it did not
    assert (got[..., k].abs() > 1e-3).all()  # dimension k is not zeroed


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


def test_random_control_intervals_pool_samples_average_draws_and_pair_prompts():
    rng = np.random.default_rng(2)
    before = rng.normal(1.0, 1.0, size=20)
    draws = before + rng.normal(-0.2, 0.5, size=(4, 20))
    sets = [{1: [i]} for i in range(4)]
    got = _random_summary(draws, sets, before)
    assert got["ci95"] == pytest.approx(list(stats.ttest_1samp(draws.ravel(), 0).confidence_interval(0.95)))
    assert got["per_draw_means"]["ci95"] == pytest.approx(
        list(stats.ttest_1samp(draws.mean(axis=1), 0).confidence_interval(0.95)))
    assert got["diff_vs_before"]["ci95"] == pytest.approx(
        list(stats.ttest_rel(draws.mean(axis=0), before).confidence_interval(0.95)))
    assert [d["features"] for d in got["draws"]] == [{"1": [i]} for i in range(4)]
    assert [d["mean"] for d in got["draws"]] == pytest.approx(draws.mean(axis=1).tolist())


def test_mean_ci_of_one_value_has_no_interval():
    assert mean_ci([2.0]) == {"mean": 2.0, "ci95": None, "std": 0.0, "n": 1}


# --- random control --------------------------------------------------------------------------------------------


def test_random_control_never_draws_labelled_or_dead_features_and_matches_their_count():
    rng = np.random.default_rng(0)
    freqs = {2: rng.uniform(0.01, 0.9, 16), 3: rng.uniform(0.01, 0.9, 8), 4: rng.uniform(0.01, 0.9, 8)}
    freqs[2][[1, 9]] = 0.0  # dead
    labelled = {2: [0, 5, 7], 3: [1], 4: []}
    draws = draw_matched_features(labelled, freqs, draws=50, seed=3, pool=20)
    assert len(draws) == 50
    for d in draws:
        assert {layer: len(ix) for layer, ix in d.items()} == {2: 3, 3: 1, 4: 0}
        for layer, ix in d.items():
            assert len(set(ix)) == len(ix)
            assert not set(ix) & set(labelled[layer])
            assert all(freqs[layer][i] > 0 for i in ix)
    # With a pool as large as the layer, every live unlabelled feature of layer 2 turns up.
    assert set().union(*(d[2] for d in draws)) == set(range(16)) - {0, 5, 7, 1, 9}


def test_random_control_matches_firing_frequencies():
    """Independent check: each drawn set's frequencies, sorted, sit next to the labelled ones' (every drawn feature
    is among the pool + k nearest live features of some labelled feature, by a plain sort here), and the draws are
    far closer in frequency than uniform draws would be."""
    rng = np.random.default_rng(1)
    freq = np.exp(rng.uniform(np.log(1e-3), 0.0, 400))  # log-uniform firing rates, as SAE features have
    freq[rng.choice(400, 40, replace=False)] = 0.0
    live = np.flatnonzero(freq > 0)
    labelled = sorted(int(i) for i in rng.choice(live, 5, replace=False))
    pool = 6
    draws = draw_matched_features({0: labelled}, {0: freq}, draws=40, seed=0, pool=pool)
    candidates = np.setdiff1d(live, labelled)
    near = set()
    for i in labelled:
        order = np.argsort(np.abs(np.log(freq[candidates]) - np.log(freq[i])))
        near |= set(candidates[order[: pool + len(labelled) - 1]].tolist())
    gaps = []
    for d in draws:
        assert set(d[0]) <= near
        gaps.append(np.abs(np.sort(np.log(freq[d[0]])) - np.sort(np.log(freq[labelled]))).mean())
    uniform = [np.abs(np.sort(np.log(freq[rng.choice(candidates, 5, replace=False)]))
                      - np.sort(np.log(freq[labelled]))).mean() for _ in range(200)]
    assert np.mean(gaps) < 0.2 * np.mean(uniform)
    # A labelled feature that never fires is matched with the rarest live features, never with a dead one.
    dead = int(np.flatnonzero(freq == 0)[0])
    for d in draw_matched_features({0: [dead]}, {0: freq}, draws=10, seed=0, pool=3):
        assert d[0][0] in set(candidates[np.argsort(freq[candidates])[:3]].tolist())


def test_random_draws_are_reproducible_and_adding_draws_keeps_the_earlier_ones():
    freqs = {1: np.linspace(0.01, 0.5, 32)}
    labelled = {1: [3, 4]}
    assert draw_matched_features(labelled, freqs, 5, 0, 8)[:3] == draw_matched_features(labelled, freqs, 3, 0, 8)
    assert draw_matched_features(labelled, freqs, 3, 0, 8) != draw_matched_features(labelled, freqs, 3, 1, 8)


def test_random_control_too_large_is_a_user_error():
    from irm.errors import UserError

    with pytest.raises(UserError, match="too few"):
        draw_matched_features({0: [0, 1, 2]}, {0: np.array([0.5, 0.5, 0.5, 0.5, 0.0])}, draws=1, seed=0, pool=5)


def test_feature_statistics_count_real_tokens_only(tiny):
    """Against a hand count on each unpadded prompt: left padding never counts as a token where a feature fires; the
    mean contribution is the mean code times the decoder row's norm over the input scale (numpy, float64)."""
    model, tokenizer, _ = tiny
    sae = random_sae(3)
    with torch.no_grad():
        sae.input_scale.fill_(2.5)
    prompts = [[11, 12, 13, 14, 15, 16], [21, 22, 23], [31, 32, 33, 34]]
    got, magnitudes = feature_statistics(model, tokenizer, {1: sae}, prompts, "mlp_out", batch_size=2)
    counts, sums, n = np.zeros(D), np.zeros(D), 0
    for ids in prompts:
        with torch.no_grad(), capture(model, [1]) as acts:
            model(input_ids=torch.tensor([ids]))
        codes = sae_codes_np(sae, 2.5 * acts[1][0].double().numpy())
        counts += (codes > 0).sum(axis=0)
        sums += codes.sum(axis=0)
        n += len(ids)
    np.testing.assert_allclose(got[1], counts / n)
    norms = np.linalg.norm(sae.W_dec.double().numpy(), axis=1) / 2.5
    np.testing.assert_allclose(magnitudes[1], sums / n * norms, rtol=1e-5)
    assert 0 < got[1].mean() < 1


def test_random_control_matches_mean_contribution_as_well_as_frequency():
    """Features of one firing frequency but contributions spread over three decades: with magnitudes the drawn
    features sit next to the labelled one's contribution (by a plain sort here); by frequency alone they do not."""
    rng = np.random.default_rng(7)
    n = 300
    freq = np.full(n, 0.1)
    magnitude = np.exp(rng.uniform(np.log(1e-3), 0.0, n))
    labelled = int(np.argmax(magnitude))  # the strongest writer
    both = draw_matched_features({0: [labelled]}, {0: freq}, draws=30, seed=0, pool=5, magnitudes={0: magnitude})
    alone = draw_matched_features({0: [labelled]}, {0: freq}, draws=30, seed=0, pool=5)
    top = set(np.argsort(-magnitude)[1:16].tolist())  # the 15 strongest other writers
    assert all(d[0][0] in top for d in both)
    assert np.mean([np.log(magnitude[d[0][0]]) for d in both]) > np.mean([np.log(magnitude[d[0][0]])
                                                                           for d in alone]) + 1.0


# --- paired differences ----------------------------------------------------------------------------------------


def test_ablated_minus_splice_is_scipys_paired_t():
    rng = np.random.default_rng(4)
    splice_r = rng.normal(1.0, 1.0, 30)
    ablated = splice_r - 0.4 + rng.normal(0, 0.3, 30)
    got = paired_difference(ablated, splice_r)
    res = stats.ttest_rel(ablated, splice_r)
    assert got["mean"] == pytest.approx((ablated - splice_r).mean())
    assert got["ci95"] == pytest.approx(list(res.confidence_interval(0.95)), rel=1e-12)
    assert got["p_value"] == pytest.approx(res.pvalue, rel=1e-12)


def test_difference_vs_draws_is_a_t_prediction_interval_over_draws():
    """Against scipy: the per-draw mean differences m_d, mean(m) +- t(D-1) sd(m) sqrt(1 + 1/D), and the matching
    two-sided p; the interval widens with the spread between draws, which a paired t over prompts ignores."""
    rng = np.random.default_rng(5)
    n_p = 40
    ablated = rng.normal(0.0, 1.0, n_p)
    noise = rng.normal(0.0, 0.2, (4, n_p))
    alike = ablated[None, :] + 0.3 + noise  # four draws that agree
    spread = alike + np.array([-1.5, -0.5, 0.5, 1.5])[:, None]  # same prompts, draws that disagree
    a, b = difference_vs_draws(ablated, alike), difference_vs_draws(ablated, spread)
    assert a["mean"] == pytest.approx(-0.3 - noise.mean()) and b["mean"] == pytest.approx(a["mean"])
    for draws, got in ((alike, a), (spread, b)):
        m = (ablated[None] - draws).mean(axis=1)
        scale = m.std(ddof=1) * np.sqrt(1 + 1 / len(m))
        half = stats.t.ppf(0.975, len(m) - 1) * scale
        assert got["ci95"] == pytest.approx([m.mean() - half, m.mean() + half], rel=1e-12)
        assert got["p_value"] == pytest.approx(2 * stats.t.sf(abs(m.mean()) / scale, len(m) - 1), rel=1e-10)
        assert got["between_draw_std"] == pytest.approx(m.std(ddof=1))
        # the same interval from scipy's one-sample t of the m_d, widened by sqrt(1 + D) (prediction, not mean)
        lo, hi = stats.ttest_1samp(m, 0.0).confidence_interval(0.95)
        assert got["ci95"][1] - got["ci95"][0] == pytest.approx((hi - lo) * np.sqrt(1 + len(m)), rel=1e-10)
    width = lambda r: r["ci95"][1] - r["ci95"][0]  # noqa: E731
    assert width(b) > 5 * width(a)
    t_lo, t_hi = mean_ci(ablated - spread.mean(axis=0))["ci95"]
    assert width(b) > 5 * (t_hi - t_lo)
    one = difference_vs_draws(ablated, alike[:1])
    assert one["ci95"] is None and one["between_draw_std"] is None and "one random draw" in one["interval"]


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


def test_generate_samples_exactly_new_tokens_from_the_policy_alone(tiny):
    """Against a hand-written loop (full forward each step, Gumbel noise from the prompt's own generator, argmax).
    The model's generation_config is booby-trapped: its eos is a token the loop samples, and it carries a repetition
    penalty; generate() must ignore both (fixed-length plain samples, as PPO drew them)."""
    model, tokenizer, _ = tiny
    prompts = [[11, 12, 13, 14, 15, 16], [21, 22, 23, 24]]
    seeds = [prompt_seed(5, i) for i in range(2)]
    new_tokens = 7

    def by_hand(prompt, seed):
        g, ids = torch.Generator().manual_seed(seed), list(prompt)
        with torch.no_grad():
            for _ in range(new_tokens):
                scores = model(torch.tensor([ids])).logits[0, -1].float()
                u = torch.rand(scores.shape[-1], generator=g).clamp_min(torch.finfo(torch.float32).tiny)
                ids.append(int((scores - torch.log(-torch.log(u))).argmax()))
        return ids

    expected = [by_hand(p, s) for p, s in zip(prompts, seeds)]
    config = model.generation_config
    trap = config.__class__.from_dict(config.to_dict())
    trap.eos_token_id, trap.repetition_penalty = expected[0][len(prompts[0]) + 1], 50.0
    model.generation_config = trap
    try:
        # ablate's sampler (irm.sampling.sample_prompts, prompt i with prompt_seed(5, i)); stops at the tokenizer's eos
        got = sample_prompts(model, tokenizer, prompts, [0, 1], SamplingRule(new_tokens), 5).texts
        assert model.generation_config is trap  # restored
    finally:
        model.generation_config = config
    assert got == [tokenizer.decode(ids, skip_special_tokens=True) for ids in expected]
    assert [len(t.split()) for t in got] == [len(p) + new_tokens for p in prompts]


# --- resume ----------------------------------------------------------------------------------------------------


def test_condition_rewards_resumes_without_redoing_a_finished_batch(tmp_path):
    directory = tmp_path / "ablate"
    calls, kill_at = [], {3}

    def score(indices):
        calls.append(list(indices))
        if len(calls) in kill_at:
            raise RuntimeError("killed")
        return [f"t{i}" for i in indices], [float(i) ** 2 for i in indices]

    with pytest.raises(RuntimeError, match="killed"):
        condition_rewards(Ranks(), directory, "cond", 10, 3, score, "test")
    assert calls == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    calls.clear()
    kill_at.clear()
    rewards = condition_rewards(Ranks(), directory, "cond", 10, 3, score, "test")
    assert calls == [[6, 7, 8], [9]]
    assert rewards.tolist() == [float(i) ** 2 for i in range(10)]
    calls.clear()
    assert condition_rewards(Ranks(), directory, "cond", 10, 3, score, "test").tolist() == rewards.tolist()
    assert calls == []
    assert [p.name for p in directory.iterdir()] == ["cond.jsonl"]  # one process: the single file


def test_condition_rewards_counts_every_ranks_file_of_an_earlier_run_and_no_other_conditions(tmp_path):
    """An earlier three-process run finished prompts in its per-rank files (one of them beside a single-process
    file of an older run); a one-process rerun generates only what none of them holds, into the single file."""
    directory = tmp_path / "ablate"
    append_jsonl(directory / "cond.rank-0.jsonl", {"prompts": [0, 1], "rewards": [0.5, 1.5], "texts": ["a", "b"]})
    append_jsonl(directory / "cond.rank-2.jsonl", {"prompts": [6, 7], "rewards": [6.5, 7.5], "texts": ["g", "h"]})
    append_jsonl(directory / "cond.jsonl", {"prompts": [3], "rewards": [3.5], "texts": ["d"]})
    append_jsonl(directory / "other.rank-1.jsonl", {"prompts": [2, 4, 5], "rewards": [9.0] * 3, "texts": ["x"] * 3})
    calls = []

    def score(indices):
        calls.append(list(indices))
        return [f"t{i}" for i in indices], [i + 0.5 for i in indices]

    rewards = condition_rewards(Ranks(), directory, "cond", 8, 2, score, "test")
    assert calls == [[2, 4], [5]]
    assert rewards.tolist() == [i + 0.5 for i in range(8)]
    assert [rec["prompts"] for rec in read_jsonl(directory / "cond.jsonl")] == [[3], [2, 4], [5]]
    assert [p.name for p in result_files(directory, "cond")] == ["cond.jsonl", "cond.rank-0.jsonl",
                                                                 "cond.rank-2.jsonl"]


# --- the stage -------------------------------------------------------------------------------------------------

RELATED = {1: [3, 10], 2: [7]}


def build_run(cfg, related: dict[int, list[int]]) -> None:
    """What `ablate` reads, made by hand: the tuned policy (a tiny model), x1 SAEs at the chosen layers and
    explanations.jsonl labelling `related` (every other explained feature labelled 0)."""
    root = Path(cfg.run_dir)
    model, tokenizer = load_model(cfg.model, seed=cfg.seed)
    model.save_pretrained(root / "rlhf" / "policy")
    tokenizer.save_pretrained(root / "rlhf" / "policy")
    lines = []
    for layer in LAYERS:
        save_sae(random_sae(layer), sae_dir(root, layer, 1), layer=layer)
    for layer in sorted(set(LAYERS) | set(related)):
        for index in range(12):
            label = int(index in related.get(layer, []))
            lines.append({"layer": layer, "dictionary": "x1", "role": "small", "index": index,
                          "explanation": "words", "label": label})
    (root / "explanations.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))


@pytest.fixture
def ablate_cfg(tiny_cfg):
    tiny_cfg.cache.layers = LAYERS
    a = tiny_cfg.ablate
    a.n_prompts, a.batch_size, a.new_tokens, a.prefix_tokens, a.random_draws = 12, 5, 6, 6, 2
    return tiny_cfg


def condition_files(cfg) -> dict:
    return {p.name: p.read_bytes() for p in sorted((Path(cfg.run_dir) / "ablate").glob("*.jsonl"))}


def test_ablate_writes_every_condition_with_paired_intervals(ablate_cfg):
    from irm.reward import build_reward
    from irm.stages import is_done

    cfg = ablate_cfg
    build_run(cfg, RELATED)
    result = run(cfg)
    saved = json.loads((Path(cfg.run_dir) / "ablation.json").read_text())
    assert saved == json.loads(json.dumps(result))
    assert saved["n_prompts"] == 12 and saved["new_tokens"] == 6
    assert saved["features"] == {"1": [3, 10], "2": [7]} and saved["n_features"] == 3
    assert set(saved["modes"]) == {"reconstruction", "error"}
    for conds in saved["modes"].values():
        assert set(conds) == {"splice", "ablated", "random", "ablated_minus_splice", "ablated_minus_random"}
        assert conds["ablated_minus_splice"]["mean"] == pytest.approx(conds["ablated"]["mean"]
                                                                      - conds["splice"]["mean"])
        assert conds["ablated_minus_random"]["mean"] == pytest.approx(conds["ablated"]["mean"]
                                                                      - conds["random"]["mean"])
        draws = conds["random"]["draws"]
        assert len(draws) == 2
        for d in draws:
            assert {k: len(v) for k, v in d["features"].items()} == {"1": 2, "2": 1}
            assert not set(d["features"]["1"]) & {3, 10} and 7 not in d["features"]["2"]
    assert saved["after"]["mean"] == saved["modes"]["reconstruction"]["ablated"]["mean"]
    assert saved["before"]["mean"] == saved["model"]["mean"]
    assert is_done(cfg, "ablate")
    assert len(condition_files(cfg)) == 1 + 2 * (2 + 2)  # model + per mode: splice, ablated, 2 random draws

    # Rewards recomputed from the stored texts; the interval recomputed with scipy from them.
    model_file = next(p for p in (Path(cfg.run_dir) / "ablate").glob("model-*.jsonl"))
    records = read_jsonl(model_file)
    assert [rec["prompts"] for rec in records] == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9], [10, 11]]
    texts = [t for rec in records for t in rec["texts"]]
    before = np.array([r for rec in records for r in rec["rewards"]])
    np.testing.assert_allclose(build_reward(cfg.reward)(texts), before)
    lo, hi = stats.ttest_1samp(before, 0.0).confidence_interval(0.95)
    assert saved["before"]["ci95"] == pytest.approx([lo, hi])

    # Error mode with nothing ablated is the model itself: identical samples, so identical rewards.
    err_splice = saved["modes"]["error"]["splice"]
    assert err_splice["mean"] == saved["model"]["mean"]
    assert err_splice["diff_vs_before"]["mean"] == 0.0


def test_ablate_rerun_redoes_only_the_lost_batch_and_reproduces_it(ablate_cfg):
    cfg = ablate_cfg
    build_run(cfg, RELATED)
    first = run(cfg)
    files = condition_files(cfg)
    # A kill while one condition's last batch was generating: that batch never reached the file.
    victim = Path(cfg.run_dir) / "ablate" / sorted(files)[3]
    lines = files[victim.name].decode().splitlines(keepends=True)
    victim.write_text("".join(lines[:-1]))
    second = run(cfg)
    assert second == first
    after = condition_files(cfg)
    assert after.keys() == files.keys()
    for name, content in files.items():
        if name != victim.name:
            assert after[name] == content  # untouched: nothing regenerated
    redone = read_jsonl(victim)
    assert [rec["prompts"] for rec in redone] == [json.loads(line)["prompts"] for line in lines]
    assert redone[-1] == json.loads(lines[-1])  # per-prompt seeds: the same texts and rewards again


def test_no_labelled_feature_still_runs_the_controls(ablate_cfg):
    cfg = ablate_cfg
    build_run(cfg, {})
    result = run(cfg)
    assert result["n_features"] == 0 and "no feature is labelled" in result["note"]
    for conds in result["modes"].values():
        assert conds["ablated"]["mean"] == conds["splice"]["mean"] == conds["random"]["mean"]
    # Identical interventions share one file: model + one splice per mode.
    assert len(condition_files(cfg)) == 3


def test_user_errors_name_the_fix(ablate_cfg):
    from irm.errors import UserError

    from irm.config import check_all

    cfg = ablate_cfg
    modes, cfg.ablate.modes = cfg.ablate.modes, ["dimensions"]
    with pytest.raises(UserError, match="subset of"):  # refused before any stage runs
        check_all(cfg, ["ablate"])
    cfg.ablate.modes = modes
    build_run(cfg, {3: [1]})  # explanations from a run whose chosen layers were different
    with pytest.raises(UserError, match="rerun `python -m irm explain`"):
        run(cfg)
    build_run(cfg, RELATED)
    cfg.ablate.n_prompts = 10_000
    with pytest.raises(UserError, match="lower ablate.n_prompts"):
        run(cfg)
    assert not (Path(cfg.run_dir) / "ablation.json").exists()


# --- planted worlds: positive and negative controls --------------------------------------------------------------

PLANT_LAYER = 3
POSITIVE_WORDS = ("great", "love", "excellent", "wonderful", "best", "amazing", "perfect", "beautiful")
REWARD_FEATURE, IRRELEVANT_FEATURE = 5, 9


def planted_run(cfg) -> None:
    """A tiny model whose last MLP adds a large constant along a zero-mean unit direction e, which the unembedding
    turns into positive lexicon words: its completions carry the reward. Layer 3's SAE has feature 5 reading and
    writing e (the reward-carrying feature: it fires on every token and ablating it removes the plant), feature 9
    reading e weakly and writing a direction orthogonal to e (fires on every token too, carries nothing), and random
    unit features elsewhere (those with a positive overlap with e fire on every token as well: the frequency-matched
    control)."""
    root = Path(cfg.run_dir)
    model, tokenizer = load_model(cfg.model, seed=cfg.seed)
    g = torch.Generator().manual_seed(11)
    e = torch.randn(D, generator=g)
    e -= e.mean()
    e /= e.norm()
    v = torch.randn(D, generator=g)
    v -= v.mean() + (v @ e) * e
    v /= v.norm()
    ids = [tokenizer.convert_tokens_to_ids(w) for w in POSITIVE_WORDS]
    assert tokenizer.unk_token_id not in ids
    with torch.no_grad():
        model.gpt_neox.layers[PLANT_LAYER].mlp.dense_4h_to_h.bias += 50.0 * e
        model.get_output_embeddings().weight[ids] += 3.0 * e
    model.save_pretrained(root / "rlhf" / "policy")
    tokenizer.save_pretrained(root / "rlhf" / "policy")
    sae = SparseAutoencoder(D, D, tied=False)
    with torch.no_grad():
        sae.W_enc[:, REWARD_FEATURE] = e
        sae.W_dec[REWARD_FEATURE] = e
        sae.W_enc[:, IRRELEVANT_FEATURE] = 0.05 * e
        sae.W_dec[IRRELEVANT_FEATURE] = v
    save_sae(sae, sae_dir(root, PLANT_LAYER, 1), layer=PLANT_LAYER)


def label(cfg, feature: int) -> None:
    lines = [{"layer": PLANT_LAYER, "dictionary": "x1", "role": "small", "index": i, "explanation": "words",
              "label": int(i == feature)} for i in range(D)]
    (Path(cfg.run_dir) / "explanations.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))


@pytest.fixture
def planted_cfg(tiny_cfg):
    tiny_cfg.cache.layers = [PLANT_LAYER]
    a = tiny_cfg.ablate
    a.n_prompts, a.batch_size, a.new_tokens, a.prefix_tokens, a.random_draws, a.modes = 16, 16, 6, 6, 3, ["error"]
    a.match_pool = 5
    planted_run(tiny_cfg)
    return tiny_cfg


def test_ablating_a_planted_reward_feature_lowers_the_reward_more_than_matched_random_features(planted_cfg):
    label(planted_cfg, REWARD_FEATURE)
    result = run(planted_cfg)
    assert result["feature_frequencies"] == {"3": [1.0]}
    conds = result["modes"]["error"]
    for d in conds["random"]["draws"]:  # matched: the controls fire on every token too
        assert d["frequencies"]["3"] == [1.0]
    assert result["model"]["mean"] > 2.0  # the plant makes the completions positive
    vs_random, vs_splice = conds["ablated_minus_random"], conds["ablated_minus_splice"]
    assert vs_random["ci95"][1] < -1.0 and vs_splice["ci95"][1] < -1.0
    assert vs_splice["p_value"] < 1e-3


def test_ablating_a_planted_irrelevant_feature_does_not(planted_cfg):
    label(planted_cfg, IRRELEVANT_FEATURE)
    result = run(planted_cfg)
    assert result["feature_frequencies"] == {"3": [1.0]}
    conds = result["modes"]["error"]
    vs_random = conds["ablated_minus_random"]
    # No drop beyond a small fraction of the planted feature's (about -4 in the test above), against either control.
    assert vs_random["ci95"][0] > -0.3 and abs(vs_random["mean"]) < 0.1
    assert conds["ablated_minus_splice"]["ci95"][0] > -0.3
