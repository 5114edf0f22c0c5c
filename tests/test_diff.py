"""Model diffing (irm.diff): Latent Scaling against numpy least squares, BatchTopK against a sort, the paired
datamodule's pairing, and crosscoders trained on planted worlds (irm.calibration.diff) that must find a tuned-only
direction, call nothing specific where there is none, and show the L1 loss's complete-shrinkage artifact."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from irm.diff.model import BASE, TUNED, Crosscoder, batch_topk
from irm.diff.scaling import (NU_MAX, SHARED, SPECIFIC, LatentScaling, classify, fractions, relative_norm_difference,
                              scaling_ratios)
from irm.errors import UserError


def _lstsq_beta(a_ND: np.ndarray, y_ND: np.ndarray) -> float:
    """The scale b minimising ||y - b a||^2 over all rows and dimensions, by numpy's least-squares solver."""
    return float(np.linalg.lstsq(a_ND.reshape(-1, 1), y_ND.reshape(-1), rcond=None)[0][0])


def test_latent_scaling_matches_numpy_least_squares_per_latent_and_model():
    rng = np.random.default_rng(0)
    rows, models, width, latents = 60, 2, 7, 5
    codes = rng.exponential(1.0, (rows, latents)) * (rng.random((rows, latents)) < 0.4)
    codes[:, 3] = 0.0  # a latent that never fires: no beta
    x = rng.normal(size=(rows, models, width))
    x_hat = x + 0.3 * rng.normal(size=x.shape)
    decoders = rng.normal(size=(latents, models, width))
    directions = decoders[:, TUNED]
    scaling = LatentScaling(torch.tensor(directions), torch.tensor(decoders))
    for part in (slice(0, 25), slice(25, rows)):  # streamed in two batches
        scaling.update(torch.tensor(codes[part]), torch.tensor(x[part]), torch.tensor(x_hat[part]))
    betas = scaling.betas()
    for j in range(latents):
        a = codes[:, j, None] * directions[j]  # the latent's contribution per row, [rows, width]
        for m in range(models):
            own = codes[:, j, None] * decoders[j, m]
            targets = {"activation": x[:, m], "error": x[:, m] - x_hat[:, m] + own,
                       "reconstruction": x_hat[:, m] - own}
            for name, y in targets.items():
                if j == 3:
                    assert np.isnan(betas[name][j, m])
                else:
                    assert betas[name][j, m] == pytest.approx(_lstsq_beta(a, y), rel=1e-9, abs=1e-12)


def test_latent_scaling_recovers_a_planted_scale():
    """A hand-made case: the base holds 0.3 of the latent's tuned contribution, the tuned all of it."""
    rng = np.random.default_rng(1)
    d = rng.normal(size=4)
    f = rng.exponential(1.0, 50)
    x = np.stack([0.3 * f[:, None] * d, f[:, None] * d], axis=1)
    scaling = LatentScaling(torch.tensor(d[None]), torch.tensor(np.stack([0.0 * d, d])[None]))
    scaling.update(torch.tensor(f[:, None]), torch.tensor(x), torch.tensor(np.zeros_like(x)))
    betas = scaling.betas()
    assert betas["activation"][0] == pytest.approx([0.3, 1.0])
    ratios = scaling_ratios(betas["error"], betas["reconstruction"])
    # error target: x - x_hat + f d^m = x (x_hat 0, base decoder 0; tuned: x + f d = 2 f d), so 0.3 / 2
    assert ratios["nu_error"][0] == pytest.approx(0.15)


