"""The IRM regression under DDP (`python -m irm fit --config configs/regression.yaml --trainer.strategy ddp
--trainer.devices 2`, CPU processes talking gloo): ranks read disjoint shares of the rows with equal step counts,
the held-out metrics are those of all held-out rows, and the fitted R equals the single-process fit."""

import json
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import yaml
from test_regression import linear_data, write_deltas
from test_sae import ROOT, irm_cli

from irm.config import RegressionConfig
from irm.regression import DeltaDataModule, ShardBatchSampler


def test_ranks_read_disjoint_rows_training_in_equal_steps_validation_all_of_them():
    rows = [np.arange(0, 37), np.arange(100, 150), np.arange(200, 201)]  # 37, 50 and 1 rows in three shards
    for shuffle in (True, False):  # training, validation
        samplers = [ShardBatchSampler(rows, 8, shuffle, seed=3, rank=r, world_size=2, even=shuffle) for r in (0, 1)]
        for s in samplers:
            s.set_epoch(4)
        keys = [list(s) for s in samplers]
        assert [len(k) for k in keys] == [len(s) for s in samplers]
        read = [[(shard, row) for shard, batch in k for row in batch] for k in keys]
        assert not set(read[0]) & set(read[1])
        everything = {(s, int(r)) for s, shard in enumerate(rows) for r in shard}
        if shuffle:
            # The same steps with the same batch sizes on every rank; one row of each odd-sized shard sits out.
            assert [len(b) for _, b in keys[0]] == [len(b) for _, b in keys[1]]
            assert len(everything - set(read[0]) - set(read[1])) == 2
        else:
            assert set(read[0]) | set(read[1]) == everything
    single = ShardBatchSampler(rows, 8, True, seed=3)
    single.set_epoch(4)
    # One process reads everything, in the order the sampler always used.
    rng = np.random.default_rng([3, 4])
    expected = [(int(s), rng.permutation(rows[s])) for s in rng.permutation(3)]
    assert list(single) == [(s, r[i: i + 8].tolist()) for s, r in expected for i in range(0, len(r), 8)]


class RecordRows(L.Callback):
    """Each rank writes the targets (unique per row here) it trained on in the first epoch to <path>-<rank>.json; rank
    0 the metrics of the last validation to <path>-metrics.json."""

    def __init__(self, path: str):
        self.path, self.ys = path, []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if trainer.current_epoch == 0:
            self.ys += batch["y"].tolist()

    def on_train_end(self, trainer, module):
        Path(f"{self.path}-{trainer.global_rank}.json").write_text(json.dumps(self.ys))

    def on_validation_end(self, trainer, module):
        if trainer.global_rank == 0:
            metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
            Path(f"{self.path}-metrics.json").write_text(json.dumps(metrics))


