"""The SAE training step's written-out loss and gradients (irm.sae.step.ReluSAEStep) against numpy and against
finite differences, and a fit through it against the same fit through autograd."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from irm.config import SAEConfig
from irm.sae import SAEModule, SparseAutoencoder
from irm.sae.step import ReluSAEStep


@pytest.fixture(autouse=True)
def one_thread():
    torch.set_num_threads(1)


def params(tied: bool, d_in: int = 5, d_hidden: int = 7, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    W_dec = torch.randn(d_hidden, d_in, generator=g, dtype=torch.float64)
    W_enc = None if tied else torch.randn(d_in, d_hidden, generator=g, dtype=torch.float64)
    b_enc = 0.5 * torch.randn(d_hidden, generator=g, dtype=torch.float64)  # some codes cut by the ReLU, some not
    b_dec = 0.3 * torch.randn(d_in, generator=g, dtype=torch.float64)
    return [p.requires_grad_() if p is not None else None for p in (W_dec, W_enc, b_enc, b_dec)]


@pytest.mark.parametrize("tied", [True, False])
def test_loss_and_outputs_match_numpy(tied):
    W_dec, W_enc, b_enc, b_dec = params(tied)
    x = torch.randn(9, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    loss, x_hat, codes, sums = ReluSAEStep.apply(x, W_dec, W_enc, b_enc, b_dec, 0.25)
    wd, be, bd, xn = (t.detach().numpy() for t in (W_dec, b_enc, b_dec, x))
    we = wd.T if tied else W_enc.detach().numpy()
    f = np.maximum(xn @ we + be, 0.0)
    xh = f @ wd + bd
    assert 0 < (f > 0).mean() < 1  # the ReLU both passes and cuts: its mask is exercised
    np.testing.assert_allclose(codes.numpy(), f, rtol=1e-12)
    np.testing.assert_allclose(x_hat.numpy(), xh, rtol=1e-12)
    np.testing.assert_allclose(sums.numpy(), f.sum(axis=0), rtol=1e-12)
    assert loss.item() == pytest.approx(((xh - xn) ** 2).mean() + 0.25 * np.abs(f).sum(axis=1).mean(), rel=1e-12)


@pytest.mark.parametrize("tied", [True, False])
def test_gradients_match_finite_differences(tied):
    W_dec, W_enc, b_enc, b_dec = params(tied, seed=2)
    x = torch.randn(6, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    inputs = [p for p in (W_dec, W_enc, b_enc, b_dec) if p is not None]

    def loss(*ps):
        it = iter(ps)
        wd, we = next(it), (None if tied else next(it))
        return ReluSAEStep.apply(x, wd, we, next(it), next(it), 0.1)[0]

    assert torch.autograd.gradcheck(loss, inputs, eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("tied", [True, False])
def test_a_module_step_equals_the_autograd_step(tied, monkeypatch):
    """SAEModules from the same seed take the same steps: through the written-out gradients set directly (one
    process), through them inside autograd (ReluSAEStep, as under DDP), and through autograd over
    SparseAutoencoder and sae_loss: the same parameters, Adam state and firing history after them."""
    x = torch.randn(3, 64, 16, generator=torch.Generator().manual_seed(4)).relu()
    states, backward_calls = [], []
    for written_out, direct in ((True, True), (True, False), (False, False)):
        torch.manual_seed(0)
        module = SAEModule(SAEConfig(expansions=[1, 2], tied=tied, revive="none"), d_in=16)
        opt = torch.optim.Adam(module.parameters(), lr=1e-2)
        monkeypatch.setattr(SAEModule, "_written_out", staticmethod(lambda *a, w=written_out: w))
        monkeypatch.setattr(SAEModule, "_direct_gradients", lambda self, d=direct: d)
        monkeypatch.setattr(SAEModule, "optimizers", lambda self, o=opt: o)
        calls = []
        monkeypatch.setattr(SAEModule, "manual_backward", lambda self, loss, c=calls: (c.append(1), loss.backward()))
        for x_BD in x:
            module._step(x_BD)
        states.append(module.state_dict())
        backward_calls.append(len(calls))
    assert backward_calls == [0, 3, 3]  # the direct path never calls autograd
    for state in states[1:]:
        for key, value in states[0].items():
            torch.testing.assert_close(value, state[key], rtol=1e-5, atol=1e-6, equal_nan=True, msg=key)


def test_gradients_skip_autograd_on_one_process_only():
    module = SAEModule(SAEConfig(), d_in=4)
    assert module._direct_gradients()  # no trainer: one process

    class Trainer:
        world_size, strategy, datamodule = 2, None, None
    module.trainer = Trainer()
    module.setup("validate")
    assert not module._direct_gradients()
    Trainer.world_size = 1
    module.setup("validate")
    assert module._direct_gradients()


def test_the_written_out_step_is_used_for_the_papers_sae_only():
    relu, topk = SparseAutoencoder(4, 8), SparseAutoencoder(4, 8, activation="topk", k=2)
    centred = SparseAutoencoder(4, 8, center_input=True)
    x = torch.randn(3, 4)
    assert SAEModule._written_out(relu, x, auxk=False)
    assert not SAEModule._written_out(relu, x, auxk=True)
    assert not SAEModule._written_out(topk, x, auxk=False)
    assert not SAEModule._written_out(centred, x, auxk=False)
    assert not SAEModule._written_out(relu, x.bfloat16(), auxk=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not SAEModule._written_out(relu, x, auxk=False)


@pytest.mark.parametrize("every, refused", [(10, True), (12, False)])
def test_a_checkpoint_interval_must_be_a_multiple_of_batches_per_item(tmp_path, every, refused):
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint
    from test_sae import planted_cache

    from irm.activations.datamodule import ActivationDataModule
    from irm.errors import UserError

    planted_cache(tmp_path / "cache" / "layer-00", n=400, shard_rows=200)
    data = ActivationDataModule(str(tmp_path / "cache" / "layer-00"), SAEConfig(batch_size=16, batches_per_item=4))
    trainer = L.Trainer(accelerator="cpu", max_steps=8, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=str(tmp_path),
                        callbacks=[ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), every_n_train_steps=every)])
    if refused:
        with pytest.raises(UserError, match="every_n_train_steps=10 is not a multiple of batches_per_item=4"):
            trainer.fit(SAEModule(SAEConfig(expansions=[1]), d_in=32), data)
    else:
        trainer.fit(SAEModule(SAEConfig(expansions=[1]), d_in=32), data)
        assert trainer.global_step == 8
