"""Dead features of an SAE (paper appendix D): which features have stopped firing, and Anthropic's resampling that
re-initialises them (sparsify's AuxK, the other revival, is irm.sae.model.auxk_loss). Both stay on the device: no
value is read back to the host, so a GPU running a fit never waits for them."""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn

from irm.sae.model import SparseAutoencoder

RESAMPLED_ENCODER_SCALE = 0.2  # resampled encoder columns: this times the live features' mean encoder norm (Anthropic)


class FeatureActivity(nn.Module):
    """How many optimizer steps ago each feature last fired: a feature is dead when it has not fired for `window`
    steps. A buffer, so a resumed fit keeps the history; updated on every step without a host sync."""

    def __init__(self, d_hidden: int):
        super().__init__()
        self.register_buffer("steps_since_fired", torch.zeros(d_hidden, dtype=torch.long))

    @torch.no_grad()
    def observe(self, codes_BF: torch.Tensor) -> None:
        self.record(codes_BF.detach().amax(dim=0) > 0)

    @torch.no_grad()
    def record(self, fired_F: torch.Tensor) -> None:
        """One step in which the features of the boolean mask `fired_F` fired."""
        self.steps_since_fired.add_(1).masked_fill_(fired_F, 0)

    @torch.no_grad()
    def restart(self, fresh_F: torch.Tensor) -> None:
        """The features of the boolean mask `fresh_F` were re-initialised: their window starts again."""
        self.steps_since_fired.masked_fill_(fresh_F, 0)

    @torch.no_grad()
    def dead(self, window: int, reduce=None) -> torch.Tensor:
        """Boolean mask of features silent for >= `window` steps. `reduce` takes the minimum over DDP ranks, so a
        feature firing on any rank is alive."""
        since = self.steps_since_fired if reduce is None else reduce(self.steps_since_fired)
        return since >= window

    @torch.no_grad()
    def dead_fraction(self, window: int, reduce=None) -> torch.Tensor:
        return self.dead(window, reduce).float().mean()


@torch.no_grad()
def resample_dead_(sae: SparseAutoencoder, dead_F: torch.Tensor, x_n: torch.Tensor, x_hat_n: torch.Tensor,
                   adam_state: dict, seed: int,
                   share: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> None:
    """Re-initialise the features of `sae` in the boolean mask `dead_F` (Anthropic's resampling, simplified): each
    gets the direction of the residual x_n - x_hat_n of a batch row drawn with probability proportional to its squared
    error (`draw_rows`, seeded with `seed`), as decoder row and (scaled to RESAMPLED_ENCODER_SCALE x the live
    features' mean encoder norm) encoder column, b_enc 0, and zeroed Adam moments (`adam_state`: the optimizer's
    state by parameter). `share` gives every DDP rank rank 0's directions.

    Every feature gets a candidate and the mask picks the dead ones' (a count of dead features read back to size the
    draw would make the host wait for the device). The values are those of the same resampling done on the dead
    features alone, except the live features' mean encoder norm: a sum over all features with the dead ones zeroed
    rounds in another order than one over the live ones, a difference in the last bit of the float."""
    err_BD = (x_n - x_hat_n).float()
    weight_B = err_BD.pow(2).sum(dim=1)
    weight_B = torch.where(weight_B.sum() > 0, weight_B, torch.ones_like(weight_B))
    dirs_FD = err_BD[draw_rows(weight_B, dead_F, seed)]
    dirs_FD = dirs_FD / dirs_FD.norm(dim=1, keepdim=True).clamp_min(1e-12)
    if share is not None:
        dirs_FD = share(dirs_FD)
    dead_F1 = dead_F.unsqueeze(1)
    sae.W_dec.copy_(torch.where(dead_F1, dirs_FD.to(sae.W_dec.dtype), sae.W_dec))
    if sae.W_enc is not None:
        alive_F = ~dead_F
        norm = torch.where(alive_F, sae.W_enc.norm(dim=0), 0.0).sum() / alive_F.sum()
        norm = torch.where(alive_F.any(), norm, 1.0)  # none alive: unit columns
        sae.W_enc.copy_(torch.where(dead_F, (dirs_FD.t() * RESAMPLED_ENCODER_SCALE * norm).to(sae.W_enc.dtype),
                                    sae.W_enc))
    sae.b_enc.masked_fill_(dead_F, 0.0)
    for param, mask in ((sae.W_dec, dead_F1), (sae.b_enc, dead_F), (sae.W_enc, dead_F)):
        state = adam_state.get(param) if param is not None else None
        for key in ("exp_avg", "exp_avg_sq"):
            if state and key in state:
                state[key].masked_fill_(mask, 0.0)


def draw_rows(weight_B: torch.Tensor, dead_F: torch.Tensor, seed: int) -> torch.Tensor:
    """[features] row indices: for the j-th feature of the mask `dead_F` (in index order), the j-th row that
    torch.multinomial(weight_B, n, replacement=n > rows) draws from a generator seeded with `seed`, n the number of
    dead features; any row for the others. Computed without knowing n on the host: both of multinomial's algorithms
    run, on generators seeded alike, and n picks one on the device. Without replacement, multinomial ranks the rows
    by weight / Exp(1) draws and takes the first n (its own algorithm: the first n of the full ranking); with
    replacement its draws are independent and in order (the first n of `features` draws)."""
    rows, features = weight_B.shape[0], dead_F.shape[0]
    rank_F = dead_F.cumsum(0) - 1  # j of the j-th dead feature

    def generator() -> torch.Generator:
        return torch.Generator(device=weight_B.device).manual_seed(seed)

    race_B = torch.empty_like(weight_B).exponential_(1, generator=generator())
    picked_F = torch.topk(weight_B / race_B, rows).indices[rank_F.clamp(0, rows - 1)]
    if features > rows:  # then there may be more dead features than rows, which multinomial draws with replacement
        drawn_F = torch.multinomial(weight_B, features, replacement=True, generator=generator())
        picked_F = torch.where(dead_F.sum() > rows, drawn_F[rank_F.clamp_min(0)], picked_F)
    return picked_F