def test_relative_norm_difference_and_classes_by_hand():
    norms = torch.tensor([[1.0, 1.0], [0.1, 1.0], [1.0, 0.05], [0.5, 1.0], [0.0, 0.0], [0.3, 1.0]])
    delta = relative_norm_difference(norms).numpy()
    assert delta == pytest.approx([0.0, 0.9, -0.95, 0.5, 0.0, 0.7])
    fired = np.array([True, True, True, True, False, True])
    assert list(classify(delta, fired)) == ["shared", "tuned-specific", "base-specific", "partial", "dead", "partial"]
    # Latent Scaling: the tuned-only latent 1 holds 0.5 of its contribution in the base -> an artifact
    nu_tuned = {"nu_error": np.full(6, 0.5), "nu_reconstruction": np.zeros(6)}
    nu_base = {"nu_error": np.zeros(6), "nu_reconstruction": np.full(6, 0.1)}
    classes = classify(delta, fired, nu_tuned, nu_base)
    assert list(classes) == ["shared", "tuned-only artifact", "base-specific", "partial", "dead", "partial"]
    assert fractions(classes)["shared"] == pytest.approx(1 / 6) and sum(fractions(classes).values()) == pytest.approx(1)
    assert SHARED < SPECIFIC and 0 < NU_MAX < 1


def test_batch_topk_keeps_the_k_times_rows_largest_scores_of_the_batch():
    rng = np.random.default_rng(2)
    pre = np.maximum(rng.normal(size=(6, 10)), 0)
    weight = rng.uniform(0.5, 2.0, 10)
    codes, smallest = batch_topk(torch.tensor(pre), torch.tensor(pre * weight), 3)
    scores = (pre * weight).ravel()
    cut = np.sort(scores)[::-1][18 - 1]  # the 18th largest of 60
    expected = np.where(pre * weight >= cut, pre, 0.0)
    np.testing.assert_allclose(codes.numpy(), expected)
    assert float(smallest) == pytest.approx(cut)
    assert (codes.numpy() > 0).sum() == 18  # rows take different numbers of latents, 3 on average
    assert len(set((codes.numpy() > 0).sum(axis=1))) > 1


def test_crosscoder_inference_threshold_replaces_the_batch():
    cc = Crosscoder(4, 8, activation="batchtopk", k=2)
    with torch.no_grad():
        cc.W_dec.mul_(torch.rand(8, 2, 1) * 3)  # latents of different decoder norms: the selection weighs by them
    x = torch.randn(16, 2, 4)
    assert torch.equal(cc.encode(x), cc.encode_normalized(x, batch=True))  # no threshold yet: the batch rule
    cc.update_threshold(torch.tensor(0.5))
    cc.update_threshold(torch.tensor(1.5))
    assert float(cc.threshold) == pytest.approx(0.99 * 0.5 + 0.01 * 1.5)
    pre = cc.pre_activations(x)
    score = pre * torch.linalg.vector_norm(cc.W_dec, dim=2).sum(dim=1)  # f_j (||d_j^base|| + ||d_j^tuned||)
    expected = torch.where(score > float(cc.threshold), pre, torch.zeros_like(pre))
    assert torch.equal(cc.encode(x), expected)
    assert not torch.equal(expected, torch.where(pre > float(cc.threshold), pre, torch.zeros_like(pre)))


def _pair_dirs(tmp_path, rows=300, width=5, shard_rows=64):
    """Two caches whose rows are tied: base row i = i * ones, tuned row i = 10 i * ones + 1."""
    from irm.calibration.diff import write_pair

    i = np.arange(rows, dtype=np.float64)[:, None] * np.ones(width)
    return write_pair(tmp_path, i, 10 * i + 1, shard_rows=shard_rows)


