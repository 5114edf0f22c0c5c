"""The crosscoder LightningModule (README "Model diffing"): one crosscoder of a layer trained on paired [base; tuned]
activations (irm.diff.data.PairedDataModule), BatchTopK with AuxK reviving dead latents, or Anthropic's L1 loss;
per-model reconstruction quality logged on the training batches and the held-out tail."""

from __future__ import annotations

import dataclasses
from typing import Optional

import lightning as L
import torch

from irm.diff.config import DiffConfig
from irm.diff.model import Crosscoder, crosscoder_auxk, crosscoder_loss
from irm.errors import UserError
from irm.sae.model import NORMALIZE_ROWS, empty_moments, merge_moments, moment_metrics, normalisation, row_moments
from irm.sae.revival import FeatureActivity

MODEL_NAMES = ("base", "tuned")  # in the order of the M axis (irm.diff.model.BASE, TUNED)


class CrosscoderModule(L.LightningModule):
    """One crosscoder of `cfg.expansion` x width latents over two models' activations of width `d_in` (read from the
    datamodule's `width` when not given), under the run config's `diff` section (irm.diff.config.DiffConfig: each
    field's meaning is documented there; its ranges are checked by `DiffConfig.check` before any work).

    activation "batchtopk": k latents per row on average over a batch, AuxK (weight aux_coefficient) reviving
    latents dead for dead_window steps; "relu": every code, with Anthropic's penalty l1_coefficient * sum_j f_j
    sum_m ||d_j^m||. Each model's activations are scaled to mean norm sqrt(d_in), estimated on up to NORMALIZE_ROWS
    training rows."""

    def __init__(self, cfg: DiffConfig, d_in: Optional[int] = None):
        super().__init__()
        self.cfg = cfg if isinstance(cfg, DiffConfig) else DiffConfig(**cfg)  # a dict: from a checkpoint
        self.save_hyperparameters()
        self.hparams.cfg = dataclasses.asdict(self.cfg)  # checkpoints hold the section as a plain dict
        self.crosscoder: Optional[Crosscoder] = None
        self.activity: Optional[FeatureActivity] = None
        self._val_fired: Optional[torch.Tensor] = None
        self._val_moments: Optional[torch.Tensor] = None  # [model, statistics] of the held-out rows seen so far
        if d_in is not None:
            self._build(int(d_in))

    def _build(self, d_in: int) -> None:
        self.hparams.d_in = d_in  # recorded in checkpoints, so load_from_checkpoint rebuilds the same shapes
        cfg = self.cfg
        d_hidden = int(cfg.expansion) * d_in
        k = min(int(cfg.k), d_hidden) if cfg.activation == "batchtopk" else None
        self.crosscoder = Crosscoder(d_in, d_hidden, len(MODEL_NAMES), cfg.activation, k)
        self.activity = FeatureActivity(d_hidden)

    @property
    def _l1(self) -> float:
        return self.cfg.l1_coefficient if self.cfg.activation == "relu" else 0.0

    def setup(self, stage: str) -> None:
        width = getattr(self.trainer.datamodule, "width", None) if self.trainer.datamodule is not None else None
        if self.crosscoder is None:
            if width is None:
                raise UserError("CrosscoderModule needs d_in (the activation width) or a datamodule with a `width`; "
                                "use irm.diff.data.PairedDataModule")
            self._build(int(width))
        elif width is not None and int(width) != self.crosscoder.d_in:
            raise UserError(f"the crosscoder is {self.crosscoder.d_in} wide but the activations are {width} wide; "
                            "drop d_in or point the data at the matching layer")
        if stage == "fit" and self.global_step == 0:
            self._initialise_from_data()

    @torch.no_grad()
    def _initialise_from_data(self) -> None:
        """Per model: the factor sqrt(d_in) / mean ||x^m|| over up to NORMALIZE_ROWS training rows (each document's
        first token left out, as for the SAE: irm.sae.model.normalisation) and b_dec^m at the normalised mean."""
        paired = getattr(self.trainer.datamodule, "paired", None)
        if paired is None:
            raise UserError("the crosscoder estimates each model's activation scale from a PairedDataModule's caches; "
                            "train it with irm.diff.data.PairedDataModule")
        found = normalisation(paired, min(int(self.trainer.datamodule.split), NORMALIZE_ROWS))
        if found is None:
            return
        scale_M, mean_MD = found
        self.crosscoder.input_scale.copy_(scale_M.float())
        self.crosscoder.b_dec.copy_(mean_MD.float())

    def forward(self, x_BMD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(reconstructions [B, M, D], codes [B, F]) of raw paired activations, by the inference rule."""
        return self.crosscoder(x_BMD)

    def configure_optimizers(self):
        # Fused: each tensor updated in one pass (as the SAE module; CPU fused Adam needs float parameters, always here).
        return torch.optim.Adam(self.parameters(), lr=self.cfg.learning_rate, fused=True)

    def training_step(self, x_BMD: torch.Tensor, batch_idx: int) -> torch.Tensor:
        hp, cc = self.cfg, self.crosscoder
        x_n = cc.normalize(x_BMD)
        pre_BF = cc.pre_activations(x_n)
        codes_BF, smallest = cc.batch_codes(pre_BF)
        x_hat_n = cc.decode_normalized(codes_BF)
        loss, sq_err, penalty = crosscoder_loss(cc, x_n, x_hat_n, codes_BF, self._l1)
        if hp.activation == "batchtopk":
            dead_F = self.activity.dead(hp.dead_window)
            if hp.aux_coefficient > 0:
                # AuxK's scale: the residual's variance summed over both models, as the squared error is.
                loss = loss + hp.aux_coefficient * crosscoder_auxk(cc, x_n, x_hat_n, pre_BF, dead_F,
                                                                   max(1, cc.d_in // 2))
            cc.update_threshold(smallest)
        self.activity.observe(codes_BF)
        if self._logging_step():
            self._log_train(x_n, x_hat_n, codes_BF, sq_err, penalty)
        return loss

    def _logging_step(self) -> bool:
        every = self.trainer.log_every_n_steps
        return every > 0 and (self.global_step + 1) % every == 0

    @torch.no_grad()
    def _log_train(self, x_n, x_hat_n, codes_BF, sq_err, penalty) -> None:
        metrics = {"train/squared_error": sq_err.detach(), "train/penalty": penalty.detach(),
                   "train/dead_fraction": self.activity.dead_fraction(self.cfg.dead_window)}
        for m, name in enumerate(MODEL_NAMES):
            stats = moment_metrics(row_moments(x_n[:, m], x_hat_n[:, m], codes_BF))
            metrics.update({f"train/{name}/{k}": v.float() for k, v in stats.items()})
        self.log_dict(metrics, on_step=True, on_epoch=False, batch_size=x_n.shape[0])

    def on_validation_epoch_start(self) -> None:
        cc = self.crosscoder
        self._val_fired = torch.zeros(cc.d_hidden, dtype=torch.bool, device=self.device)
        self._val_moments = torch.stack([empty_moments(cc.d_in, device=self.device)] * cc.n_models)

    @torch.no_grad()
    def validation_step(self, x_BMD: torch.Tensor, batch_idx: int) -> None:
        cc = self.crosscoder
        x_n = cc.normalize(x_BMD)
        codes_BF = cc.encode_normalized(x_n)
        x_hat_n = cc.decode_normalized(codes_BF)
        self._val_fired |= codes_BF.amax(dim=0) > 0
        batch_MS = torch.stack([row_moments(x_n[:, m], x_hat_n[:, m], codes_BF) for m in range(cc.n_models)])
        self._val_moments = merge_moments(torch.stack([self._val_moments, batch_MS], dim=-2))

    def on_validation_epoch_end(self) -> None:
        metrics = {"val/dead_fraction": 1.0 - self._val_fired.float().mean()}
        for name, moments_S in zip(MODEL_NAMES, self._val_moments):
            metrics.update({f"val/{name}/{k}": v.float() for k, v in moment_metrics(moments_S).items()})
        self.log_dict(metrics, on_epoch=True)
