"""The sparse autoencoder of paper 4.2 / appendix D: f = ReLU(W_enc^T x + b_enc), x_hat = W_dec^T f + b_dec, trained
on MSE + alpha * L1(f). Tied weights by default (the paper's choice, appendix J): the encoder is the transposed
decoder, one matrix whose rows are the dictionary's feature directions. TopK (sparsify's architecture: keep the k
largest ReLU codes of each input, no L1) is the other activation.

Inputs are normalised to a fixed mean norm, sqrt(d_in), before the SAE sees them (as SAELens and sparsify do), so the
L1 coefficient means the same at every layer and model: the SAE holds the factor (`input_scale`, estimated from the
training activations) and applies it itself. `encode` takes raw activations and `decode` returns raw activations;
`encode_normalized`/`decode_normalized` are the same maps in the normalised space the loss is computed in."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

ACTIVATIONS = ("relu", "topk")


def check_dictionary(what: str, sizes: dict[str, int], activation: str, activations: tuple, k_rule: str,
                     k: Optional[int]) -> None:
    """ValueError unless every size is positive, `activation` is one of `activations`, and under the k-sparse rule
    `k_rule` 1 <= k <= sizes["d_hidden"] (an SAE's or a crosscoder's shape, checked where it is built)."""
    if any(v < 1 for v in sizes.values()):
        raise ValueError(f"{what} sizes must be positive, got " + ", ".join(f"{n}={v}" for n, v in sizes.items()))
    if activation not in activations:
        raise ValueError(f"activation must be one of {activations}, got {activation!r}")
    if activation == k_rule and (k is None or not 1 <= int(k) <= sizes["d_hidden"]):
        raise ValueError(f"a {k_rule} {what} needs 1 <= k <= d_hidden={sizes['d_hidden']}, got k={k}")


class SparseAutoencoder(nn.Module):
    """One dictionary of `d_hidden` features over `d_in`-wide activations.

    Parameter names and shapes follow SAELens: `W_dec` [d_hidden, d_in] (rows = features), `W_enc` [d_in, d_hidden]
    (absent when tied), `b_enc` [d_hidden], `b_dec` [d_in]; all in the normalised space. The buffer `input_scale`
    (a scalar, 1 until a fit estimates it) maps raw activations into that space. Inputs may have any leading
    dimensions."""

    def __init__(self, d_in: int, d_hidden: int, tied: bool = True, activation: str = "relu",
                 k: Optional[int] = None, center_input: bool = False):
        super().__init__()
        check_dictionary("SAE", {"d_in": d_in, "d_hidden": d_hidden}, activation, ACTIVATIONS, "topk", k)
        self.d_in, self.d_hidden, self.tied = int(d_in), int(d_hidden), bool(tied)
        self.activation, self.k = activation, (int(k) if activation == "topk" else None)
        # sparsify's / SAELens's apply_b_dec_to_input: the encoder reads x - b_dec. The same family of maps as
        # f = act(W_enc x + b_enc) (b_enc absorbs W_enc b_dec), but every feature starts centred on the data: where
        # activations have a large mean, features pointing away from it would otherwise never fire.
        self.center_input = bool(center_input)
        # Random unit-norm features: every feature starts equally able to fire, none starts dead or dominant.
        w_dec_FD = torch.randn(d_hidden, d_in)
        w_dec_FD /= w_dec_FD.norm(dim=1, keepdim=True)
        self.W_dec = nn.Parameter(w_dec_FD)
        self.W_enc: Optional[nn.Parameter]
        if tied:
            self.register_parameter("W_enc", None)
        else:
            self.W_enc = nn.Parameter(w_dec_FD.t().clone())
        self.b_enc = nn.Parameter(torch.zeros(d_hidden))
        self.b_dec = nn.Parameter(torch.zeros(d_in))
        # Raw activations times input_scale have mean norm sqrt(d_in) (set by the fit; stored in exports' cfg.json).
        self.register_buffer("input_scale", torch.ones(()))

    def encoder_weight(self) -> torch.Tensor:
        """[d_in, d_hidden]: W_enc, or the transposed decoder when tied (normalised space)."""
        return self.W_dec.t() if self.W_enc is None else self.W_enc

    def pre_activations(self, x_n: torch.Tensor) -> torch.Tensor:
        """ReLU(x_n W_enc + b_enc) of normalised inputs, every feature (before TopK keeps k of them)."""
        # F.linear takes weight [out, in]; W_dec already is [d_hidden, d_in], so the tied case needs no transpose.
        weight_FD = self.W_dec if self.W_enc is None else self.W_enc.t()
        return F.relu(F.linear(x_n - self.b_dec if self.center_input else x_n, weight_FD, self.b_enc))

    def codes_from_pre(self, pre: torch.Tensor) -> torch.Tensor:
        """The codes given `pre_activations`: all of them (relu) or the k largest per input (topk)."""
        if self.activation == "relu":
            return pre
        values, indices = pre.topk(self.k, dim=-1, sorted=False)
        return torch.zeros_like(pre).scatter(-1, indices, values)

    def encode_normalized(self, x_n: torch.Tensor) -> torch.Tensor:
        return self.codes_from_pre(self.pre_activations(x_n))

    def decode_normalized(self, codes: torch.Tensor) -> torch.Tensor:
        return F.linear(codes, self.W_dec.t(), self.b_dec)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Feature activations (codes) of raw activations x, shape [..., d_hidden]: f = ReLU(s x W_enc + b_enc)
        (TopK: its k largest), s = input_scale."""
        return self.encode_normalized(x * self.input_scale.to(x.dtype))

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Raw-space reconstruction x_hat = (f W_dec + b_dec) / s, shape [..., d_in]."""
        return self.decode_normalized(codes) / self.input_scale.to(codes.dtype)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        codes = self.encode(x)
        return self.decode(codes), codes

    @property
    def dictionary(self) -> torch.Tensor:
        """[d_hidden, d_in]: the feature directions (decoder rows), detached."""
        return self.W_dec.detach()

    @torch.no_grad()
    def normalize_decoder_(self) -> None:
        """Rescale decoder rows to unit norm, after every optimizer step. Otherwise the L1 penalty is bought by
        shrinking codes while growing decoder rows: untied, the row grows freely; tied, a row scaled by c makes its
        code c times larger but its contribution c^2 times, so the same reconstruction costs 1/c of the L1."""
        self.W_dec /= self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12)

    def extra_repr(self) -> str:
        topk = f", k={self.k}" if self.activation == "topk" else ""
        return (f"d_in={self.d_in}, d_hidden={self.d_hidden}, tied={self.tied}, activation={self.activation}{topk}, "
                f"center_input={self.center_input}")


NORMALIZE_ROWS = 32768  # training rows read to estimate an input's normalisation


def normalisation(cache, stop: int, normalize: bool = True) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    """(scale, normalised mean) of the activations in rows [0, stop) of `cache` (anything with `read_range`; acts
    [rows, ..., width]): scale = sqrt(width) / mean ||x|| per leading axis after the rows (1 when not `normalize`),
    float64. Each document's first token is left out: in many LMs its activations are an attention sink hundreds of
    times larger than any other token's (SmolLM2's last layers: mean norm 14460 vs 188), and would set the scale of
    every other token (SAELens likewise leaves BOS tokens out). None when there is no row."""
    if stop < 1:
        return None
    rows = cache.read_range(0, stop, ("acts", "positions"))
    x = rows["acts"].double()
    later = rows["positions"] > 0
    typical = x[later] if bool(later.any()) else x
    width = typical.shape[-1]
    scale = (width ** 0.5 / typical.norm(dim=-1).mean(dim=0).clamp_min(1e-12) if normalize
             else torch.ones(typical.shape[1:-1], dtype=torch.float64))
    return scale, typical.mean(dim=0) * scale[..., None]


def sae_loss(
    x_BD: torch.Tensor, x_hat_BD: torch.Tensor, codes_BF: torch.Tensor, l1_coefficient: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, mse, l1) of appendix D eq. 8 as the authors computed it: MSE averaged over rows and dimensions, L1 the
    per-row sum of |f| averaged over rows (the main text's "L1 on the decoder weights" is a slip)."""
    mse = F.mse_loss(x_hat_BD, x_BD)
    # Codes are ReLU outputs, so |f| = f: a plain sum skips the abs pass over the [rows, features] tensor.
    l1 = codes_BF.sum() / codes_BF.shape[0]
    return mse + l1_coefficient * l1, mse, l1


