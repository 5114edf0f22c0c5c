"""No host synchronisation in the SAE step (issue 25.3): on a GPU every read of a tensor's value by Python (`.item()`,
`bool(t)`, `float(t)`, `.tolist()`, `.cpu()`, `.numpy()`) waits for the device. They are counted here on the CPU
through a TorchFunctionMode around each training step: none on a step Lightning does not log, a bounded few on the
steps it logs (the metrics), whatever the SAE flavour."""

import pytest
import torch
from torch.overrides import TorchFunctionMode

from test_sae import planted_cache, trainer

from irm.activations import ActivationDataModule
from irm.config import SAEConfig
from irm.sae.module import SAEModule

HOST_READS = {"item", "tolist", "__bool__", "__float__", "__int__", "__index__", "cpu", "numpy", "__format__"}


class CountHostReads(TorchFunctionMode):
    """Counts the tensor-to-Python reads made while it is active."""

    def __init__(self):
        super().__init__()
        self.reads: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in HOST_READS:
            self.reads.append(name)
        return func(*args, **(kwargs or {}))


class Counted(SAEModule):
    """SAEModule whose every training step is counted: (logging step?, host reads) per loader item."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.counts: list[tuple[bool, list[str]]] = []

    def training_step(self, batch, batch_idx):
        with CountHostReads() as mode:
            out = super().training_step(batch, batch_idx)
        self.counts.append((self._logging_step(), mode.reads))
        return out


@pytest.mark.parametrize("settings", [dict(activation="relu", revive="none"),
                                      dict(activation="relu", revive="resample"),
                                      dict(activation="topk", k=4, revive="auxk", center_input=True)])
def test_sae_step_reads_nothing_back_except_on_logging_steps(tmp_path, settings):
    layer_dir = tmp_path / "cache" / "layer-00"
    planted_cache(layer_dir, n=3000)
    torch.manual_seed(0)
    # dead_window 1000: resampling is due only at step 1000, beyond this fit, so every step here is an ordinary one
    module = Counted(SAEConfig(expansions=[1, 2], learning_rate=1e-3, dead_window=1000, **settings))
    data = ActivationDataModule(str(layer_dir), SAEConfig(batch_size=32, val_fraction=0.05))
    trainer(tmp_path, max_steps=60, log_every_n_steps=25, limit_val_batches=0).fit(module, data)
    quiet = [reads for logging, reads in module.counts if not logging]
    loud = [reads for logging, reads in module.counts if logging]
    assert len(quiet) >= 50 and len(loud) == 2
    assert all(not reads for reads in quiet), [r for r in quiet if r][:3]
    assert all(len(reads) <= 8 for reads in loud), loud
