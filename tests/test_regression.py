"""The IRM regression: the coupled-decay fit is numpy's closed-form ridge solution; the data module streams every
row once per epoch with a triple-level held-out split; resuming from last.ckpt continues exactly; the stage logs
MSE and R^2 to TensorBoard and exports R for load_irm; deltas rows are Delta+/Delta- of hand-made codes."""

from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch

from irm.artifacts import write_json
from irm.delta_rows import rows_of, sentiment_deltas
from irm.stages.deltas import MANIFEST, write_shard
from irm.errors import UserError
from irm.config import RegressionConfig
from irm.readers import load_irm
from irm.regression import DeltaDataModule, IRMRegression

torch.set_num_threads(1)


def write_deltas(directory: Path, x, y, triple, shard_rows=None, layers=(1, 2)):
    """Synthetic deltas in the stage's layout: shards + manifest."""
    directory.mkdir(parents=True, exist_ok=True)
    n, f = x.shape
    shard_rows = shard_rows or n
    shards = [write_shard(directory, i // shard_rows, x[i: i + shard_rows], y[i: i + shard_rows],
                          triple[i: i + shard_rows], torch.ones(len(x[i: i + shard_rows])))
              for i in range(0, n, shard_rows)]
    write_json(directory / MANIFEST, {"layers": list(layers), "width": f // len(layers), "site": "mlp_out",
                                      "n_features": f, "n_triples": int(triple.max()) + 1, "shards": shards,
                                      "rows": n, "complete": True})


def linear_data(n=400, f=16, seed=0, noise=0.1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, f, generator=g)
    w = torch.randn(f, generator=g)
    y = x @ w + 0.5 + noise * torch.randn(n, generator=g)
    return x, y, torch.arange(n) // 2


def trainer(epochs, **kw):
    return L.Trainer(max_epochs=epochs, accelerator="cpu", logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                     check_val_every_n_epoch=10_000, **kw)


@pytest.mark.parametrize("optimizer, lr, epochs", [("adam", 0.05, 300), ("sgd", 0.1, 200)])
def test_coupled_weight_decay_fit_is_the_ridge_solution(in_tmp, optimizer, lr, epochs):
    x, y, triple = linear_data()
    write_deltas(in_tmp / "deltas", x, y, triple)
    dm = DeltaDataModule(str(in_tmp / "deltas"), RegressionConfig(batch_size=10_000, val_fraction=0.1), seed=0)
    wd = 0.05
    model = IRMRegression(RegressionConfig(learning_rate=lr, weight_decay=wd, optimizer=optimizer))
    trainer(epochs).fit(model, datamodule=dm)
    rows = np.concatenate(dm.train_rows)
    xt, yt = x[rows].double().numpy(), y[rows].double().numpy()
    xc, yc = xt - xt.mean(0), yt - yt.mean()
    # argmin mean((Xw + b - y)^2) + wd/2 ||w||^2 with a free intercept (torch adds wd * w to the gradient).
    w_ridge = np.linalg.solve(xc.T @ xc + len(rows) * wd / 2 * np.eye(x.shape[1]), xc.T @ yc)
    b_ridge = yt.mean() - xt.mean(0) @ w_ridge
    np.testing.assert_allclose(model.linear.weight.detach().numpy().ravel(), w_ridge, atol=1e-4)
    assert abs(model.linear.bias.item() - b_ridge) < 1e-4
    # The ridge penalty is felt: the unpenalised least-squares weights differ by far more than the tolerance.
    assert np.abs(np.linalg.lstsq(xc, yc, rcond=None)[0] - w_ridge).max() > 1e-3
    assert model.hparams.n_features == x.shape[1]  # taken from the data module, saved for load_from_checkpoint