def auxk_loss(sae: SparseAutoencoder, x_n: torch.Tensor, x_hat_n: torch.Tensor, pre_BF: torch.Tensor,
              dead_F: torch.Tensor, k_aux: int) -> torch.Tensor:
    """sparsify's (and OpenAI's TopK paper's) auxiliary loss that revives dead features: the k_aux largest
    pre-activations among the dead features reconstruct the main reconstruction's residual (detached), scored as
    squared error over the residual's total variance and scaled down while fewer than k_aux features are dead. Zero
    when none is dead. Only dead features receive its gradient.

    Written without reading the dead count back to Python (a device-to-host sync on a GPU, every step): the top
    k_aux are always taken, and those that fall on live features (-inf after masking, when fewer than k_aux are dead)
    contribute nothing."""
    k = min(int(k_aux), pre_BF.shape[-1])
    values_BK, indices_BK = pre_BF.masked_fill(~dead_F, float("-inf")).topk(k, dim=-1, sorted=False)
    values_BK = torch.where(torch.isfinite(values_BK), values_BK, torch.zeros((), dtype=values_BK.dtype,
                                                                               device=values_BK.device))
    aux_codes_BF = torch.zeros_like(pre_BF).scatter(-1, indices_BK, values_BK)
    residual_BD = (x_n - x_hat_n).detach()
    residual_hat_BD = aux_codes_BF @ sae.W_dec  # no bias: the residual's mean is the main decoder's business
    total = (residual_BD - residual_BD.mean(dim=0)).pow(2).sum(dim=-1).mean().clamp_min(1e-12)
    weight = (dead_F.sum() / k_aux).clamp(max=1.0).to(pre_BF.dtype)  # 0 when none is dead
    return weight * (residual_hat_BD - residual_BD).pow(2).sum(dim=-1).mean() / total


