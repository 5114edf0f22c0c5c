"""SAE metrics under DDP (`--trainer.strategy ddp --trainer.devices 2`, CPU processes talking gloo, no GPU): the
statistics of disjoint row sets merge into those of their union; the held-out metrics of two ranks equal the
single-process ones and numpy over all held-out rows; the training metrics logged at a step describe the union of
both ranks' batches of that step."""

import json
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import yaml
from test_sae import fit_config, irm_cli, planted_cache

from irm.activations import ActivationCache
from irm.sae.model import empty_moments, merge_moments, moment_metrics, row_moments

STATS = ("mse", "nmse", "l1", "l0", "explained_variance")


def numpy_stats(x, x_hat, codes) -> dict[str, float]:
    """The logged statistics of a set of rows, from numpy alone (float64, two-pass variances)."""
    err = x - x_hat
    return {"mse": (err ** 2).mean(), "nmse": (err ** 2).mean(axis=0).sum() / x.var(axis=0).sum(),
            "l1": codes.sum(axis=1).mean(), "l0": (codes > 0).sum(axis=1).mean(),
            "explained_variance": 1.0 - err.var(axis=0).sum() / x.var(axis=0).sum()}


def encode_np(x, weights: dict, name: str):
    """(codes, reconstruction, input) of a tied ReLU SAE from its state dict, in the SAE's normalised space where its
    metrics are measured: x_n = s x with s its `input_scale`, f = ReLU(x_n W_dec^T + b_enc), x_hat = f W_dec + b_dec."""
    W_dec = weights[f"{name}.W_dec"].double().numpy()
    assert f"{name}.W_enc" not in weights  # configs/sae.yaml ties the weights
    scale = float(weights[f"{name}.input_scale"]) if f"{name}.input_scale" in weights else 1.0
    x_n = x * scale
    codes = np.maximum(x_n @ W_dec.T + weights[f"{name}.b_enc"].double().numpy(), 0.0)
    return codes, codes @ W_dec + weights[f"{name}.b_dec"].double().numpy(), x_n


def test_statistics_of_parts_merge_into_those_of_the_whole():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 6, generator=g)
    x[150:] *= 3.0  # the two "ranks" see differently spread rows
    # An outlier dimension whose mean dwarfs its spread, as LM activations have: E[x^2] - E[x]^2 in float32 would
    # leave nothing of its variance.
    x[:, 0] = 3.0e3 + 0.01 * x[:, 0]
    x_hat = x + 0.1 * torch.randn(300, 6, generator=g) + 0.05
    codes = torch.relu(torch.randn(300, 10, generator=g))
    whole = row_moments(x, x_hat, codes)
    # Batches of a rank merged, then ranks merged (one rank without rows), as the module does.
    rank0 = merge_moments(torch.stack([row_moments(x[a:b], x_hat[a:b], codes[a:b]) for a, b in ((0, 7), (7, 150))]))
    rank1 = merge_moments(torch.stack([row_moments(x[150:], x_hat[150:], codes[150:]), empty_moments(6)]))
    merged = merge_moments(torch.stack([rank0, rank1, empty_moments(6)]))
    torch.testing.assert_close(merged, whole, rtol=1e-10, atol=1e-9)
    # Leading dimensions (one per dictionary) merge independently.
    torch.testing.assert_close(merge_moments(torch.stack([torch.stack([rank0, rank1])] * 2)), torch.stack([whole] * 2),
                               rtol=1e-10, atol=1e-9)
    expected = numpy_stats(x.double().numpy(), x_hat.double().numpy(), codes.double().numpy())
    assert {k: v.item() for k, v in moment_metrics(merged).items()} == pytest.approx(expected, rel=1e-9)
    # The average of the parts' ratios is not the ratio of the whole: what the merge is for.
    halves = [moment_metrics(row_moments(x[a:b], x_hat[a:b], codes[a:b]))["explained_variance"].item()
              for a, b in ((0, 150), (150, 300))]
    assert abs(np.mean(halves) - expected["explained_variance"]) > 1e-4