def test_streaming_covers_every_row_once_with_triple_level_split(in_tmp):
    x, y, triple = linear_data(n=250, f=4)
    x[:, 0] = torch.arange(250, dtype=torch.float32)  # row id carried in feature 0
    write_deltas(in_tmp / "deltas", x, y, triple, shard_rows=64)
    dm = DeltaDataModule(str(in_tmp / "deltas"), RegressionConfig(batch_size=20, val_fraction=0.2), seed=3)
    dm.setup("fit")
    loader = dm.train_dataloader()

    def epoch_ids(epoch):
        loader.sampler.set_epoch(epoch)
        batches = list(loader)
        assert all(len(b["x"]) <= 20 for b in batches)
        return [int(v) for b in batches for v in b["x"][:, 0]]

    train0, train0_again, train1 = epoch_ids(0), epoch_ids(0), epoch_ids(1)
    val = [int(v) for b in dm.val_dataloader() for v in b["x"][:, 0]]
    assert sorted(train0 + val) == list(range(250))
    assert train0 == train0_again and train0 != train1 and sorted(train0) == sorted(train1)
    val_triples = {int(triple[i]) for i in val}
    assert not val_triples & {int(triple[i]) for i in train0}
    assert len(val_triples) == round(0.2 * 125)
    assert len(loader) == len(list(loader))