# Reconstruction statistics of a set of rows as one vector that merges exactly across batches and DDP ranks, so a metric
# over an epoch or a global batch is the metric of the union of its rows, not an average of per-batch ratios. Layout:
# [rows, active codes, summed codes, then per input dimension: mean of x, centred sum of squares of x, mean of the
# residual x - x_hat, centred sum of squares of the residual]. Centred sums (merged with Chan et al.'s pairwise
# update) in float64: no cancellation where a dimension's mean dwarfs its spread, as in LM activations' outlier dims.
_HEAD = 3


@torch.no_grad()
def row_moments(x_BD: torch.Tensor, x_hat_BD: torch.Tensor, codes_BF: torch.Tensor,
                dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The statistics vector [3 + 4 * d_in] of one batch (any leading dimensions)."""
    d = x_BD.shape[-1]
    x = x_BD.reshape(-1, d).to(dtype)
    err = x - x_hat_BD.reshape(-1, d).to(dtype)
    x_mean, err_mean = x.mean(dim=0), err.mean(dim=0)
    head = torch.stack([torch.full((), x.shape[0], dtype=dtype, device=x.device),  # a fill: no host sync
                        torch.count_nonzero(codes_BF).to(dtype), codes_BF.sum(dtype=dtype)])
    return torch.cat([head, x_mean, (x - x_mean).pow(2).sum(dim=0), err_mean, (err - err_mean).pow(2).sum(dim=0)])


def empty_moments(d_in: int, dtype: torch.dtype = torch.float64, device=None) -> torch.Tensor:
    """The statistics vector of no rows: what a rank without held-out rows contributes."""
    return torch.zeros(_HEAD + 4 * d_in, dtype=dtype, device=device)


@torch.no_grad()
def merge_moments(moments_KS: torch.Tensor) -> torch.Tensor:
    """[..., K, 3 + 4 * d_in] statistics of K disjoint row sets -> [..., 3 + 4 * d_in] of their union."""
    d = (moments_KS.shape[-1] - _HEAD) // 4
    n_K1 = moments_KS[..., :1]
    n_1 = n_K1.sum(dim=-2).clamp_min(1)
    out = [moments_KS[..., :_HEAD].sum(dim=-2)]
    for start in (_HEAD, _HEAD + 2 * d):  # x, then the residual
        mean_KD, m2_KD = moments_KS[..., start: start + d], moments_KS[..., start + d: start + 2 * d]
        mean_D = (n_K1 * mean_KD).sum(dim=-2) / n_1
        out += [mean_D, m2_KD.sum(dim=-2) + (n_K1 * (mean_KD - mean_D.unsqueeze(-2)).pow(2)).sum(dim=-2)]
    return torch.cat(out, dim=-1)


@torch.no_grad()
def moment_metrics(moments_S: torch.Tensor) -> dict[str, torch.Tensor]:
    """MSE (over rows and dimensions, as `sae_loss`), normalised MSE (MSE / total variance of x), explained variance
    (1 - Var(x - x_hat) / Var(x), variances summed over dimensions; it exceeds 1 - nmse by the residual's mean, a
    bias the decoder has not learnt), L1 (summed codes per row) and L0 (active codes per row, "true sparsity",
    appendix J) of the rows the statistics describe."""
    d = (moments_S.shape[0] - _HEAD) // 4
    n, active, code_sum = moments_S[0].clamp_min(1), moments_S[1], moments_S[2]
    x_m2 = moments_S[_HEAD + d: _HEAD + 2 * d].sum().clamp_min(1e-12)
    err_mean, err_m2 = moments_S[_HEAD + 2 * d: _HEAD + 3 * d], moments_S[_HEAD + 3 * d:].sum()
    sq_err = err_m2 + n * err_mean.pow(2).sum()
    return {"mse": sq_err / (n * d), "nmse": sq_err / x_m2, "l1": code_sum / n, "l0": active / n,
            "explained_variance": 1.0 - err_m2 / x_m2}
