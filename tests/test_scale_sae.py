"""SAE metrics under DDP (`python -m irm validate --trainer.strategy ddp --trainer.devices 2`, CPU processes talking
gloo, no GPU): the held-out metrics two ranks report equal the single-process ones on the same rows and the same
SAE, and agree with numpy over all held-out rows (L0, dead fraction exactly; explained variance, averaged per batch
by the module, within a tolerance)."""

import json
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import yaml
from test_sae import fit_config, irm_cli, planted_cache

from irm.activations import ActivationCache


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
    cfg["data"]["init_args"]["val_fraction"] = 0.2
    config.write_text(yaml.safe_dump(cfg))
    irm_cli("fit", "--config", str(config), cwd=tmp_path, timeout=300)
    ckpt = tmp_path / "ckpt" / "last.ckpt"

    single = _with_dump(config, tmp_path / "single.json")
    ddp = _with_dump(config, tmp_path / "ddp.json", strategy="ddp", devices=2)
    irm_cli("validate", "--config", str(single), "--ckpt_path", str(ckpt), cwd=tmp_path, timeout=300)
    irm_cli("validate", "--config", str(ddp), "--ckpt_path", str(ckpt), cwd=tmp_path, timeout=500)
    one = json.loads((tmp_path / "single.json").read_text())
    two = json.loads((tmp_path / "ddp.json").read_text())

    # numpy over all 800 held-out rows, with the checkpoint's weights (tied: encoder = decoder transposed).
    cache = ActivationCache(layer_dir)
    x = cache.read_rows(list(range(3200, 4000)))["acts"].double().numpy()
    state = torch.load(ckpt, weights_only=False)["state_dict"]
    for name in ("x1", "x2"):
        keys = {k.split(".")[-1]: v.double().numpy() for k, v in state.items() if k.startswith(f"saes.{name}.")}
        assert "W_enc" not in keys  # configs/sae.yaml ties the weights
        W_dec = keys["W_dec"]
        codes = np.maximum(x @ W_dec.T + keys["b_enc"], 0)  # paper 4.2: f = ReLU(W_enc^T x + b_enc), tied
        x_hat = codes @ W_dec + keys["b_dec"]
        l0 = (codes > 0).sum(1).mean()
        dead = 1.0 - (codes.max(0) > 0).mean()
        ev = 1.0 - (x - x_hat).var(0).sum() / x.var(0).sum()
        for metrics in (one, two):
            assert metrics[f"val/{name}/l0"] == pytest.approx(l0, rel=1e-5)
            assert metrics[f"val/{name}/dead_fraction"] == pytest.approx(dead, abs=1e-9)
            # Lightning averages the per-batch ratio; over 16-row batches it stays close to the global ratio.
            assert metrics[f"val/{name}/explained_variance"] == pytest.approx(ev, abs=0.05)
        assert two[f"val/{name}/l0"] == pytest.approx(one[f"val/{name}/l0"], rel=1e-5)
        assert two[f"val/{name}/mse"] == pytest.approx(one[f"val/{name}/mse"], rel=1e-4)
        assert two[f"val/{name}/explained_variance"] == pytest.approx(one[f"val/{name}/explained_variance"], abs=0.02)
