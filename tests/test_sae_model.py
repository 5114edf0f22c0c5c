"""The SAE's maths (irm/sae/model.py) at the edges the Lightning fits never reach, each against numpy or by hand:
initial and renormalised decoder rows of any norm, the auxiliary loss with few dead features or a small residual,
and the merged reconstruction statistics of tiny, empty and small-valued row sets. No training: milliseconds each
(the mutation check runs this file first for sae/model.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from irm.sae.model import (SparseAutoencoder, auxk_loss, empty_moments, merge_moments, moment_metrics, row_moments,
                           sae_loss)

torch.set_num_threads(1)


def numpy_metrics(x, x_hat, codes) -> dict:
    """moment_metrics' definitions written out in numpy (float64) on the rows themselves."""
    x, err, f = (np.asarray(a, dtype=np.float64).reshape(-1, np.shape(a)[-1]) for a in (x, x - x_hat, codes))
    return {"mse": (err ** 2).mean(), "nmse": (err ** 2).sum() / ((x - x.mean(0)) ** 2).sum(),
            "explained_variance": 1 - ((err - err.mean(0)) ** 2).sum() / ((x - x.mean(0)) ** 2).sum(),
            "l1": f.sum(axis=1).mean(), "l0": (f != 0).sum(axis=1).mean()}


@pytest.mark.parametrize("tied", [True, False])
def test_a_new_sae_starts_with_unit_decoder_rows_the_encoder_their_transpose_and_zero_biases(tied):
    torch.manual_seed(0)
    sae = SparseAutoencoder(7, 11, tied=tied)
    np.testing.assert_allclose(sae.W_dec.detach().norm(dim=1).numpy(), np.ones(11), rtol=1e-6)
    assert torch.equal(sae.encoder_weight(), sae.W_dec.detach().t())
    assert (sae.b_enc == 0).all() and (sae.b_dec == 0).all() and sae.input_scale.item() == 1.0


def test_renormalising_rows_shorter_than_one_and_a_zero_row():
    """Rows of norm 0.001 .. 0.5 and 3 become unit rows; a zero row stays zero (no NaN)."""
    sae = SparseAutoencoder(5, 6, tied=True)
    scales = torch.tensor([1e-3, 0.01, 0.1, 0.5, 3.0, 0.0])
    with torch.no_grad():
        sae.W_dec.mul_(scales.unsqueeze(1))
    direction = sae.W_dec.detach()[:5] / scales[:5].unsqueeze(1)
    sae.normalize_decoder_()
    np.testing.assert_allclose(sae.W_dec.detach().norm(dim=1).numpy(), [1, 1, 1, 1, 1, 0], rtol=1e-5, atol=0)
    np.testing.assert_allclose(sae.W_dec.detach()[:5].numpy(), direction.numpy(), rtol=1e-4, atol=1e-6)


def test_smallest_sizes_and_the_extreme_k_are_accepted():
    assert SparseAutoencoder(1, 1).dictionary.shape == (1, 1)
    x = torch.randn(4, 3)
    for k in (1, 5):  # k = 1 and k = d_hidden
        sae = SparseAutoencoder(3, 5, tied=False, activation="topk", k=k)
        with torch.no_grad():
            sae.b_enc.fill_(10.0)
        assert ((sae.encode(x) > 0).sum(dim=-1) == k).all()
    for bad in (dict(d_in=0, d_hidden=3), dict(d_in=3, d_hidden=0)):
        with pytest.raises(ValueError, match="positive"):
            SparseAutoencoder(**bad)
    with pytest.raises(ValueError, match="k <= d_hidden"):
        SparseAutoencoder(3, 5, activation="topk", k=0)


def numpy_auxk(pre, x, x_hat, w_dec, dead, k_aux):
    n_dead = int(dead.sum())
    aux = np.zeros_like(pre)
    for i in range(len(pre)):
        idx = [j for j in np.argsort(-pre[i], kind="stable") if dead[j]][:k_aux]
        aux[i, idx] = pre[i, idx]
    r = x - x_hat
    total = ((r - r.mean(0)) ** 2).sum(1).mean()
    return min(n_dead / k_aux, 1.0) * (((aux @ w_dec) - r) ** 2).sum(1).mean() / total


