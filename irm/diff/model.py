"""The crosscoder of model diffing (README "Model diffing"; Anthropic 2024, Minder, Dumas et al. 2025): one sparse
dictionary over the base and the tuned model's activations at the same tokens, f = ReLU(sum_m W_enc^m (x^m - b_dec^m)
+ b_enc), each latent with one decoder row per model, x_hat^m = sum_j f_j d_j^m + b_dec^m.

Two sparsity rules. BatchTopK (the default; Bussmann et al. 2024, the crosscoder of Minder, Dumas et al.): of a
batch's [rows, latents] codes, keep the k * rows largest values of f_j * sum_m ||d_j^m|| across the whole batch, so
tokens take as many latents as they need and k is the average; at inference a threshold learnt during training (a
running average of the smallest kept value) replaces the batch. L1 (Anthropic's crosscoder): every code, with the
penalty l1 * sum_j f_j * sum_m ||d_j^m|| - the loss that invents tuned-only latents by shrinking a weak base decoder
to zero (complete shrinkage), kept to show that artifact.

Decoder rows are not normalised, unlike the SAE's: the ratio of a latent's base and tuned decoder norms is what model
diffing reads, and both rules see f_j only through f_j * ||d_j|| (selection, penalty), so rescaling a latent's
decoder against its code changes nothing. Inputs are normalised per model to mean norm sqrt(d_in), as the SAE's
(`input_scale` [models]); `encode` takes raw activations, `decode` returns them. Shapes: B rows, M models (0 base,
1 tuned), D width, F latents."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from irm.sae.model import auxk_loss, check_dictionary

ACTIVATIONS = ("batchtopk", "relu")
BASE, TUNED = 0, 1  # model index along the M axis: activations [rows, 2, width] hold base then tuned
THRESHOLD_MOMENTUM = 0.99  # running average of the smallest kept value, the inference threshold (per step)


class Crosscoder(nn.Module):
    """`d_hidden` latents over `n_models` models' `d_in`-wide activations.

    Parameters: `W_enc` [M, D, F], `b_enc` [F], `W_dec` [F, M, D] (latent j's decoder for model m is W_dec[j, m]),
    `b_dec` [M, D], all in the normalised space; buffers `input_scale` [M] and `threshold` (BatchTopK's inference
    threshold on f_j * sum_m ||d_j^m||; negative until training has set it)."""

    def __init__(self, d_in: int, d_hidden: int, n_models: int = 2, activation: str = "batchtopk",
                 k: Optional[int] = None):
        super().__init__()
        check_dictionary("crosscoder", {"d_in": d_in, "d_hidden": d_hidden, "n_models": n_models}, activation,
                         ACTIVATIONS, "batchtopk", k)
        self.d_in, self.d_hidden, self.n_models = int(d_in), int(d_hidden), int(n_models)
        self.activation, self.k = activation, (int(k) if activation == "batchtopk" else None)
        # Each (latent, model) decoder a random direction of norm 1 / M: every latent starts with the same summed norm
        # 1 and equal norms in every model (relative norm difference 0), so neither model is favoured at the start.
        w_dec_FMD = torch.randn(d_hidden, n_models, d_in)
        w_dec_FMD *= 1.0 / (n_models * w_dec_FMD.norm(dim=-1, keepdim=True))
        self.W_dec = nn.Parameter(w_dec_FMD)
        self.W_enc = nn.Parameter(w_dec_FMD.permute(1, 2, 0).clone())
        self.b_enc = nn.Parameter(torch.zeros(d_hidden))
        self.b_dec = nn.Parameter(torch.zeros(n_models, d_in))
        self.register_buffer("input_scale", torch.ones(n_models))
        self.register_buffer("threshold", torch.full((), -1.0))

    def decoder_norms(self) -> torch.Tensor:
        """[F, M]: ||d_j^m||, detached."""
        return self.W_dec.detach().norm(dim=-1)

    def pre_activations(self, x_n: torch.Tensor) -> torch.Tensor:
        """ReLU(sum_m (x^m - b_dec^m) W_enc^m + b_enc) of normalised inputs [B, M, D] -> [B, F], every latent."""
        # One [B, M*D] x [M*D, F] product (an einsum over m runs M smaller ones: 1.7x slower at 576 x 1152).
        return F.relu(torch.addmm(self.b_enc, (x_n - self.b_dec).flatten(-2), self.W_enc.flatten(0, 1)))

    def scores(self, pre_BF: torch.Tensor) -> torch.Tensor:
        """What BatchTopK ranks: f_j * sum_m ||d_j^m||, a latent's code times its decoder norms."""
        return pre_BF * self.W_dec.norm(dim=-1).sum(dim=-1)

    def batch_codes(self, pre_BF: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(codes, smallest kept score) by the training rule: relu keeps every code, batchtopk the k * rows
        best-scored of the batch (`batch_topk`)."""
        if self.activation == "relu":
            return pre_BF, pre_BF.new_zeros(())
        return batch_topk(pre_BF, self.scores(pre_BF), self.k)

    def codes_from_pre(self, pre_BF: torch.Tensor, batch: bool) -> torch.Tensor:
        """The codes given `pre_activations`: all of them (relu); for batchtopk the batch rule (`batch`, training)
        or, per token, those whose score is above the learnt threshold (inference; the batch rule until training
        has set a threshold)."""
        if self.activation == "relu" or batch or float(self.threshold) < 0:
            return self.batch_codes(pre_BF)[0]
        return pre_BF * (self.scores(pre_BF) > self.threshold)

    def encode_normalized(self, x_n: torch.Tensor, batch: bool = False) -> torch.Tensor:
        return self.codes_from_pre(self.pre_activations(x_n), batch)

    def decode_normalized(self, codes_BF: torch.Tensor) -> torch.Tensor:
        return (codes_BF @ self.W_dec.flatten(1)).unflatten(-1, self.b_dec.shape) + self.b_dec

    def normalize(self, x_BMD: torch.Tensor) -> torch.Tensor:
        return x_BMD * self.input_scale.to(x_BMD.dtype)[:, None]

    def encode(self, x_BMD: torch.Tensor) -> torch.Tensor:
        """Codes [B, F] of raw paired activations [B, M, D] (per-token: the inference rule)."""
        return self.encode_normalized(self.normalize(x_BMD))

    def decode(self, codes_BF: torch.Tensor) -> torch.Tensor:
        """Raw-space reconstructions [B, M, D]."""
        return self.decode_normalized(codes_BF) / self.input_scale.to(codes_BF.dtype)[:, None]

    def forward(self, x_BMD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        codes_BF = self.encode(x_BMD)
        return self.decode(codes_BF), codes_BF

    @torch.no_grad()
    def update_threshold(self, smallest_kept: torch.Tensor) -> None:
        """Fold one training batch's smallest kept weighted value into the inference threshold."""
        # No read back to Python: a device-to-host sync on every step of a GPU fit.
        average = THRESHOLD_MOMENTUM * self.threshold + (1.0 - THRESHOLD_MOMENTUM) * smallest_kept
        self.threshold.copy_(torch.where(self.threshold < 0, smallest_kept, average))

    def extra_repr(self) -> str:
        k = f", k={self.k}" if self.activation == "batchtopk" else ""
        return f"d_in={self.d_in}, d_hidden={self.d_hidden}, n_models={self.n_models}, activation={self.activation}{k}"


def batch_topk(pre_BF: torch.Tensor, scored_BF: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, smallest kept score): `pre_BF` where `scored_BF` is among the k * rows largest of the whole batch
    and positive (a zero code is not a kept latent; with fewer positive scores than k * rows, all of them and a
    smallest kept score of 0). A comparison with the k*rows-th largest score rather than a scatter of the top
    indices: the same set up to exact ties, at a fraction of the cost."""
    n = min(k * pre_BF.shape[0], scored_BF.numel())
    smallest = scored_BF.detach().reshape(-1).topk(n, sorted=False).values.min().clamp_min(0)
    keep = (scored_BF >= smallest) & (scored_BF > 0)
    return pre_BF * keep, smallest


def crosscoder_loss(cc: Crosscoder, x_n: torch.Tensor, x_hat_n: torch.Tensor, codes_BF: torch.Tensor,
                    l1_coefficient: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, squared error, penalty) of Anthropic's crosscoder: the squared error summed over models and dimensions
    and averaged over rows, plus l1 * sum_j f_j sum_m ||d_j^m|| averaged over rows (0 for batchtopk, whose
    sparsity is the selection)."""
    sq_err = (x_hat_n - x_n).pow(2).sum(dim=(-2, -1)).mean()
    penalty = (codes_BF * cc.W_dec.norm(dim=-1).sum(dim=-1)).sum(dim=-1).mean()
    return sq_err + l1_coefficient * penalty, sq_err, penalty


def crosscoder_auxk(cc: Crosscoder, x_n: torch.Tensor, x_hat_n: torch.Tensor, pre_BF: torch.Tensor,
                    dead_F: torch.Tensor, k_aux: int) -> torch.Tensor:
    """The SAE's AuxK loss (irm.sae.model.auxk_loss) on the models' concatenated activations: the dead latents'
    largest pre-activations rebuild the residual of both models at once ([F, M * D] decoder rows)."""
    flat = SimpleNamespace(W_dec=cc.W_dec.flatten(1))  # auxk_loss reads only the decoder rows
    return auxk_loss(flat, x_n.flatten(1), x_hat_n.flatten(1), pre_BF, dead_F, k_aux)