def fit_config(tmp_path: Path, name: str, deltas: Path, epochs: int, **trainer) -> Path:
    """configs/regression.yaml with its paths under tmp_path/name: full-shard batches, plain gradient descent."""
    cfg = yaml.safe_load((ROOT / "configs" / "regression.yaml").read_text())
    cfg["model"]["init_args"]["cfg"].update(optimizer="sgd", learning_rate=0.1, weight_decay=0.05, batch_size=10_000)
    cfg["data"]["init_args"]["deltas_dir"] = str(deltas)
    cfg["trainer"].update(max_epochs=epochs, accelerator="cpu", enable_progress_bar=False,
                          check_val_every_n_epoch=epochs, num_sanity_val_steps=0, **trainer)
    cfg["trainer"]["logger"]["init_args"]["save_dir"] = str(tmp_path / name / "logs")
    cfg["trainer"]["callbacks"][0]["init_args"]["dirpath"] = str(tmp_path / name / "ckpt")
    cfg["trainer"]["callbacks"][1]["init_args"]["path"] = str(tmp_path / name / "regression.safetensors")
    cfg["trainer"]["callbacks"].append({"class_path": "test_scale_regression.RecordRows",
                                        "init_args": {"path": str(tmp_path / name / "rows")}})
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.slow
def test_two_rank_fit_equals_single_process_fit_with_global_metrics(tmp_path):
    from safetensors.torch import load_file

    x, y, triple = linear_data(n=400, f=16)
    deltas = tmp_path / "deltas"
    write_deltas(deltas, x, y, triple, shard_rows=100)  # whole triples per shard: an even number of rows in each
    epochs = 40
    fits = {}
    for name, trainer in (("single", {}), ("ddp", {"strategy": "ddp", "devices": 2})):
        irm_cli("fit", "--config", str(fit_config(tmp_path, name, deltas, epochs, **trainer)), cwd=tmp_path,
                timeout=500)
        fits[name] = load_file(str(tmp_path / name / "regression.safetensors"))
        assert (tmp_path / name / "ckpt" / "last.ckpt").is_file()
    torch.testing.assert_close(fits["ddp"]["weight"], fits["single"]["weight"], rtol=0, atol=1e-5)
    torch.testing.assert_close(fits["ddp"]["bias"], fits["single"]["bias"], rtol=0, atol=1e-5)

    # configs/regression.yaml's split
    dm = DeltaDataModule(str(deltas), RegressionConfig(batch_size=10_000, val_fraction=0.1), seed=0)
    dm.setup("fit")
    train = np.concatenate([100 * s + r for s, r in enumerate(dm.train_rows)])
    val = np.concatenate([100 * s + r for s, r in enumerate(dm.val_rows)])
    one = json.loads((tmp_path / "single" / "rows-0.json").read_text())
    two = [json.loads((tmp_path / "ddp" / f"rows-{rank}.json").read_text()) for rank in (0, 1)]
    assert sorted(one) == pytest.approx(sorted(y[train].tolist()))
    assert len(two[0]) == len(two[1]) == len(train) // 2  # no row sits out: every shard's share is even
    assert not set(two[0]) & set(two[1])
    assert sorted(two[0] + two[1]) == pytest.approx(sorted(y[train].tolist()))

    for name in ("single", "ddp"):
        metrics = json.loads((tmp_path / name / "rows-metrics.json").read_text())
        pred = x[val].double().numpy() @ fits[name]["weight"].double().numpy() + fits[name]["bias"].item()
        target = y[val].double().numpy()
        mse = ((pred - target) ** 2).mean()
        assert metrics["val/mse"] == pytest.approx(mse, rel=1e-5)
        assert metrics["val/r2"] == pytest.approx(1 - mse / target.var(), rel=1e-5)


@pytest.mark.slow
def test_stage_under_ddp_is_recorded_once_with_global_metrics(tmp_path):
    from irm.cli import parse_config
    from irm.readers import load_irm
    from irm.stages import is_done

    x, y, triple = linear_data(n=300, f=16, noise=0.01)
    run_dir = tmp_path / "run"
    write_deltas(run_dir / "deltas", x, y, triple, shard_rows=60)
    trainer = {"strategy": "ddp", "devices": 2, "accelerator": "cpu", "enable_progress_bar": False}
    args = ["--config", str(ROOT / "configs" / "tiny.yaml"), "--run_dir", str(run_dir), "--log_dir",
            str(tmp_path / "logs"), "--regression.epochs", "30", "--regression.learning_rate", "0.05",
            "--regression.batch_size", "16", "--regression.trainer", json.dumps(trainer)]
    out = irm_cli("regression", *args, cwd=tmp_path, timeout=500)
    assert out.stdout.count("regression: R fitted") == 1  # rank 0 alone reports and records
    assert is_done(parse_config("regression", args), "regression")
    metrics = json.loads((run_dir / "regression" / "metrics.json").read_text())
    assert metrics["train_rows"] + metrics["val_rows"] == 300  # the whole data set's counts, not a rank's
    weight, bias, _ = load_irm(run_dir)
    dm = DeltaDataModule(str(run_dir / "deltas"), RegressionConfig(val_fraction=0.1),
                         seed=parse_config("regression", args).seed)
    dm.setup("fit")
    val = np.concatenate([60 * s + r for s, r in enumerate(dm.val_rows)])
    target = y[val].double().numpy()
    mse = ((x[val].double().numpy() @ weight.double().numpy() + bias - target) ** 2).mean()
    assert metrics["val_mse"] == pytest.approx(mse, rel=1e-5)
    assert metrics["val_r2"] == pytest.approx(1 - mse / target.var(), rel=1e-5) and metrics["val_r2"] > 0.99