def test_fsdp_is_refused_in_one_line():
    import types

    from lightning.pytorch.strategies import FSDPStrategy

    from irm.errors import UserError
    from irm.config import SAEConfig
    from irm.sae.module import SAEModule

    # Lightning refuses FSDP on CPU before any module hook runs, so the strategy is handed over directly.
    module = SAEModule(SAEConfig(), d_in=4)
    module.trainer = types.SimpleNamespace(strategy=FSDPStrategy())
    with pytest.raises(UserError, match="use --trainer.strategy ddp"):
        module.setup("fit")


class DumpMetrics(L.Callback):
    """Rank 0 writes the metrics Lightning reduced at the end of validation to `path`."""

    def __init__(self, path: str):
        self.path = path

    def on_validation_end(self, trainer, module):
        if trainer.global_rank == 0:
            Path(self.path).write_text(json.dumps({k: float(v) for k, v in trainer.callback_metrics.items()}))


def _with_dump(config: Path, path: Path, **trainer) -> Path:
    cfg = yaml.safe_load(config.read_text())
    cfg["trainer"].update(trainer)
    cfg["trainer"]["callbacks"].append({"class_path": "test_scale_sae.DumpMetrics", "init_args": {"path": str(path)}})
    out = config.with_name(f"{path.stem}.yaml")
    out.write_text(yaml.safe_dump(cfg))
    return out


@pytest.mark.slow
def test_two_rank_validation_metrics_equal_single_process_and_numpy(tmp_path):
    layer_dir = tmp_path / "cache" / "layer-00"
    # 4000 rows in shards of 700, documents of 20, the last 20% held out: every held-out shard span is even, so
    # two ranks split the 800 held-out rows without dropping any.
    planted_cache(layer_dir, d=16, k=12, n=4000, shard_rows=700)
    config = fit_config(tmp_path, layer_dir, max_epochs=1)
    cfg = yaml.safe_load(config.read_text())
    cfg["data"]["init_args"]["cfg"]["val_fraction"] = 0.2
    config.write_text(yaml.safe_dump(cfg))
    irm_cli("fit", "--config", str(config), cwd=tmp_path, timeout=300)
    ckpt = tmp_path / "ckpt" / "last.ckpt"

    single = _with_dump(config, tmp_path / "single.json")
    ddp = _with_dump(config, tmp_path / "ddp.json", strategy="ddp", devices=2)
    irm_cli("validate", "--config", str(single), "--ckpt_path", str(ckpt), cwd=tmp_path, timeout=300)
    irm_cli("validate", "--config", str(ddp), "--ckpt_path", str(ckpt), cwd=tmp_path, timeout=500)
    one = json.loads((tmp_path / "single.json").read_text())
    two = json.loads((tmp_path / "ddp.json").read_text())

    # numpy over all 800 held-out rows, with the checkpoint's weights.
    x = ActivationCache(layer_dir).read_rows(list(range(3200, 4000)))["acts"].double().numpy()
    state = {k[len("saes."):]: v for k, v in torch.load(ckpt, weights_only=False)["state_dict"].items()
             if k.startswith("saes.")}
    loss = 0.0
    for name in ("x1", "x2"):
        codes, x_hat, x_n = encode_np(x, state, name)
        expected = numpy_stats(x_n, x_hat, codes)
        expected["dead_fraction"] = 1.0 - (codes.max(axis=0) > 0).mean()
        loss += expected["mse"] + 1e-3 * expected["l1"]  # configs/sae.yaml: l1_coefficient 1e-3
        for metrics in (one, two):
            got = {k: metrics[f"val/{name}/{k}"] for k in expected}
            assert got == pytest.approx(expected, rel=1e-5, abs=1e-7)
    for metrics in (one, two):
        assert metrics["val/loss"] == pytest.approx(loss, rel=1e-5)


