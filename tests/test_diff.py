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
    x = torch.randn(16, 2, 4)
    assert torch.equal(cc.encode(x), cc.encode_normalized(x, batch=True))  # no threshold yet: the batch rule
    cc.update_threshold(torch.tensor(0.5))
    cc.update_threshold(torch.tensor(1.5))
    assert float(cc.threshold) == pytest.approx(0.99 * 0.5 + 0.01 * 1.5)
    pre = cc.pre_activations(x)
    score = pre * cc.W_dec.norm(dim=-1).sum(dim=-1)
    assert torch.equal(cc.encode(x), torch.where(score > float(cc.threshold), pre, torch.zeros_like(pre)))
