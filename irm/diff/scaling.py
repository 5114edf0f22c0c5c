"""Reading a trained crosscoder (README "Model diffing"): each latent's relative decoder norm, Latent Scaling (Minder,
Dumas et al. 2025) and the classification into tuned-specific, base-specific and shared latents.

Latent Scaling. For latent j with direction d_j and codes f_ij over rows i, the scale beta that best explains a target
y_i (one model's activations, or a part of them) by the latent's contribution beta f_ij d_j:

    min_beta sum_i ||y_i - beta f_ij d_j||^2
    d/dbeta = -2 sum_i f_ij <d_j, y_i - beta f_ij d_j> = 0
    beta_j = sum_i f_ij <d_j, y_i> / (||d_j||^2 sum_i f_ij^2)

a ratio of sums over rows, so it streams: per latent and model `LatentScaling` accumulates sum_i f_ij <d_j, x_i^m>,
sum_i f_ij <d_j, e_i^m> (e = x - x_hat, the crosscoder's error) and sum_i f_ij^2. The direction is the tuned
decoder row for every latent (the question is how much of what the latent adds in the tuned model the base model
holds); the targets are Minder, Dumas et al.'s two:
- error: e_i^m + f_ij d_j^m, what model m's reconstruction leaves for latent j. A base beta near the tuned one means
  the base activations hold the direction that the base decoder failed to take (complete shrinkage);
- reconstruction: x_hat_i^m - f_ij d_j^m, what the other latents rebuild. A large base beta means other latents carry
  the direction in the base model (latent decoupling).
Both follow from the accumulated sums by linearity: sum_i f_ij <d_j, f_ij d_j^m> = <d_j, d_j^m> sum_i f_ij^2.

Classification (thresholds below, per latent): dead if it never fired on the held-out rows; by the relative norm
difference delta = (||d^tuned|| - ||d^base||) / max(both), in [-1, 1], tuned-only if delta >= SPECIFIC, base-only if
<= -SPECIFIC, shared if |delta| <= SHARED, else partial. A tuned-only latent is called tuned-specific only when Latent
Scaling agrees: nu_error = beta_error^base / beta_error^tuned <= NU_MAX and beta_reconstruction^base <= NU_MAX
beta_error^tuned (the base's other latents rebuild at most NU_MAX of what the latent adds in the tuned model; Minder
et al. divide by the tuned reconstruction beta instead, which is near 0 for a clean tuned-only latent and makes the
ratio noise). Tuned-only latents that fail it are artifacts ("tuned-only artifact"). Base-specific is the mirror
image (base decoder direction, roles swapped)."""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from irm.diff.model import BASE, TUNED

SPECIFIC = 0.8  # |delta| >= 0.8: one model's decoder at most 1/5 of the other's (Minder et al.'s chat-only bin)
SHARED = 0.2  # |delta| <= 0.2: both within 20% of each other (their shared bin, 0.4..0.6 on their 0..1 scale)
NU_MAX = 0.2  # Latent Scaling: the other model holds at most a fifth of the latent's contribution
CLASSES = ("tuned-specific", "base-specific", "shared", "partial", "tuned-only artifact", "base-only artifact", "dead")


def relative_norm_difference(norms_FM: torch.Tensor) -> torch.Tensor:
    """(||d^tuned|| - ||d^base||) / max(||d^tuned||, ||d^base||) per latent, in [-1, 1] (0 where both are 0).
    Anthropic's relative norm ||d^tuned|| / (||d^base|| + ||d^tuned||) in [0, 1] is 1 / (2 - delta) for delta >= 0
    and (1 + delta) / (2 + delta) below: the same order."""
    base, tuned = norms_FM[:, BASE], norms_FM[:, TUNED]
    return (tuned - base) / torch.maximum(base, tuned).clamp_min(1e-12)


class LatentScaling:
    """Streaming Latent Scaling of every latent for every model against one direction per latent.

    directions_FD: the direction d_j of each latent; decoders_FMD: the decoder rows d_j^m (for the error and
    reconstruction targets). Call `update` with each batch's codes, activations and reconstructions (one space, raw
    or normalised, for all three), then `betas()`."""

    def __init__(self, directions_FD: torch.Tensor, decoders_FMD: torch.Tensor):
        self.d_FD = directions_FD.detach().double()
        self.own_FM = torch.einsum("fd,fmd->fm", self.d_FD, decoders_FMD.detach().double())  # <d_j, d_j^m>
        n_f, n_m = self.own_FM.shape
        self.ff_F = torch.zeros(n_f, dtype=torch.float64)
        self.fx_FM = torch.zeros(n_f, n_m, dtype=torch.float64)
        self.fe_FM = torch.zeros(n_f, n_m, dtype=torch.float64)

    @torch.no_grad()
    def update(self, codes_BF: torch.Tensor, x_BMD: torch.Tensor, x_hat_BMD: torch.Tensor) -> None:
        f_BF, x = codes_BF.double().cpu(), x_BMD.double().cpu()
        self.ff_F += f_BF.pow(2).sum(dim=0)
        self.fx_FM += torch.einsum("bf,bmf->fm", f_BF, x @ self.d_FD.t())
        self.fe_FM += torch.einsum("bf,bmf->fm", f_BF, (x - x_hat_BMD.double().cpu()) @ self.d_FD.t())

    def betas(self) -> dict[str, np.ndarray]:
        """{target: beta [F, M]} for targets "activation" (y = x), "error" and "reconstruction"; NaN for a latent
        that never fired."""
        ff = self.ff_F[:, None]
        denom_FM = (self.d_FD.pow(2).sum(dim=1)[:, None] * ff).expand_as(self.fx_FM)
        denom_FM = torch.where(denom_FM > 0, denom_FM, torch.full_like(denom_FM, float("nan")))
        own = ff * self.own_FM
        return {"activation": (self.fx_FM / denom_FM).numpy(),
                "error": ((self.fe_FM + own) / denom_FM).numpy(),
                "reconstruction": ((self.fx_FM - self.fe_FM - own) / denom_FM).numpy()}


