"""No host synchronisation in the SAE step (issue 25.3): on a GPU every read of a tensor's value by Python (`.item()`,
`bool(t)`, `float(t)`, `.tolist()`, `.cpu()`, `.numpy()`) waits for the device. A callback counts them from the start
to the end of every loader item of a real SAEModule fit through Lightning (the module's step, its optimizer step and
Lightning's hooks around them), through a TorchFunctionMode, which sees them on the CPU; with CUDA present the fit
also runs on the GPU under `torch.cuda.set_sync_debug_mode("error")`, which fails on any sync in between, including
those inside PyTorch's kernels' host code. None on an item Lightning does not log, whatever the SAE flavour, with
dead features resampled several times between logging steps; Lightning reads the logged metrics at its logging
steps."""

import lightning as L
import pytest
import torch
from torch.overrides import TorchFunctionMode

from test_sae import planted_cache, trainer

from irm.activations import ActivationDataModule
from irm.config import SAEConfig
from irm.sae.module import SAEModule

HOST_READS = {"item", "tolist", "__bool__", "__float__", "__int__", "__index__", "cpu", "numpy", "__format__"}
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


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


class HostReadsPerItem(L.Callback):
    """(logged by Lightning?, host reads) per loader item: Lightning writes metrics on every log_every_n_steps-th
    item of the fit. On CUDA the items it does not log run under sync debug mode "error"."""

    def __init__(self):
        self.items: list[tuple[bool, list[str]]] = []
        self._mode = self._logged = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._logged = (len(self.items) + 1) % trainer.log_every_n_steps == 0
        if pl_module.device.type == "cuda" and not self._logged:
            torch.cuda.set_sync_debug_mode("error")
        self._mode = CountHostReads().__enter__()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._stop(pl_module)
        self.items.append((self._logged, self._mode.reads))

    def on_exception(self, trainer, pl_module, exception):
        self._stop(pl_module)

    def _stop(self, pl_module):
        if torch.cuda.is_available():
            torch.cuda.set_sync_debug_mode("default")
        if self._mode is not None:
            self._mode.__exit__(None, None, None)


def test_the_counter_sees_every_kind_of_host_read():
    t = torch.ones(())
    with CountHostReads() as mode:
        t.item(), bool(t), float(t), int(t), t.tolist(), t.cpu(), t.numpy(), f"{t:.1f}", range(10)[torch.tensor(3)]
        if t > 0:
            pass
    assert mode.reads == ["item", "__bool__", "__float__", "__int__", "tolist", "cpu", "numpy", "__format__",
                          "__index__", "__bool__"]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("settings", [dict(activation="relu", batches_per_item=3),
                                      dict(activation="relu", revive="resample", tied=True),
                                      dict(activation="relu", revive="resample", tied=False),
                                      dict(activation="relu", revive="resample", batch_size=8),
                                      dict(activation="topk", k=4, revive="auxk", center_input=True)],
                         ids=["relu-grouped", "relu-resample", "relu-untied-resample", "relu-resample-many-dead",
                              "topk-auxk"])
def test_sae_fit_reads_nothing_back_between_logging_steps(tmp_path, settings, device):
    layer_dir = tmp_path / "cache" / "layer-00"
    planted_cache(layer_dir, n=3000)
    torch.manual_seed(0)
    # Resampling due every 10 optimizer steps through the whole fit: at items 10, 20, 30, 40 and 60 (50 is logged)
    sae = SAEConfig(expansions=[1, 2], learning_rate=1e-3, dead_window=10, resample_until=1.0,
                    **{"batch_size": 32, **settings})
    module = SAEModule(sae, d_in=32)
    with torch.no_grad():
        for dictionary in module.saes.values():
            dictionary.b_enc[:20] = -100.0  # features that cannot fire: dead at the first window, then revived
    counter = HostReadsPerItem()
    fit = trainer(tmp_path, accelerator="gpu" if device == "cuda" else "cpu", max_steps=60, log_every_n_steps=25,
                  limit_val_batches=0, callbacks=[counter])
    fit.fit(module, ActivationDataModule(str(layer_dir), sae))
    quiet = [reads for logged, reads in counter.items if not logged]
    assert len(counter.items) == 60 // sae.batches_per_item and len(quiet) >= len(counter.items) - 2
    assert [reads for reads in quiet if reads] == []
    if sae.revive == "resample":  # resampling ran (between logging steps) and revived the features that were dead
        assert all((d.b_enc[:20] > -100.0).all() for d in module.saes.values())