def test_paired_datamodule_keeps_base_and_tuned_rows_together_through_the_shuffle(tmp_path):
    from irm.diff.data import PairedDataModule

    base_dir, _ = _pair_dirs(tmp_path / "a", shard_rows=50)  # base sharded differently from the tuned
    _, tuned_dir = _pair_dirs(tmp_path / "b")
    data = PairedDataModule(str(base_dir), str(tuned_dir), batch_size=32, val_fraction=0.2, seed=3)
    data.setup("fit")
    train = torch.cat(list(data.train_dataloader()))
    assert train.shape[1:] == (2, 5)
    np.testing.assert_allclose(train[:, TUNED].numpy(), 10 * train[:, BASE].numpy() + 1)  # paired
    seen = sorted(train[:, BASE, 0].long().tolist())
    assert seen == list(range(data.split)) and seen != train[:, BASE, 0].long().tolist()  # every row, shuffled
    val = torch.cat(list(data.val_dataloader()))
    assert val[:, BASE, 0].long().tolist() == list(range(data.split, 300))
    # the difference view: tuned - base batches, and its cache reads the same differences
    diff = PairedDataModule(str(base_dir), str(tuned_dir), batch_size=32, val_fraction=0.2, seed=3, difference=True)
    diff.setup("fit")
    d = torch.cat(list(diff.train_dataloader()))
    np.testing.assert_allclose(d.numpy(), (train[:, TUNED] - train[:, BASE]).numpy())
    np.testing.assert_allclose(diff.cache.read_range(5, 7)["acts"].numpy(), [[46.0] * 5, [55.0] * 5])