def scaling_ratios(error_FM: np.ndarray, reconstruction_FM: np.ndarray, of: int = TUNED) -> dict[str, np.ndarray]:
    """nu_error = beta_error^other / beta_error^of and nu_reconstruction = beta_reconstruction^other /
    beta_error^of per latent (the module docstring's criterion, latents fitted along model `of`'s decoder)."""
    other = BASE if of == TUNED else TUNED
    with np.errstate(divide="ignore", invalid="ignore"):
        return {"nu_error": error_FM[:, other] / error_FM[:, of],
                "nu_reconstruction": reconstruction_FM[:, other] / error_FM[:, of]}


def classify(delta_F: np.ndarray, fired_F: np.ndarray, nu_tuned: Optional[dict] = None,
             nu_base: Optional[dict] = None) -> np.ndarray:
    """Each latent's class (one of CLASSES) from its relative norm difference, whether it fired, and the Latent
    Scaling ratios of latents fitted along the tuned (`nu_tuned`) and base (`nu_base`) decoders (`scaling_ratios`).
    Without ratios a one-model-only latent is called specific on its norms alone (the uncorrected reading)."""
    delta_F = np.asarray(delta_F, dtype=np.float64)
    out = np.full(delta_F.shape, "partial", dtype=object)
    out[np.abs(delta_F) <= SHARED] = "shared"
    for sign, name, nu in ((1, "tuned", nu_tuned), (-1, "base", nu_base)):
        only = sign * delta_F >= SPECIFIC
        if nu is None:
            out[only] = f"{name}-specific"
            continue
        # NaN ratios (a latent that never fired, a zero tuned beta) fail the comparisons: not confirmed.
        confirmed = (np.abs(nu["nu_error"]) <= NU_MAX) & (np.abs(nu["nu_reconstruction"]) <= NU_MAX)
        out[only & confirmed] = f"{name}-specific"
        out[only & ~confirmed] = f"{name}-only artifact"
    out[~np.asarray(fired_F, dtype=bool)] = "dead"
    return out


def fractions(classes_F: np.ndarray) -> dict[str, float]:
    """The fraction of latents in each class (every class named, 0 when empty); dead latents count in the total."""
    n = max(len(classes_F), 1)
    return {c: float(np.sum(classes_F == c)) / n for c in CLASSES}


@torch.no_grad()
def read_crosscoder(cc, batches) -> dict:
    """Everything a crosscoder says about the pair, from paired raw batches [rows, 2, width] (the held-out rows):
    per latent the decoder norms, delta, the Latent Scaling betas along the tuned and the base decoder and their
    ratios, firing counts and class; the class fractions; per model explained variance, MSE and L0 (by the inference
    rule). Betas are in the normalised space (each model scaled to mean norm sqrt(width)), so they compare models."""
    from irm.sae.model import empty_moments, merge_moments, moment_metrics, row_moments

    decoders_FMD = cc.W_dec.detach().cpu()
    along = {"tuned": LatentScaling(decoders_FMD[:, TUNED], decoders_FMD),
             "base": LatentScaling(decoders_FMD[:, BASE], decoders_FMD)}
    fired_F = torch.zeros(cc.d_hidden, dtype=torch.long)
    moments_MS = torch.stack([empty_moments(cc.d_in)] * cc.n_models)
    for x_BMD in batches:
        x_n = cc.normalize(x_BMD.to(cc.W_dec.device, cc.W_dec.dtype))
        codes_BF = cc.encode_normalized(x_n)
        x_hat_n = cc.decode_normalized(codes_BF)
        fired_F += (codes_BF > 0).sum(dim=0).cpu()
        for scaling in along.values():
            scaling.update(codes_BF, x_n, x_hat_n)
        batch_MS = torch.stack([row_moments(x_n[:, m], x_hat_n[:, m], codes_BF).cpu() for m in range(cc.n_models)])
        moments_MS = merge_moments(torch.stack([moments_MS, batch_MS], dim=-2))
    norms_FM = cc.decoder_norms().cpu()
    delta_F = relative_norm_difference(norms_FM).numpy()
    betas = {name: s.betas() for name, s in along.items()}
    nu_tuned = scaling_ratios(betas["tuned"]["error"], betas["tuned"]["reconstruction"], of=TUNED)
    nu_base = scaling_ratios(betas["base"]["error"], betas["base"]["reconstruction"], of=BASE)
    classes = classify(delta_F, fired_F.numpy() > 0, nu_tuned, nu_base)
    uncorrected = classify(delta_F, fired_F.numpy() > 0)
    quality = {name: {k: float(v) for k, v in moment_metrics(moments_MS[m]).items()}
               for m, name in enumerate(("base", "tuned"))}
    return {"norms": norms_FM.numpy(), "delta": delta_F, "fired": fired_F.numpy(), "betas": betas,
            "nu_tuned": nu_tuned, "nu_base": nu_base, "classes": classes, "fractions": fractions(classes),
            "fractions_by_norm": fractions(uncorrected), "quality": quality, "rows": int(moments_MS[0, 0])}
