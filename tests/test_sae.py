"""Sparse autoencoders (paper 4.2, appendix D): the maths against numpy, recovery of planted directions through the
Lightning fit, the logged statistics, export/load in SAELens's layout, resuming, and the stage and CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import yaml

from irm.activations import ShardWriter
from irm.activations.datamodule import ActivationDataModule
from irm.config import SAEConfig
from irm.errors import UserError
from irm.sae import ExportSAEs, SAEModule, SparseAutoencoder, load_sae, sae_dir, save_sae
from irm.sae.model import moment_metrics, row_moments, sae_loss
from irm.sae.module import FeatureActivity

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def one_thread():
    torch.set_num_threads(1)  # the machine's cores are shared; tiny tensors gain nothing from threads


def random_sae(d_in: int, d_hidden: int, tied: bool, seed: int = 0) -> SparseAutoencoder:
    torch.manual_seed(seed)
    sae = SparseAutoencoder(d_in, d_hidden, tied=tied)
    with torch.no_grad():  # non-zero biases, so no term of the maths can hide
        sae.b_enc.normal_(0, 0.3)
        sae.b_dec.normal_(0, 0.3)
    return sae


def planted_cache(layer_dir: Path, d: int = 32, k: int = 24, n: int = 16000, seed: int = 0, shard_rows: int = 3000,
                  scale: float = 1.0, first_scale: float = 1.0):
    """Activations that are sparse non-negative combinations (about 3 of k active) of k random unit directions
    (times `scale`; each document's first row times `first_scale` as well); returns the directions. Documents of
    20 rows."""
    g = torch.Generator().manual_seed(seed)
    truth_KD = torch.randn(k, d, generator=g)
    truth_KD /= truth_KD.norm(dim=1, keepdim=True)
    coef_NK = (torch.rand(n, k, generator=g) < 3 / k).float() * (0.5 + torch.rand(n, k, generator=g))
    writer = ShardWriter(layer_dir, d, shard_rows=shard_rows)
    row = torch.arange(n)
    acts = scale * coef_NK @ truth_KD
    acts[row % 20 == 0] *= first_scale
    writer.add(acts, torch.zeros(n, dtype=torch.int64), row // 20, row % 20)
    writer.close(model="planted", layer=int(layer_dir.name.split("-")[-1]), site="mlp_out", max_length=20)
    return truth_KD


def mmcs_np(truth: np.ndarray, learned: np.ndarray) -> float:
    """Mean over true directions of the best cosine with any learned direction (paper eq. 2)."""
    t = truth / np.linalg.norm(truth, axis=1, keepdims=True)
    d = learned / np.linalg.norm(learned, axis=1, keepdims=True)
    return float((t @ d.T).max(axis=1).mean())


def trainer(tmp_path: Path, **kw) -> L.Trainer:
    args = dict(accelerator="cpu", devices=1, max_epochs=1, enable_progress_bar=False, enable_model_summary=False,
                logger=False, enable_checkpointing=False, num_sanity_val_steps=0)
    args.update(kw)
    return L.Trainer(default_root_dir=str(tmp_path), **args)


# ---------------------------------------------------------------------------------------------- maths


@pytest.mark.parametrize("tied", [True, False])
def test_forward_is_relu_encoder_then_linear_decoder(tied):
    sae = random_sae(6, 10, tied)
    x = torch.randn(3, 5, 6)  # any leading dimensions
    x_hat, codes = sae(x)
    W_dec, b_enc, b_dec = (p.detach().double().numpy() for p in (sae.W_dec, sae.b_enc, sae.b_dec))
    W_enc = W_dec.T if tied else sae.W_enc.detach().double().numpy()
    f = np.maximum(x.double().numpy() @ W_enc + b_enc, 0.0)
    np.testing.assert_allclose(codes.detach().numpy(), f, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(x_hat.detach().numpy(), f @ W_dec + b_dec, rtol=1e-5, atol=1e-6)
    assert torch.equal(sae.encode(x), codes) and torch.equal(sae.decode(codes), x_hat)
    assert sae.dictionary.shape == (10, 6) and not sae.dictionary.requires_grad
    assert (sae.W_enc is None) == tied
    assert sum(p.numel() for p in sae.parameters()) == 10 * 6 * (1 if tied else 2) + 10 + 6


def test_loss_is_mse_plus_alpha_times_mean_row_l1():
    sae = random_sae(6, 10, tied=True)
    x = torch.randn(7, 6)
    x_hat, codes = sae(x)
    loss, mse, l1 = sae_loss(x, x_hat, codes, 0.25)
    xn, xh, f = x.numpy(), x_hat.detach().numpy(), codes.detach().numpy()
    assert mse.item() == pytest.approx(((xn - xh) ** 2).mean(), rel=1e-5)
    assert l1.item() == pytest.approx(np.abs(f).sum(axis=1).mean(), rel=1e-5)
    assert loss.item() == pytest.approx(((xn - xh) ** 2).mean() + 0.25 * np.abs(f).sum(axis=1).mean(), rel=1e-5)


def test_logged_statistics_against_numpy():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 4, generator=g) * torch.tensor([1.0, 2.0, 0.5, 3.0]) + 1.0
    x_hat = x + 0.3 * torch.randn(50, 4, generator=g) + 0.2  # an error with a bias: nmse and explained variance differ
    codes = torch.relu(torch.randn(50, 7, generator=g))
    stats = moment_metrics(row_moments(x, x_hat, codes))
    xn, err, f = x.double().numpy(), (x - x_hat).double().numpy(), codes.double().numpy()
    expected = {"mse": (err ** 2).mean(), "nmse": (err ** 2).mean() / xn.var(axis=0).mean(),
                "explained_variance": 1 - err.var(axis=0).sum() / xn.var(axis=0).sum(),
                "l1": f.sum(axis=1).mean(), "l0": (f > 0).sum(axis=1).mean()}
    assert {k: v.item() for k, v in stats.items()} == pytest.approx(expected, rel=1e-9)
    assert stats["explained_variance"].item() > 1 - stats["nmse"].item()


def test_untied_decoder_rows_are_renormalised():
    sae = random_sae(6, 10, tied=False)
    with torch.no_grad():
        sae.W_dec.mul_(torch.arange(1.0, 11.0).unsqueeze(1))
    sae.normalize_decoder_()
    np.testing.assert_allclose(sae.W_dec.norm(dim=1).detach().numpy(), np.ones(10), rtol=1e-6)


def test_dead_features_are_those_silent_for_the_whole_window():
    activity = FeatureActivity(4)
    codes = lambda *on: torch.tensor([[1.0 if i in on else 0.0 for i in range(4)]])  # noqa: E731
    for _ in range(10):
        activity.observe(codes(0, 1))
    assert activity.dead_fraction(window=25).item() == 0.0  # nothing silent for 25 steps yet
    for _ in range(20):
        activity.observe(codes(1))
    assert activity.dead_fraction(window=25).item() == 0.5  # features 2, 3 silent for 30 steps
    for _ in range(10):
        activity.observe(codes(2))
    assert activity.dead(window=25).tolist() == [True, False, False, True]  # 0 silent for 30 steps, 1 for 10
    assert activity.steps_since_fired.tolist() == [30, 10, 0, 40]


def test_input_scale_maps_raw_activations_into_the_normalised_space():
    sae = random_sae(6, 10, tied=False)
    with torch.no_grad():
        sae.input_scale.fill_(3.0)
    x = torch.randn(5, 6)
    W_dec, b_enc, b_dec = (p.detach().double().numpy() for p in (sae.W_dec, sae.b_enc, sae.b_dec))
    W_enc = sae.W_enc.detach().double().numpy()
    f = np.maximum(3.0 * x.double().numpy() @ W_enc + b_enc, 0.0)
    np.testing.assert_allclose(sae.encode(x).detach().numpy(), f, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(sae.decode(sae.encode(x)).detach().numpy(), (f @ W_dec + b_dec) / 3.0, rtol=1e-5,
                               atol=1e-6)
    assert torch.allclose(sae.encode_normalized(3.0 * x), sae.encode(x))


def test_centred_encoder_reads_x_minus_b_dec():
    sae = random_sae(6, 10, tied=True)
    sae.center_input = True
    x = torch.randn(5, 6)
    W_dec, b_enc, b_dec = (p.detach().double().numpy() for p in (sae.W_dec, sae.b_enc, sae.b_dec))
    f = np.maximum((x.double().numpy() - b_dec) @ W_dec.T + b_enc, 0.0)
    np.testing.assert_allclose(sae.encode(x).detach().numpy(), f, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(sae(x)[0].detach().numpy(), f @ W_dec + b_dec, rtol=1e-5, atol=1e-6)


def test_topk_keeps_exactly_k_codes_the_largest_ones():
    torch.manual_seed(0)
    sae = SparseAutoencoder(8, 32, tied=False, activation="topk", k=5)
    with torch.no_grad():
        sae.b_enc.fill_(10.0)  # every pre-activation positive: exactly k survive
    x = torch.randn(3, 7, 8)
    codes = sae.encode(x)
    assert ((codes > 0).sum(dim=-1) == 5).all()
    pre = torch.relu(x @ sae.W_enc + sae.b_enc).detach()
    kth = pre.sort(dim=-1, descending=True).values[..., 4:5]
    kept = codes > 0
    assert torch.equal(codes[kept], pre[kept]) and (pre[kept.logical_not()] <= kth.expand_as(pre)[~kept]).all()
    with pytest.raises(ValueError, match="k <= d_hidden"):
        SparseAutoencoder(8, 4, activation="topk", k=5)


def test_auxk_loss_reaches_only_dead_features_and_matches_numpy():
    from irm.sae.model import auxk_loss

    torch.manual_seed(1)
    sae = SparseAutoencoder(6, 12, tied=False, activation="topk", k=2)
    x = torch.randn(9, 6)
    pre = sae.pre_activations(x)
    x_hat = sae.decode_normalized(sae.codes_from_pre(pre))
    dead = torch.zeros(12, dtype=torch.bool)
    dead[[1, 4, 7, 10]] = True
    loss = auxk_loss(sae, x, x_hat, pre, dead, k_aux=3)
    # numpy: top-3 dead pre-activations per row reconstruct the residual, / total variance, scale min(4/3, 1)
    pre_n, r = pre.detach().numpy(), (x - x_hat).detach().numpy()
    aux = np.zeros_like(pre_n)
    for i in range(9):
        idx = [j for j in np.argsort(-pre_n[i]) if dead[j]][:3]
        aux[i, idx] = pre_n[i, idx]
    r_hat = aux @ sae.W_dec.detach().numpy()
    expected = ((r_hat - r) ** 2).sum(1).mean() / ((r - r.mean(0)) ** 2).sum(1).mean()
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    loss.backward()
    assert (sae.W_dec.grad[~dead] == 0).all() and (sae.W_dec.grad[dead] != 0).any()
    assert auxk_loss(sae, x, x_hat, pre, torch.zeros(12, dtype=torch.bool), 3).item() == 0.0


# ---------------------------------------------------------------------------------------------- training


@pytest.mark.parametrize("settings", [dict(l1_coefficient=3e-2), dict(activation="topk", k=4)],
                         ids=["relu-l1", "topk"])
def test_fit_recovers_planted_directions_in_both_dictionaries(tmp_path, settings):
    from irm.sae.comparison import chance_mmcs

    layer_dir = tmp_path / "run" / "cache" / "layer-03"
    truth = planted_cache(layer_dir, scale=40.0)  # raw activations far from unit scale: normalisation must cope
    torch.manual_seed(0)
    module = SAEModule(SAEConfig(expansions=[1, 2], learning_rate=3e-3, dead_window=50, **settings))
    data = ActivationDataModule(str(layer_dir), SAEConfig(batch_size=64, val_fraction=0.05))
    trainer(tmp_path, max_epochs=4, callbacks=[ExportSAEs()]).fit(module, data)
    for e in (1, 2):
        sae = load_sae(sae_dir(tmp_path / "run", 3, e), d_in=32)  # ExportSAEs found <run_dir>/sae/layer-03 itself
        assert sae.dictionary.shape == (32 * e, 32)
        score = mmcs_np(truth.numpy(), sae.dictionary.numpy())
        chance = chance_mmcs(24, 32 * e, 32, draws=5)["max"]
        print(f"{settings} x{e}: MMCS with the planted directions {score:.3f}, chance "
              f"{chance['mean']:.3f} +- {chance['std']:.3f}")
        assert score >= 0.9 and score > chance["mean"] + 0.3
        torch.testing.assert_close(sae.dictionary, module.saes[f"x{e}"].dictionary)  # up to float32 folding
        x = data.cache.read_range(15200, 16000)["acts"]  # held out: the last 5% of rows
        stats = moment_metrics(row_moments(x, *sae(x)))
        print(f"  held-out explained variance {stats['explained_variance']:.3f}, L0 {stats['l0']:.2f}")
        assert stats["explained_variance"] > 0.85 and stats["l0"] <= (4 if "k" in settings else 8)
    cfg = json.loads((sae_dir(tmp_path / "run", 3, 2) / "cfg.json").read_text())["irm"]
    assert cfg["init_mmcs"]["max"] == pytest.approx(module.init_mmcs[0].item())
    assert cfg["init_mmcs"]["max"] < 0.6  # random directions at initialisation


def test_fit_normalises_by_the_training_rows_mean_norm_and_keeps_decoder_rows_unit(tmp_path):
    layer_dir = tmp_path / "cache" / "layer-00"
    planted_cache(layer_dir, n=2000, scale=7.0, first_scale=100.0)
    data = ActivationDataModule(str(layer_dir), SAEConfig(batch_size=32, val_fraction=0.1))
    rows = data.cache.read_range(0, data.split)  # the training rows only
    x = rows["acts"].double().numpy()
    # first tokens 100x larger (an attention sink, planted_cache's first_scale): left out of the estimate
    later = rows["positions"].numpy() > 0
    expected = np.sqrt(32) / np.linalg.norm(x[later], axis=1).mean()
    for tied in (True, False):
        module = SAEModule(SAEConfig(expansions=[1, 2], tied=tied, l1_coefficient=1e-2))
        trainer(tmp_path).fit(module, data)
        for sae in module.saes.values():
            assert sae.input_scale.item() == pytest.approx(expected, rel=1e-6)
            np.testing.assert_allclose(sae.W_dec.norm(dim=1).detach().numpy(), 1.0, rtol=1e-5)
        # The same SAE computes the same thing on raw activations after export and load.
        save_sae(module.saes["x2"], tmp_path / f"export-{tied}")
        loaded = load_sae(tmp_path / f"export-{tied}")
        raw = torch.as_tensor(x[:50], dtype=torch.float32)
        torch.testing.assert_close(loaded(raw)[0], module.saes["x2"](raw)[0].detach(), rtol=1e-4, atol=1e-4)
    off = SAEModule(SAEConfig(expansions=[1], normalize=False))
    trainer(tmp_path).fit(off, data)
    assert off.saes["x1"].input_scale.item() == 1.0


def test_resampling_revives_dead_features(tmp_path):
    layer_dir = tmp_path / "cache" / "layer-00"
    planted_cache(layer_dir, n=6000)
    dead_fractions = {}
    for revive in ("none", "resample"):
        torch.manual_seed(0)
        module = SAEModule(SAEConfig(expansions=[2], l1_coefficient=1e-2, learning_rate=1e-3, dead_window=20,
                                     revive=revive, resample_until=0.6), d_in=32)
        with torch.no_grad():  # half the features start dead: they never fire on anything
            module.saes["x2"].b_enc[:32] = -1e3
        t = trainer(tmp_path, max_epochs=2)
        t.fit(module, ActivationDataModule(str(layer_dir), SAEConfig(batch_size=64)))
        codes = module.saes["x2"].encode(t.datamodule.cache.read_range(5700, 6000)["acts"])
        dead_fractions[revive] = (codes[:, :32] > 0).any(dim=0).logical_not().float().mean().item()
    assert dead_fractions["none"] == 1.0  # nothing brings them back by itself
    assert dead_fractions["resample"] <= 0.25, dead_fractions


def test_training_statistics_land_in_tensorboard(tmp_path):
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    layer_dir = tmp_path / "cache" / "layer-00"
    planted_cache(layer_dir, n=2000)
    module = SAEModule(SAEConfig(expansions=[1, 2], dead_window=5))
    data = ActivationDataModule(str(layer_dir), SAEConfig(batch_size=32))
    logger = TensorBoardLogger(str(tmp_path / "logs"), name="run", version="sae/layer-00")
    trainer(tmp_path, logger=logger, log_every_n_steps=10).fit(module, data)
    acc = EventAccumulator(str(tmp_path / "logs" / "run" / "sae" / "layer-00"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    stats = ("mse", "nmse", "l1", "l0", "dead_fraction", "explained_variance")
    for stage in ("train", "val"):
        assert {f"{stage}/x{e}/{s}" for e in (1, 2) for s in stats} <= tags
    steps = [e.step for e in acc.Scalars("train/x2/l0")]
    assert steps == list(range(9, len(data.train_dataloader()), 10))  # every log_every_n_steps, no more
    assert all(0 <= e.value <= 64 for e in acc.Scalars("train/x2/l0"))


def test_bf16_mixed_precision_trains(tmp_path):
    layer_dir = tmp_path / "cache" / "layer-00"
    planted_cache(layer_dir, n=3000)
    module = SAEModule(SAEConfig(expansions=[1]), d_in=32)
    data = ActivationDataModule(str(layer_dir), SAEConfig(batch_size=64))
    x = data.cache.read_range(0, 500)["acts"]
    before = sae_loss(x, *module.saes["x1"](x), 1e-3)[1].item()
    trainer(tmp_path, precision="bf16-mixed", max_epochs=2).fit(module, data)
    assert module.saes["x1"].W_dec.dtype == torch.float32
    assert sae_loss(x, *module.saes["x1"](x), 1e-3)[1].item() < 0.5 * before


class Crash(L.Callback):
    """Stands in for a kill: stops the fit with an exception after `step` optimizer steps."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            raise RuntimeError("killed")


def test_fit_interrupted_mid_epoch_resumes_to_the_uninterrupted_result(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    layer_dir = tmp_path / "cache" / "layer-00"
    planted_cache(layer_dir, n=1500, shard_rows=400)

    def fit(name, ckpt_path=None, crash=None):
        torch.manual_seed(0)
        module = SAEModule(SAEConfig(expansions=[1, 2], dead_window=7), d_in=32)
        data = ActivationDataModule(str(layer_dir), SAEConfig(batch_size=32), seed=4)
        ckpt = ModelCheckpoint(dirpath=str(tmp_path / name), save_last=True, every_n_train_steps=10)
        t = trainer(tmp_path, max_epochs=3, callbacks=[ckpt] + ([Crash(crash)] if crash else []),
                    enable_checkpointing=True, log_every_n_steps=4)
        t.fit(module, data, ckpt_path=ckpt_path)
        return t, module

    full, full_module = fit("full")
    steps_per_epoch = len(full.train_dataloader)
    assert full.global_step == 3 * steps_per_epoch
    crash = steps_per_epoch + 17
    with pytest.raises(RuntimeError, match="killed"):
        fit("cut", crash=crash)
    saved = torch.load(tmp_path / "cut" / "last.ckpt", weights_only=False)["global_step"]
    assert saved == 10 * (crash // 10) < crash and saved % steps_per_epoch  # in the second epoch, not at its end
    resumed, module = fit("cut", ckpt_path="last")
    assert resumed.global_step == full.global_step
    for key, value in full_module.state_dict().items():
        assert torch.equal(value, module.state_dict()[key]), key  # same batches, same order, same Adam state


def test_grouped_batches_give_the_same_training_as_single_batches(tmp_path):
    layer_dir = tmp_path / "cache" / "layer-00"
    planted_cache(layer_dir, n=1200, shard_rows=400)
    results = []
    for per_item in (1, 5):
        torch.manual_seed(0)
        sae = SAEConfig(expansions=[1, 2], dead_window=3, batch_size=16, batches_per_item=per_item)
        module = SAEModule(sae, d_in=32)
        t = trainer(tmp_path, max_epochs=2, log_every_n_steps=2)
        t.fit(module, ActivationDataModule(str(layer_dir), sae))
        results.append((t.global_step, module.state_dict()))
    (steps, single), (grouped_steps, grouped) = results
    assert steps == grouped_steps == 2 * int(np.ceil(1140 / 16))  # optimizer steps, whatever the grouping
    for key, value in single.items():
        if "activity" not in key:  # firing history is stamped at logging steps, which count loader items
            assert torch.equal(value, grouped[key]), key


def test_checkpoint_of_another_width_is_refused(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    planted_cache(tmp_path / "cache" / "layer-00", d=32, n=600)
    planted_cache(tmp_path / "cache" / "layer-01", d=16, k=12, n=600)
    ckpt = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_last=True)
    trainer(tmp_path, callbacks=[ckpt], enable_checkpointing=True).fit(
        SAEModule(SAEConfig()), ActivationDataModule(str(tmp_path / "cache" / "layer-00"), SAEConfig(batch_size=64)))
    with pytest.raises(UserError, match="is 32 wide but this layer's activations are 16 wide"):
        trainer(tmp_path).fit(SAEModule(SAEConfig()),
                              ActivationDataModule(str(tmp_path / "cache" / "layer-01"), SAEConfig(batch_size=64)),
                              ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    with pytest.raises(UserError, match="SAEs are 8 wide"):
        trainer(tmp_path).fit(SAEModule(SAEConfig(), d_in=8),
                              ActivationDataModule(str(tmp_path / "cache" / "layer-01"), SAEConfig()))


# ---------------------------------------------------------------------------------------------- export


@pytest.mark.parametrize("tied", [True, False])
def test_export_round_trip_in_saelens_layout(tmp_path, tied):
    from safetensors.torch import load_file

    sae = random_sae(8, 16, tied)
    with torch.no_grad():
        sae.input_scale.fill_(2.5)  # trained on raw activations x 2.5: the export must act on raw activations
    save_sae(sae, tmp_path / "x2", layer=5, site="mlp_out", model_name="tiny", context_size=32)
    weights = load_file(str(tmp_path / "x2" / "sae_weights.safetensors"))
    assert {k: tuple(v.shape) for k, v in weights.items()} == {
        "W_enc": (8, 16), "b_enc": (16,), "W_dec": (16, 8), "b_dec": (8,)}
    cfg = json.loads((tmp_path / "x2" / "cfg.json").read_text())
    assert (cfg["d_in"], cfg["d_sae"], cfg["hook_name"], cfg["apply_b_dec_to_input"]) == (
        8, 16, "blocks.5.hook_mlp_out", False)
    # The factor is folded into the weights (as SAELens folds it), and kept so load_sae restores the training space.
    assert cfg["normalize_activations"] == "none" and cfg["irm"]["input_scale"] == 2.5
    # SAELens's standard SAE maths, written out from the exported tensors alone
    x = torch.randn(4, 8)
    f = torch.relu(x @ weights["W_enc"] + weights["b_enc"])
    loaded = load_sae(tmp_path / "x2")
    assert not loaded.training and loaded.tied == tied
    torch.testing.assert_close(loaded(x)[0], f @ weights["W_dec"] + weights["b_dec"])
    torch.testing.assert_close(loaded(x)[0], sae(x)[0].detach())
    # ... which is the normalised-space computation the SAE was trained with, mapped back to raw activations
    torch.testing.assert_close(loaded(x)[0], sae.decode_normalized(sae.encode_normalized(2.5 * x)).detach() / 2.5)
    assert loaded.input_scale.item() == 2.5
    torch.testing.assert_close(loaded.W_dec, sae.W_dec.detach())  # normalised-space weights restored
    with pytest.raises(UserError, match="trained on 8-wide activations but this layer's are 12 wide"):
        load_sae(tmp_path / "x2", d_in=12)
    with pytest.raises(UserError, match="run `python -m irm sae` first"):
        load_sae(tmp_path / "x9")


@pytest.mark.parametrize("activation,center", [("relu", False), ("topk", False), ("topk", True)])
def test_saelens_reads_the_export(tmp_path, activation, center):
    sae_lens = pytest.importorskip("sae_lens")
    torch.manual_seed(0)
    sae = SparseAutoencoder(8, 16, tied=activation == "relu", activation=activation, k=3, center_input=center)
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.3)
        sae.b_dec.normal_(0, 0.3)
        sae.input_scale.fill_(2.5)  # normalisation folded into the weights: SAELens reads raw activations too
    save_sae(sae, tmp_path / "x2", layer=1)
    theirs = sae_lens.SAE.load_from_disk(str(tmp_path / "x2"), device="cpu")
    assert type(theirs).__name__ == ("TopKSAE" if activation == "topk" else "StandardSAE")
    x = torch.randn(4, 8)
    torch.testing.assert_close(theirs(x), sae(x)[0].detach(), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------- stage and CLI


def test_sae_stage_trains_every_chosen_layer_then_resumes_instead_of_retraining(tiny_cfg):
    from irm.stages.sae import run
    from irm.stages import is_done
    from test_activations import save_policy

    from irm.stages.cache import run as cache_run

    cfg = tiny_cfg
    cfg.cache.layers, cfg.cache.n_documents = [0, 2], 60
    cfg.sae.epochs, cfg.sae.checkpoint_every = 1, 10
    save_policy(cfg)
    cache_run(cfg)
    run(cfg)
    assert is_done(cfg, "sae")
    for layer in (0, 2):
        for e in (1, 2):
            sae = load_sae(sae_dir(cfg.run_dir, layer, e), d_in=64)
            assert sae.dictionary.shape == (64 * e, 64)
        events = Path(cfg.log_dir) / Path(cfg.run_dir).name / "sae" / f"layer-{layer:02d}"
        assert list(events.glob("events.out.tfevents.*"))
        assert (Path(cfg.run_dir) / "sae" / f"layer-{layer:02d}" / "checkpoints" / "last.ckpt").is_file()
    summary = json.loads((Path(cfg.run_dir) / "sae" / "metrics.json").read_text())
    assert set(summary["layers"]) == {"0", "2"}
    for layer in (0, 2):
        for e in (1, 2):
            m = summary["layers"][str(layer)][f"x{e}"]
            full = json.loads((sae_dir(cfg.run_dir, layer, e) / "metrics.json").read_text())
            assert len(full["feature_frequency"]) == 64 * e and "feature_frequency" not in m
            assert m["width"] == 64 * e and m["l0"] == pytest.approx(m["l0_fraction"] * 64 * e)
            assert 0 <= m["dead_fraction"] <= 1 and m["explained_variance"] <= 1
            assert m["dead_fraction"] == pytest.approx(np.mean(np.array(full["feature_frequency"]) == 0))
            assert 0 <= m["dead_fraction_all_tokens"] <= m["dead_fraction"]
            assert m["ce_tokens"] > 0 and m["ce_clean"] > 0 and m["ce_loss_recovered"] is not None
            assert m["input_scale"] > 0
            # sparsity.safetensors: log10 density, SAELens's convention, from the same held-out frequencies
            from safetensors.numpy import load_file

            log_density = load_file(str(sae_dir(cfg.run_dir, layer, e) / "sparsity.safetensors"))["sparsity"]
            np.testing.assert_allclose(log_density, np.log10(np.array(full["feature_frequency"]) + 1e-10), rtol=1e-6)
            exported = json.loads((sae_dir(cfg.run_dir, layer, e) / "cfg.json").read_text())
            assert exported["model_name"] == cfg.model.name  # a tiny alias stays; the embedded one becomes a hub id
            assert exported["irm"]["activations_from"] == "tuned"
            assert exported["irm"]["tuned_checkpoint"] == str(Path(cfg.run_dir) / "rlhf" / "policy")
        init = json.loads((sae_dir(cfg.run_dir, layer, 2) / "cfg.json").read_text())["irm"]["init_mmcs"]
        assert 0 < init["hungarian"] <= init["max"] < 1
    steps = json.loads((sae_dir(cfg.run_dir, 2, 1) / "cfg.json").read_text())["irm"]["global_step"]
    before = load_sae(sae_dir(cfg.run_dir, 2, 2)).dictionary
    run(cfg)  # finished checkpoints of the same config: nothing is retrained
    assert json.loads((sae_dir(cfg.run_dir, 2, 1) / "cfg.json").read_text())["irm"]["global_step"] == steps
    assert torch.equal(load_sae(sae_dir(cfg.run_dir, 2, 2)).dictionary, before)


def fit_config(tmp_path: Path, layer_dir: Path, **trainer) -> Path:
    """configs/sae.yaml with its paths moved under tmp_path and small settings."""
    cfg = yaml.safe_load((ROOT / "configs" / "sae.yaml").read_text())
    cfg["data"]["init_args"]["layer_dir"] = str(layer_dir)
    cfg["data"]["init_args"]["cfg"]["batch_size"] = 16  # the model's too: one section (a YAML anchor)
    cfg["trainer"].update(accelerator="cpu", enable_progress_bar=False, log_every_n_steps=5, **trainer)
    cfg["trainer"]["logger"]["init_args"]["save_dir"] = str(tmp_path / "logs")
    cfg["trainer"]["callbacks"][0]["init_args"]["dirpath"] = str(tmp_path / "ckpt")
    cfg["trainer"]["callbacks"][1]["init_args"] = {"dirpath": str(tmp_path / "export")}
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "sae.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def irm_cli(*args, cwd, check=True, **kw):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
    return subprocess.run([sys.executable, "-m", "irm", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          check=check, **kw)


def refused_in_process(monkeypatch, capsys, *args) -> str:
    """`python -m irm <args>` run in this process (irm.cli.main: a refusal needs no process of its own, and a
    subprocess costs 7 s of imports); its exit code must be 2; returns its last line on stderr."""
    import signal

    from irm.cli import main

    monkeypatch.setattr(sys, "argv", list(sys.argv))  # the Lightning CLI sets sys.argv: restored after the test
    sigterm = signal.getsignal(signal.SIGTERM)
    try:
        with pytest.raises(SystemExit) as exit_:
            main(list(args))
    finally:
        signal.signal(signal.SIGTERM, sigterm)
    assert exit_.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


@pytest.mark.parametrize("change,message", [
    ({"activation": "topk"}, "sae.k=None is not valid; activation topk"),
    ({"learning_rate": 0}, "sae.learning_rate=0.0 is not valid"),
])
def test_fit_cli_checks_the_sae_section_before_building_anything(tmp_path, monkeypatch, capsys, change, message):
    """configs/sae.yaml's `cfg` is the run config's sae section, refused by the section's own checks (the stages'
    irm.config.check_all) before the cache, the module or the Trainer is touched: no cache exists here."""
    monkeypatch.chdir(tmp_path)
    config = fit_config(tmp_path, tmp_path / "cache" / "layer-00")
    cfg = yaml.safe_load(config.read_text())
    cfg["model"]["init_args"]["cfg"].update(change)  # the data's too: one YAML anchor
    config.write_text(yaml.safe_dump(cfg))
    last = refused_in_process(monkeypatch, capsys, "fit", "--config", str(config))
    assert last.startswith("irm fit: error: bad configuration: ") and message in last, last
    assert not (tmp_path / "ckpt").exists() and not (tmp_path / "logs").exists()


def test_fit_cli_refuses_a_model_and_data_given_different_sae_sections(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    config = fit_config(tmp_path, tmp_path / "cache" / "layer-00")
    last = refused_in_process(monkeypatch, capsys, "fit", "--config", str(config), "--model.init_args.cfg.batch_size",
                              "8")
    assert "model.init_args.cfg and data.init_args.cfg differ" in last, last


def test_fit_cli_with_a_missing_cache_exits_2(tmp_path, monkeypatch, capsys):
    """The refusal's exit code and its line on stderr (in this process; tests/reliability/test_bad_input.py runs
    refusals as processes of their own, as a user does)."""
    config = fit_config(tmp_path, tmp_path / "cache" / "layer-00")
    monkeypatch.chdir(tmp_path)
    assert "run `python -m irm cache` first" in refused_in_process(monkeypatch, capsys, "fit", "--config", str(config))


@pytest.mark.slow
def test_fit_cli_trains_validates_and_resumes_a_killed_run_to_the_same_step(tmp_path):
    layer_dir = tmp_path / "cache" / "layer-00"
    planted_cache(layer_dir, n=16000, shard_rows=3000)
    full = fit_config(tmp_path / "full", layer_dir, max_epochs=1)
    irm_cli("fit", "--config", str(full), cwd=tmp_path)
    full_steps = json.loads((tmp_path / "full" / "export" / "x1" / "cfg.json").read_text())["irm"]["global_step"]
    assert full_steps == int(np.ceil(15200 / 16))  # 5% of the rows held out
    irm_cli("validate", "--config", str(full), "--ckpt_path", str(tmp_path / "full" / "ckpt" / "last.ckpt"),
            cwd=tmp_path)

    cut = fit_config(tmp_path / "cut", layer_dir, max_epochs=1)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "irm", "fit", "--config", str(cut)], cwd=tmp_path, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = tmp_path / "cut" / "ckpt" / "last.ckpt"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if last.is_file() and torch.load(last, weights_only=False)["global_step"] >= 400:
            break
        time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = torch.load(last, weights_only=False)["global_step"]
    assert 400 <= killed_at < full_steps
    irm_cli("fit", "--config", str(cut), "--ckpt_path", "last", cwd=tmp_path)
    assert json.loads((tmp_path / "cut" / "export" / "x1" / "cfg.json").read_text())["irm"]["global_step"] == full_steps


class RecordRows(L.Callback):
    """Writes the row ids (column 0 of the activations) each DDP rank trained on to <path>-<rank>.json, and the
    rank's final module state to <path>-<rank>.pt."""

    def __init__(self, path: str):
        self.path, self.rows = path, []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        for x in batch if isinstance(batch, list) else [batch]:
            self.rows += x[:, 0].long().tolist()

    def on_train_end(self, trainer, module):
        Path(f"{self.path}-{trainer.global_rank}.json").write_text(json.dumps(self.rows))
        torch.save(module.state_dict(), f"{self.path}-{trainer.global_rank}.pt")


@pytest.mark.slow
def test_ddp_with_two_cpu_processes_trains_on_disjoint_rows(tmp_path):
    layer_dir = tmp_path / "cache" / "layer-00"
    n = 4000
    writer = ShardWriter(layer_dir, 8, shard_rows=700)
    acts = torch.randn(n, 8)
    acts[:, 0] = torch.arange(n, dtype=torch.float32)
    writer.add(acts, torch.zeros(n, dtype=torch.int64), torch.arange(n) // 10, torch.arange(n) % 10)
    writer.close(layer=0)
    config = fit_config(tmp_path, layer_dir, max_epochs=1, strategy="ddp", devices=2)
    cfg = yaml.safe_load(config.read_text())
    # Grouped batches too: several backward passes per training_step under DDP's gradient sync.
    cfg["data"]["init_args"]["cfg"].update(val_fraction=0.1, batches_per_item=2)
    cfg["trainer"]["callbacks"][0]["init_args"]["every_n_train_steps"] = 20
    cfg["trainer"]["callbacks"].append({"class_path": "test_sae.RecordRows",
                                        "init_args": {"path": str(tmp_path / "rows")}})
    config.write_text(yaml.safe_dump(cfg))
    irm_cli("fit", "--config", str(config), cwd=tmp_path, timeout=500)
    seen = [json.loads((tmp_path / f"rows-{rank}.json").read_text()) for rank in (0, 1)]
    assert len(seen[0]) == len(seen[1]) > 0
    assert not set(seen[0]) & set(seen[1])
    assert max(max(s) for s in seen) < 3600  # the held-out tail (last 10%) is never trained on
    assert len(set(seen[0]) | set(seen[1])) >= 3600 - 6  # at most one row per shard sits out the epoch
    states = [torch.load(tmp_path / f"rows-{rank}.pt") for rank in (0, 1)]
    for key, value in states[0].items():  # gradients were averaged across ranks: the replicas never diverged
        if "activity" not in key:
            assert torch.allclose(value, states[1][key], atol=1e-6), key
    exported = json.loads((tmp_path / "export" / "x2" / "cfg.json").read_text())["irm"]
    assert exported["global_step"] == int(np.ceil(len(seen[0]) / 16))  # each rank: one step per 16 of its rows


@pytest.mark.slow
def test_tiny_pipeline_cache_fit_dictionaries_from_the_cli(tmp_path):
    from test_activations import save_policy

    from irm.cli import parse_config

    tiny = ROOT / "configs" / "tiny.yaml"
    run_dir = tmp_path / "runs" / "tiny"
    cfg = parse_config("cache", ["--config", str(tiny), "--run_dir", str(run_dir)])
    save_policy(cfg)
    common = ["--config", str(tiny), "--run_dir", str(run_dir), "--cache.layers", "[1, 3]"]
    irm_cli("cache", *common, cwd=tmp_path)
    for layer in (1, 3):  # the standalone Lightning CLI config, pointed at this run's layers
        config = yaml.safe_load((ROOT / "configs" / "sae.yaml").read_text())
        config["data"]["init_args"]["layer_dir"] = str(run_dir / "cache" / f"layer-{layer:02d}")
        config["trainer"].update(max_epochs=1, accelerator="cpu", enable_progress_bar=False)
        config["trainer"]["logger"]["init_args"].update(save_dir=str(tmp_path / "lightning_logs"),
                                                        version=f"sae/layer-{layer:02d}")
        checkpoints = run_dir / "sae" / f"layer-{layer:02d}" / "checkpoints"
        config["trainer"]["callbacks"][0]["init_args"]["dirpath"] = str(checkpoints)
        path = tmp_path / f"sae-{layer}.yaml"
        path.write_text(yaml.safe_dump(config))
        irm_cli("fit", "--config", str(path), cwd=tmp_path)
        assert list((tmp_path / "lightning_logs" / "tiny" / "sae" / f"layer-{layer:02d}").glob("events.*"))
    irm_cli("sae", *common, "--sae.epochs", "1", cwd=tmp_path)
    irm_cli("dictionaries", *common, cwd=tmp_path)
    mmcs = json.loads((run_dir / "mmcs.json").read_text())
    assert set(mmcs["layers"]) == {"1", "3"}


# ---------------------------------------------------------------------------------------------- quality metrics


def test_heldout_metrics_against_numpy(tmp_path):
    from irm.activations import ActivationCache
    from irm.sae.metrics import heldout_metrics

    layer_dir = tmp_path / "cache" / "layer-00"
    planted_cache(layer_dir, n=600, shard_rows=250, scale=3.0)
    cache = ActivationCache(layer_dir)
    sae = random_sae(32, 64, tied=False)
    with torch.no_grad():
        sae.input_scale.fill_(0.5)
        sae.b_enc[:10] = -50.0  # ten features that can never fire
    m = heldout_metrics(sae, cache, 400, batch_rows=70)  # batches straddle shards and do not divide the rows
    x = cache.read_range(400, 600)["acts"].double().numpy()
    W_enc, b_enc, W_dec, b_dec = (t.detach().double().numpy() for t in (sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec))
    f = np.maximum(0.5 * x @ W_enc + b_enc, 0)
    err = x - (f @ W_dec + b_dec) / 0.5
    assert m["rows"] == 200
    assert m["l0"] == pytest.approx((f > 0).sum(1).mean(), rel=1e-9)
    assert m["l0_fraction"] == pytest.approx((f > 0).sum(1).mean() / 64, rel=1e-9)
    assert m["explained_variance"] == pytest.approx(1 - err.var(0).sum() / x.var(0).sum(), abs=1e-5)  # float32 SAE
    later = cache.read_range(400, 600)["positions"].numpy() > 0
    assert m["explained_variance_after_first"] == pytest.approx(
        1 - err[later].var(0).sum() / x[later].var(0).sum(), abs=1e-5)
    assert m["l0_after_first"] == pytest.approx((f[later] > 0).sum(1).mean(), rel=1e-9)
    assert m["feature_frequency"] == pytest.approx((f > 0).mean(0).tolist(), abs=1e-12)
    assert m["dead_fraction"] == pytest.approx(((f > 0).sum(0) == 0).mean()) and m["dead_fraction"] >= 10 / 64


def test_ce_loss_recovered_is_one_for_a_lossless_splice_and_uses_the_models_own_loss():
    from irm.config import ModelConfig
    from irm.models import load_model
    from irm.sae.metrics import ce_loss_recovered

    model, tokenizer = load_model(ModelConfig(name="tiny-llama", tiny_layers=2, tiny_d_model=16), seed=0)
    model.eval()
    texts = ["a great movie with a good plot", "terrible acting but nice music", "fine"]
    # A lossless SAE: codes relu(x), relu(-x) against decoder rows I and -I reconstruct x exactly.
    exact = SparseAutoencoder(16, 32, tied=True)
    with torch.no_grad():
        exact.W_dec.copy_(torch.cat([torch.eye(16), -torch.eye(16)]))
        exact.input_scale.fill_(4.0)
    lossy = random_sae(16, 32, tied=False)
    out = ce_loss_recovered(model, tokenizer, texts, 1, {"exact": exact, "lossy": lossy}, max_length=16)
    # clean: each text alone (no padding), through the model's own loss
    total = n = 0
    for t in texts:
        ids = tokenizer(t, return_tensors="pt")["input_ids"]
        if ids.shape[1] < 2:  # one token predicts nothing
            continue
        with torch.no_grad():
            total += model(input_ids=ids, labels=ids).loss.item() * (ids.shape[1] - 1)
        n += ids.shape[1] - 1
    assert out["tokens"] == n and out["clean"] == pytest.approx(total / n, rel=1e-4)
    assert out["exact"]["spliced"] == pytest.approx(out["clean"], rel=1e-4)
    assert out["exact"]["recovered"] == pytest.approx(1.0, abs=1e-3)
    gap = out["zero_ablated"] - out["clean"]
    assert out["lossy"]["recovered"] == pytest.approx((out["zero_ablated"] - out["lossy"]["spliced"]) / gap)
    assert out["lossy"]["spliced"] != pytest.approx(out["clean"], rel=1e-3)


def test_exported_model_name_is_loadable_by_other_tools():
    from irm.sae.export import loadable_model_name

    assert loadable_model_name("smollm2-135m-instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert loadable_model_name("EleutherAI/pythia-70m") == "EleutherAI/pythia-70m"