@pytest.mark.parametrize("scale", [1.0, 0.01])  # 0.01: a residual whose total variance is far below 1
def test_auxk_loss_with_fewer_dead_features_than_k_aux_is_scaled_down(scale):
    torch.manual_seed(2)
    sae = SparseAutoencoder(6, 12, tied=False, activation="topk", k=2)
    with torch.no_grad():
        sae.b_enc.fill_(0.5)  # every dead feature's pre-activation is positive
    x = scale * torch.randn(9, 6)
    pre = sae.pre_activations(x)
    x_hat = sae.decode_normalized(sae.codes_from_pre(pre))
    dead = torch.zeros(12, dtype=torch.bool)
    dead[[3, 8]] = True
    loss = auxk_loss(sae, x, x_hat, pre, dead, k_aux=3)
    args = (pre.detach().double().numpy(), x.double().numpy(), x_hat.detach().double().numpy(),
            sae.W_dec.detach().double().numpy(), dead.numpy())
    expected = numpy_auxk(*args, k_aux=3)  # 2 of k_aux = 3 dead: scaled by 2/3
    assert loss.item() == pytest.approx(expected, rel=1e-4)
    assert auxk_loss(sae, x, x_hat, pre, dead, k_aux=1).item() == pytest.approx(numpy_auxk(*args, k_aux=1), rel=1e-4)
    one = torch.zeros(12, dtype=torch.bool)
    one[5] = True  # a single dead feature: scaled by 1/3, not skipped
    expected_one = numpy_auxk(*args[:4], one.numpy(), k_aux=3)
    assert expected_one > 0 and auxk_loss(sae, x, x_hat, pre, one, k_aux=3).item() == pytest.approx(expected_one,
                                                                                                     rel=1e-4)


def test_loss_l1_divides_by_rows_not_features():
    x, x_hat = torch.zeros(2, 3), torch.zeros(2, 3)
    codes = torch.tensor([[1.0, 2.0, 0.0, 0.0, 1.0], [0.0, 0.0, 4.0, 0.0, 0.0]])
    loss, mse, l1 = sae_loss(x, x_hat, codes, 0.5)
    assert (loss.item(), mse.item(), l1.item()) == (2.0, 0.0, 4.0)  # (1 + 2 + 1 + 4) / 2 rows; 0.5 * 4


def stats(rows):
    return {k: v.item() for k, v in moment_metrics(rows).items()}


@pytest.mark.parametrize("scale", [1.0, 1e-3])  # 1e-3: the total variance of x is far below 1
def test_statistics_of_a_batch_against_numpy_at_any_scale(scale):
    g = torch.Generator().manual_seed(5)
    x = scale * (torch.randn(5, 3, 4, generator=g, dtype=torch.float64) + 2.0)  # leading dims [5, 3]
    x_hat = x + scale * (0.3 * torch.randn(5, 3, 4, generator=g, dtype=torch.float64) + 0.1)
    codes = torch.relu(torch.randn(5, 3, 6, generator=g, dtype=torch.float64))
    assert stats(row_moments(x, x_hat, codes)) == pytest.approx(numpy_metrics(x, x_hat, codes), rel=1e-9)


def test_merged_statistics_equal_the_unions_including_empty_ranks_and_single_rows():
    """Disjoint row sets (sizes 1, 0, 4, 2: a rank with one row, a rank with none) merged = the statistics of their
    union; the union of one row with empty ranks is that row's own statistics."""
    g = torch.Generator().manual_seed(6)
    x = torch.randn(7, 3, generator=g, dtype=torch.float64) * torch.tensor([1.0, 5.0, 0.2], dtype=torch.float64) + 3
    x_hat = x + 0.2 * torch.randn(7, 3, generator=g, dtype=torch.float64) - 0.05
    codes = torch.relu(torch.randn(7, 4, generator=g, dtype=torch.float64))
    parts = [(0, 1), None, (1, 5), (5, 7)]
    moments = torch.stack([empty_moments(3) if p is None else row_moments(x[p[0]:p[1]], x_hat[p[0]:p[1]],
                                                                          codes[p[0]:p[1]]) for p in parts])
    merged = merge_moments(moments)
    assert merged[0].item() == 7
    assert stats(merged) == pytest.approx(numpy_metrics(x, x_hat, codes), rel=1e-9)
    assert torch.allclose(merged, row_moments(x, x_hat, codes), rtol=1e-12, atol=1e-12)
    # batched over a leading dimension: two independent merges at once
    twice = merge_moments(torch.stack([moments, moments]))
    assert torch.equal(twice[0], merged) and torch.equal(twice[1], merged)
    one = merge_moments(torch.stack([empty_moments(3), moments[0], empty_moments(3)]))
    assert torch.allclose(one, moments[0], rtol=0, atol=1e-15)
    single = stats(one)  # one row: its mse, l1 and l0; no spread, so nmse and explained variance are degenerate
    err = (x[0] - x_hat[0]).numpy()
    assert single["mse"] == pytest.approx((err ** 2).mean(), rel=1e-12)
    assert single["l1"] == pytest.approx(codes[0].sum().item(), rel=1e-12)
    assert single["l0"] == (codes[0] > 0).sum().item()