def test_corrupt_shard_is_refused(in_tmp):
    x, y, triple = linear_data(n=40, f=4)
    write_deltas(in_tmp / "deltas", x, y, triple)
    shard = next((in_tmp / "deltas").glob("shard-*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:-8] + b"00000000")
    with pytest.raises(UserError, match="checksum"):
        DeltaDataModule(str(in_tmp / "deltas"), RegressionConfig()).setup("fit")
    assert any("regression.val_fraction=0.0" in p for p in RegressionConfig(val_fraction=0.0).check())


def test_resume_from_last_checkpoint_continues_exactly(in_tmp):
    from lightning.pytorch.callbacks import ModelCheckpoint

    x, y, triple = linear_data(n=120, f=8)
    write_deltas(in_tmp / "deltas", x, y, triple, shard_rows=50)

    def fit(epochs, ckpt_dir, ckpt_path=None):
        L.seed_everything(0)
        dm = DeltaDataModule(str(in_tmp / "deltas"), RegressionConfig(batch_size=16, val_fraction=0.1), seed=0)
        model = IRMRegression(RegressionConfig(learning_rate=0.01, weight_decay=1e-3), 8)
        t = L.Trainer(max_epochs=epochs, accelerator="cpu", logger=False, enable_progress_bar=False,
                      enable_model_summary=False, callbacks=[ModelCheckpoint(dirpath=ckpt_dir, save_last=True)])
        t.fit(model, datamodule=dm, ckpt_path=ckpt_path)
        return model, t

    straight, _ = fit(4, in_tmp / "a")
    fit(2, in_tmp / "b")
    resumed, t = fit(4, in_tmp / "b", ckpt_path=str(in_tmp / "b" / "last.ckpt"))
    assert t.current_epoch == 4
    assert t.train_dataloader.sampler.epoch == 3  # Lightning reseeds the shuffle each epoch, resumed ones too
    torch.testing.assert_close(resumed.linear.weight, straight.linear.weight, rtol=0, atol=1e-6)
    loaded = IRMRegression.load_from_checkpoint(str(in_tmp / "b" / "last.ckpt"))
    torch.testing.assert_close(loaded.linear.weight, resumed.linear.weight)


def test_stage_logs_metrics_and_exports_r(tiny_cfg):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from irm.stages.regression import run

    x, y, triple = linear_data(n=300, f=16, noise=0.01)
    root = Path(tiny_cfg.run_dir)
    write_deltas(root / "deltas", x, y, triple)
    tiny_cfg.regression.epochs = 30
    tiny_cfg.regression.learning_rate = 0.05
    tiny_cfg.regression.batch_size = 32
    metrics = run(tiny_cfg)
    assert metrics["val_r2"] > 0.99 and metrics["train_rows"] + metrics["val_rows"] == 300
    weight, bias, layers = load_irm(root)
    assert layers == [1, 2] and weight.shape == (16,)
    np.testing.assert_allclose((x @ weight + bias).numpy(), y.numpy(), atol=0.1)
    assert (root / "regression" / "checkpoints" / "last.ckpt").exists()
    events = Path(tiny_cfg.log_dir) / root.name / "regression"
    acc = EventAccumulator(str(events))
    acc.Reload()
    assert {"val/mse", "val/r2", "train/mse", "train/r2"} <= set(acc.Tags()["scalars"])
    assert acc.Scalars("val/r2")[-1].value > 0.99
    # A second run with the same config resumes from last.ckpt and trains no further.
    again = run(tiny_cfg)
    assert again["epochs"] == metrics["epochs"]


def test_deltas_are_summed_layer_distances_negated_for_negatives():
    pos = torch.tensor([[[3.0, 4.0], [0.0, 1.0]]])  # 1 triple, 2 layers, 2 features
    neu = torch.zeros(1, 2, 2)
    neg = torch.tensor([[[0.0, 2.0], [1.0, 0.0]]])
    plus, minus = sentiment_deltas(pos, neu, neg)
    assert plus.tolist() == [5.0 + 1.0] and minus.tolist() == [-(2.0 + 1.0)]
    rows = rows_of([7], pos, neu, neg)
    assert rows["x"].tolist() == [[3.0, 4.0, 0.0, 1.0], [0.0, 2.0, 1.0, 0.0]]
    assert rows["y"].tolist() == [6.0, -3.0] and rows["triple"].tolist() == [7, 7] and rows["sign"].tolist() == [1, -1]


def test_lightning_cli_fit_with_the_config_file_and_resume(in_tmp):
    from irm.cli import main

    config = str(Path(__file__).resolve().parents[1] / "configs" / "regression.yaml")
    x, y, triple = linear_data(n=200, f=16)
    write_deltas(in_tmp / "runs" / "tiny" / "deltas", x, y, triple)
    main(["fit", "--config", config, "--trainer.max_epochs", "2", "--trainer.enable_progress_bar", "false"])
    last = in_tmp / "runs" / "tiny" / "regression" / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=False)["epoch"] == 1
    main(["fit", "--config", config, "--trainer.max_epochs", "3", "--trainer.enable_progress_bar", "false",
          "--ckpt_path", "last"])
    state = torch.load(last, weights_only=False)
    assert state["epoch"] == 2 and state["global_step"] == 3 * n_train_batches(in_tmp / "runs" / "tiny" / "deltas")
    weight, bias, layers = load_irm(in_tmp / "runs" / "tiny")
    torch.testing.assert_close(weight, state["state_dict"]["linear.weight"].reshape(-1))
    assert (in_tmp / "lightning_logs" / "tiny" / "regression").is_dir()


def n_train_batches(deltas_dir):
    # as in configs/regression.yaml
    dm = DeltaDataModule(str(deltas_dir), RegressionConfig(batch_size=64, val_fraction=0.1), seed=0)
    dm.setup("fit")
    return len(dm.train_dataloader())


@pytest.mark.parametrize("n_features", [5, 60])  # primal (features < rows) and dual (rows < features)
def test_ridge_refits_on_a_bootstrap_draw_equal_numpys_fit_on_the_drawn_rows(n_features):
    from irm.ridge import RidgeRefits

    rng = np.random.default_rng(n_features)
    x, y, points = rng.normal(size=(30, n_features)), rng.normal(size=30), rng.normal(size=(7, n_features))
    rows = rng.integers(0, 30, 30)  # repeats: a bootstrap draw
    xr, yr = x[rows], y[rows]
    xc = xr - xr.mean(0)
    w = np.linalg.solve(xc.T @ xc + 0.7 * np.eye(n_features), xc.T @ (yr - yr.mean()))
    expected = points @ w + yr.mean() - xr.mean(0) @ w
    np.testing.assert_allclose(RidgeRefits(x, y, 0.7, points).predict(rows), expected, atol=1e-10)