class RecordSteps(L.Callback):
    """Each rank writes to <path>-<rank>.pt, for every training step, its batch and the SAE weights the step encoded
    it with."""

    def __init__(self, path: str):
        self.path, self.steps = path, []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.steps.append((batch.clone(), {k: v.detach().clone() for k, v in module.saes.state_dict().items()}))

    def on_train_end(self, trainer, module):
        torch.save(self.steps, f"{self.path}-{trainer.global_rank}.pt")


@pytest.mark.slow
def test_two_rank_training_metrics_describe_both_ranks_batches(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    layer_dir = tmp_path / "cache" / "layer-00"
    planted_cache(layer_dir, d=8, k=6, n=2400, shard_rows=600)
    config = fit_config(tmp_path, layer_dir, max_epochs=1, strategy="ddp", devices=2)  # batch 16, logs every 5
    cfg = yaml.safe_load(config.read_text())
    cfg["data"]["init_args"]["cfg"]["val_fraction"] = 0.0
    # dead_window 1: a feature is dead at a logging step when it fired on no rank in that step (no revival, which
    # would reset it); a strong L1 term keeps some features rare, so the dead fraction is neither 0 nor 1.
    cfg["model"]["init_args"]["cfg"].update(dead_window=1, l1_coefficient=0.05, revive="none")
    cfg["trainer"]["callbacks"].append({"class_path": "test_scale_sae.RecordSteps",
                                        "init_args": {"path": str(tmp_path / "steps")}})
    config.write_text(yaml.safe_dump(cfg))
    irm_cli("fit", "--config", str(config), cwd=tmp_path, timeout=500)
    ranks = [torch.load(tmp_path / f"steps-{rank}.pt", weights_only=False) for rank in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == 2400 // 2 // 16

    # The fit's one TensorBoard folder (configs/sae.yaml names no version: without --run_dir/--layer, Lightning's)
    [events] = {p.parent for p in (tmp_path / "logs").rglob("events.out.tfevents.*")}
    acc = EventAccumulator(str(events))
    acc.Reload()
    logged = {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]
              if tag.startswith("train/")}
    steps = sorted(logged["train/loss"])
    assert steps == list(range(4, len(ranks[0]), 5))  # every log_every_n_steps, counted from 0
    rank0_only_differs = 0

    for step in steps:
        (x0, weights), (x1, weights1) = ranks[0][step], ranks[1][step]
        for key, value in weights.items():  # DDP replicas: both ranks encoded with the same weights
            torch.testing.assert_close(value, weights1[key], rtol=0, atol=1e-6)
        x = torch.cat([x0, x1]).double().numpy()
        loss = 0.0
        for name in ("x1", "x2"):
            codes, x_hat, x_n = encode_np(x, weights, name)
            expected = numpy_stats(x_n, x_hat, codes)
            loss += expected["mse"] + 0.05 * expected["l1"]
            assert {k: logged[f"train/{name}/{k}"][step] for k in STATS} == pytest.approx(expected, rel=1e-5, abs=1e-6)
            # Fired on any rank in the logging step itself (dead_window 1).
            fired = np.zeros(codes.shape[1], dtype=bool)
            for s in range(step, step + 1):
                for rank in ranks:
                    fired |= (encode_np(rank[s][0].double().numpy(), rank[s][1], name)[0] > 0).any(axis=0)
            assert logged[f"train/{name}/dead_fraction"][step] == pytest.approx(1.0 - fired.mean(), abs=1e-6)
            codes0, x_hat0, x0_n = encode_np(x0.double().numpy(), weights, name)
            rank0_only_differs += abs(numpy_stats(x0_n, x_hat0, codes0)["l0"] - expected["l0"]) > 1e-3
        assert logged["train/loss"][step] == pytest.approx(loss, rel=1e-5)
    assert rank0_only_differs  # rank 0's batch alone would have given other values
    assert 0 < np.mean([v for v in logged["train/x2/dead_fraction"].values()]) < 1