def test_paired_cache_refuses_caches_of_different_tokens(tmp_path):
    from irm.activations.store import ShardWriter
    from irm.calibration.diff import write_pair
    from irm.diff.data import PairedCache

    base_dir, tuned_dir = write_pair(tmp_path, np.zeros((40, 3)), np.ones((40, 3)), shard_rows=16)
    other = ShardWriter(tmp_path / "other", 3, shard_rows=16)
    ids = torch.arange(40)
    other.add(torch.ones(40, 3), ids + 1, ids // 16, ids % 16)  # other token ids
    other.close(layer=0)
    with pytest.raises(UserError, match="different tokens"):
        PairedCache(base_dir, tmp_path / "other")
    short = write_pair(tmp_path / "short", np.zeros((30, 3)), np.zeros((30, 3)), shard_rows=16)[0]
    with pytest.raises(UserError, match="holds 30 rows"):
        PairedCache(short, tuned_dir)
    # shards of other sizes (another number of writing processes) pair by rows all the same
    resharded = write_pair(tmp_path / "resharded", np.zeros((40, 3)), np.zeros((40, 3)), shard_rows=7)[0]
    assert PairedCache(resharded, tuned_dir).rows == 40


# Crosscoders trained on planted worlds (irm.calibration.diff): 32 wide, 48 shared latents, 4096 tokens, 600 steps.

def _aligned(cc, direction, model=TUNED) -> int:
    """The latent whose `model` decoder row is closest in direction to `direction`."""
    d = cc.W_dec.detach()[:, model].double()
    return int(((d / d.norm(dim=1, keepdim=True)) @ torch.as_tensor(direction)).argmax())


def test_crosscoder_finds_the_direction_only_the_tuned_model_holds():
    from irm.calibration.diff import crosscode, found_cosine, paired_world

    w = paired_world(np.random.default_rng(0), {}, effect=1.0, turn=0.2, rescale=0.2)
    module, result = crosscode(w, {}, seed=0)
    specific = result["classes"] == "tuned-specific"
    assert specific.sum() == 1  # the planted latent, and nothing else
    assert found_cosine(module.crosscoder, w.planted, specific) > 0.9
    j = int(np.flatnonzero(specific)[0])
    assert result["delta"][j] >= SPECIFIC and abs(result["nu_tuned"]["nu_error"][j]) <= NU_MAX
    # along its tuned decoder the latent explains its own contribution in the tuned model: beta near 1
    assert result["betas"]["tuned"]["error"][j, TUNED] == pytest.approx(1.0, abs=0.15)
    assert result["fractions"]["tuned-specific"] == pytest.approx(1 / module.crosscoder.d_hidden)
    for name in ("base", "tuned"):  # both models reconstructed
        assert result["quality"][name]["explained_variance"] > 0.9


def test_crosscoder_calls_nothing_specific_when_the_tuned_model_only_turns_and_rescales_shared_latents():
    from irm.calibration.diff import crosscode, paired_world

    w = paired_world(np.random.default_rng(1), {}, turn=0.2, rescale=0.2)
    _, result = crosscode(w, {}, seed=1)
    assert result["fractions"]["tuned-specific"] == 0 and result["fractions"]["base-specific"] == 0
    assert result["fractions"]["shared"] > 0.5


def test_l1_crosscoder_shrinks_a_weak_base_decoder_that_batchtopk_keeps_and_latent_scaling_flags_it():
    """Complete shrinkage (Minder, Dumas et al. 2025): one latent fires in the base at a quarter of its tuned
    magnitude. Anthropic's L1 loss pushes its base decoder toward 0 (called tuned-only by the norms), BatchTopK keeps
    it near a quarter; Latent Scaling sees the base's quarter in the L1 crosscoder's error and calls it an artifact."""
    from irm.calibration.diff import crosscode, paired_world

    w = paired_world(np.random.default_rng(1), {}, turn=0.2, rescale=0.2, weak_in_base=0.25)
    ratios = {}
    for name, hparams in (("l1", {"activation": "relu", "l1_coefficient": 1.5, "learning_rate": 3e-3}),
                          ("batchtopk", {})):
        module, result = crosscode(w, {}, seed=1, **hparams)
        j = _aligned(module.crosscoder, w.shared[0])
        norms = result["norms"][j]
        ratios[name] = norms[BASE] / norms[TUNED]
        if name == "l1":
            assert result["delta"][j] >= SPECIFIC  # the norms alone say tuned-only
            assert result["classes"][j] == "tuned-only artifact"
            assert result["nu_tuned"]["nu_error"][j] == pytest.approx(0.25, abs=0.05)  # the base's true share
        else:
            assert result["delta"][j] < SPECIFIC and result["classes"][j] == "partial"
    assert ratios["l1"] < 0.6 * 0.25 and ratios["batchtopk"] == pytest.approx(0.25, abs=0.07)


def test_diff_sae_on_tuned_minus_base_finds_the_tuned_only_direction(tmp_path):
    """The baseline: an ordinary SAE (irm.sae's SAEModule) on the paired datamodule's differences."""
    from irm.calibration.diff import fit, paired_world, write_pair

    w = paired_world(np.random.default_rng(0), {}, effect=1.0, turn=0.2, rescale=0.2)
    module, _ = fit(*write_pair(tmp_path, w.base, w.tuned), steps=600, difference=True,
                    expansions=[2], activation="topk", k=4, learning_rate=1e-2, tied=False, center_input=True)
    d = module.saes["x2"].W_dec.detach().double()
    cos = ((d / d.norm(dim=1, keepdim=True)) @ torch.as_tensor(w.planted)).abs()
    assert float(cos.max()) > 0.9


# The diff stage's parts (irm.stages.diff); the stage itself runs once it is declared in irm.stages.

def test_base_cache_holds_the_base_model_at_the_tuned_cache_tokens(tiny_cfg):
    from irm.activations import ShardWriter, cache_layer_dir
    from irm.activations.collect import cache_activations
    from irm.data import corpus_fingerprint, load_texts
    from irm.diff.data import PairedCache
    from irm.stages.diff import base_cache
    from irm.models import capture, load_model

    tiny_cfg.corpus.n_documents = 40
    split, n = tiny_cfg.corpus.split, 12
    texts = load_texts(tiny_cfg.corpus, split, tiny_cfg.seed, n=n)
    tuned_model, tok = load_model(tiny_cfg.model, seed=1)  # another initialisation stands in for the tuned model
    writer = ShardWriter(cache_layer_dir(tiny_cfg.run_dir, 2), 64, shard_rows=50)
    cache_activations(tuned_model, tok, texts, {2: writer}, batch_size=5, max_length=16)
    writer.close(layer=2, site="mlp_out", split=split, documents=n, max_length=16,
                 corpus_fingerprint=corpus_fingerprint(tiny_cfg.corpus, split, tiny_cfg.seed))
    base_model, tok = load_model(tiny_cfg.model, seed=tiny_cfg.seed)
    out = base_cache(tiny_cfg, base_model, tok, [2], tmp_root := (cache_layer_dir(tiny_cfg.run_dir, 2).parent.parent
                                                                  / "diff" / "base-cache"))
    paired = PairedCache(out[2], cache_layer_dir(tiny_cfg.run_dir, 2))  # same tokens, row by row
    assert paired.base.manifest["activations_from"] == "base" and out[2].parent == tmp_root
    # the first document's rows are the base model's activations, read directly through a hook
    enc = tok(texts[0], return_tensors="pt", truncation=True, max_length=16)
    with torch.no_grad(), capture(base_model, [2]) as acts:
        base_model(**enc)
    rows = paired.read_range(0, enc["input_ids"].shape[1])
    np.testing.assert_allclose(rows["acts"][:, BASE].numpy(), acts[2][0].numpy(), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(rows["acts"][:, BASE], rows["acts"][:, TUNED])


def test_train_layer_writes_a_record_and_weights_that_agree(tmp_path):
    from safetensors.torch import load_file

    from irm.calibration.diff import paired_world, write_pair
    from irm.diff.config import DiffConfig
    from irm.diff.scaling import CLASSES
    from irm.stages.diff import CLASS_INDEX_KEY, train_layer

    w = paired_world(np.random.default_rng(0), {"rows": 1024}, effect=1.0)
    base_dir, tuned_dir = write_pair(tmp_path, w.base, w.tuned)
    d = DiffConfig(k=4, epochs=2, diff_sae_k=4, learning_rate=1e-2, trainer={"enable_progress_bar": False})
    assert d.check() == [] and DiffConfig(k=0, val_fraction=0).check()[0].startswith("diff.k")
    record = train_layer(d, base_dir, tuned_dir, 0, (False, False), tmp_path / "layer-00",
                         words=(_EverySeventh(), ["good"]))
    weights = load_file(str(tmp_path / "layer-00" / "crosscoder.safetensors"))
    assert weights["W_dec"].shape == (64, 2, 32) and record["latents"] == 64
    counts = np.bincount(weights[CLASS_INDEX_KEY].numpy(), minlength=len(CLASSES)) / 64
    assert dict(zip(CLASSES, counts)) == pytest.approx(record["fractions"])
    # held out: the last 10% (from row 921), moved back to the start of its 16-token document (912)
    assert record["held_out_rows"] == 1024 - 912 and record["steps"] == 2 * 4  # 4 batches of 256 a epoch
    assert 0 < record["diff_sae"]["explained_variance"] <= 1 and record["diff_sae"]["latents"] == 64
    # every latent's share of activation on the marked tokens (ids divisible by 7), against one pass over every
    # row with the saved crosscoder
    from irm.diff.model import Crosscoder

    cc = Crosscoder(32, 64, activation="batchtopk", k=4)
    cc.load_state_dict({k: v for k, v in weights.items() if k in cc.state_dict()})
    x = torch.stack([torch.as_tensor(w.base), torch.as_tensor(w.tuned)], dim=1).float()
    with torch.no_grad():
        codes = cc.encode(x).double().numpy()
    marked = (np.arange(1024) % 7) == 0
    mass = codes.sum(axis=0)
    expected = np.where(mass > 0, codes[marked].sum(axis=0) / np.where(mass > 0, mass, 1), np.nan)
    got = np.array([np.nan if v is None else v for v in record["word_share"]])
    assert np.allclose(got, expected, equal_nan=True, atol=1e-6)
    assert record["marked_rows"] == pytest.approx(marked.mean())
    assert set(record["tuned_specific_words"]) == {str(j) for j in record["tuned_specific"]}


class _EverySeventh:
    """A vocabulary whose every seventh token spells "good"."""

    def decode(self, ids):
        return " good" if ids[0] % 7 == 0 else " other"
