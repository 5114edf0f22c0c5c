"""The SAE LightningModule (paper 4.2, appendix D): a layer's dictionaries of every size (1x and 2x the activation
width) trained side by side on the same batches, so one read of the cache trains the pair; and the callback that
exports them for the later stages when a fit ends."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Optional, Sequence

import lightning as L
import torch
from torch import nn

from irm.errors import UserError
from irm.sae.model import SparseAutoencoder, empty_moments, merge_moments, moment_metrics, row_moments, sae_loss

# ModelCheckpoint warns that under manual optimisation a mid-epoch checkpoint holds the state after the step. That is
# the state its step count and optimizer state describe, so resuming from it reproduces an uninterrupted run.
warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization", category=UserWarning)


class FeatureActivity(nn.Module):
    """Which features fired recently, for the dead-feature fraction: a feature is dead when it has not fired for
    `window` optimizer steps. Buffers, so a resumed fit keeps the history."""

    def __init__(self, d_hidden: int):
        super().__init__()
        self.register_buffer("fired_since_check", torch.zeros(d_hidden, dtype=torch.bool))
        self.register_buffer("last_fired_step", torch.zeros(d_hidden, dtype=torch.long))

    @torch.no_grad()
    def observe(self, codes_BF: torch.Tensor) -> None:
        # One reduction over the batch per step and no host sync; the per-feature step is stamped at the next check.
        self.fired_since_check |= codes_BF.amax(dim=0) > 0

    @torch.no_grad()
    def dead_fraction(self, step: int, window: int, reduce=None) -> torch.Tensor:
        """Stamp features that fired since the last check with `step`; the fraction silent for >= `window` steps.
        `reduce` sums a tensor over DDP ranks, so a feature firing on any rank counts."""
        fired = self.fired_since_check.float()
        fired = (reduce(fired) if reduce is not None else fired) > 0
        self.last_fired_step[fired] = step
        self.fired_since_check.zero_()
        return ((step - self.last_fired_step) >= window).float().mean()


class SAEModule(L.LightningModule):
    """Sparse autoencoders of sizes `expansions` x `d_in` over one layer's activations.

    Args:
        d_in: activation width; None takes it from the datamodule's `width` when the fit starts.
        expansions: dictionary sizes as multiples of d_in (paper table 1: 1x and 2x d_model).
        l1_coefficient: alpha of the L1 term (paper 4.2: 1e-3; 1.5e-3 for GPT-Neo-125m).
        learning_rate: Adam step size (paper 4.2: 1e-3).
        tied: decoder = transposed encoder (paper appendix J's choice).
        dead_window: optimizer steps without firing after which a feature counts as dead.

    Training metrics (loss, MSE, normalised MSE, L1, L0, dead fraction, explained variance) are computed on the
    steps Lightning writes to the logger (`trainer.log_every_n_steps`), not on every step: the statistics cost passes
    over the codes and their logging would otherwise sync with the host each step. Under DDP they describe the global
    batch (every rank's batch of that step), and the validation/test metrics all held-out rows of every rank: each
    rank's statistics (`row_moments`) are gathered and merged, once per logging step or epoch.
    """

    def __init__(self, d_in: Optional[int] = None, expansions: Sequence[int] = (1, 2), l1_coefficient: float = 1.0e-3,
                 learning_rate: float = 1.0e-3, tied: bool = True, dead_window: int = 1000):
        super().__init__()
        expansions = list(expansions)
        if not expansions or any(int(e) != e or e < 1 for e in expansions) or len(set(expansions)) != len(expansions):
            raise UserError(f"expansions must be distinct whole numbers >= 1 (e.g. [1, 2]), not {expansions}")
        if l1_coefficient < 0 or learning_rate <= 0 or dead_window < 1:
            raise UserError("l1_coefficient must be >= 0, learning_rate > 0 and dead_window >= 1")
        self.save_hyperparameters()
        self.hparams.expansions = expansions
        # Manual optimisation: one backward for all dictionaries and no closure machinery per step.
        self.automatic_optimization = False
        self.saes = nn.ModuleDict()
        self.activity = nn.ModuleDict()
        self._val_fired: dict[str, torch.Tensor] = {}
        self._val_moments: Optional[torch.Tensor] = None  # [dictionary, statistics] of the held-out rows seen so far
        if d_in is not None:
            self._build(int(d_in))

    def _build(self, d_in: int) -> None:
        self.hparams.d_in = d_in  # recorded in checkpoints, so load_from_checkpoint rebuilds the same shapes
        for e in self.hparams.expansions:
            name = f"x{e}"
            self.saes[name] = SparseAutoencoder(d_in, e * d_in, tied=self.hparams.tied)
            self.activity[name] = FeatureActivity(e * d_in)

    @property
    def d_in(self) -> Optional[int]:
        return self.hparams.d_in

    def setup(self, stage: str) -> None:
        from lightning.pytorch.strategies import FSDPStrategy

        if isinstance(self.trainer.strategy, FSDPStrategy):
            # FSDP runs training_step inside its forward and asserts when a backward starts there (Lightning issue
            # #19626), which manual optimisation does by design.
            raise UserError("SAEModule trains with manual optimisation, which Lightning's FSDP strategy does not "
                            "support; use --trainer.strategy ddp (an SAE pair is small enough to replicate per device)")
        width = getattr(self.trainer.datamodule, "width", None) if self.trainer.datamodule is not None else None
        if not self.saes:
            if width is None:
                raise UserError("SAEModule needs d_in (the activation width) or a datamodule with a `width`; "
                                "set model.init_args.d_in or use irm.activations.ActivationDataModule")
            self._build(int(width))
        elif width is not None and int(width) != self.d_in:
            raise UserError(f"the SAEs are {self.d_in} wide but the activations of {self.trainer.datamodule.cache.dir} "
                            f"are {width} wide; drop model.init_args.d_in or point data at the matching layer")

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint["state_dict"]
        found = {k.split(".")[1] for k in state if k.startswith("saes.")}
        if found != set(self.saes):
            raise UserError(f"checkpoint holds SAEs {sorted(found)} but this fit trains {sorted(self.saes)}; "
                            "use the same expansions or start without --ckpt_path")
        for name, sae in self.saes.items():
            width = state[f"saes.{name}.W_dec"].shape[1]
            if width != sae.d_in:
                raise UserError(f"checkpoint SAE {name} is {width} wide but this layer's activations are {sae.d_in} "
                                "wide: it belongs to another layer or model; point --ckpt_path at this layer's "
                                "checkpoints or start without it")

    def forward(self, x: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """{dictionary name: (reconstruction, codes)}."""
        return {name: sae(x) for name, sae in self.saes.items()}

    def configure_optimizers(self):
        # The fused kernel updates each tensor in one pass: the same Adam, at a fraction of the per-step cost that
        # dominates small batches (paper: 32 rows).
        return torch.optim.Adam(self.parameters(), lr=self.hparams.learning_rate, fused=True)

    def training_step(self, batch, batch_idx: int) -> None:
        """One optimizer step per batch: `batch` is a tensor [rows, width], or a list of them when the datamodule
        groups batches (ActivationDataModule's batches_per_item)."""
        for x_BD in batch if isinstance(batch, (list, tuple)) else (batch,):
            parts = self._step(x_BD)
        if self._logging_step():
            self._log_train(x_BD, parts)

    def _step(self, x_BD: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """One optimizer step on `x_BD`; {dictionary name: (reconstruction, codes)} from before the update."""
        alpha = self.hparams.l1_coefficient
        total = 0.0
        parts = {}
        for name, sae in self.saes.items():
            x_hat_BD, codes_BF = sae(x_BD)
            total = total + sae_loss(x_BD, x_hat_BD, codes_BF, alpha)[0]
            self.activity[name].observe(codes_BF)
            parts[name] = (x_hat_BD, codes_BF)
        opt = self.optimizers()
        opt.zero_grad(set_to_none=True)
        self.manual_backward(total)
        opt.step()
        if not self.hparams.tied:
            for sae in self.saes.values():
                sae.normalize_decoder_()
        return parts

    def _logging_step(self) -> bool:
        # The steps Lightning's logger connector writes on (counted in loader items, as it counts them).
        every = self.trainer.log_every_n_steps
        return every > 0 and (self.trainer.fit_loop.epoch_loop.total_batch_idx + 1) % every == 0

    @property
    def _stats_dtype(self) -> torch.dtype:
        return torch.float32 if self.device.type == "mps" else torch.float64  # MPS has no float64

    def _global(self, moments_NS: torch.Tensor) -> torch.Tensor:
        """Per-dictionary statistics [dictionary, statistics] of every rank's rows together: one all_gather."""
        if self.trainer.world_size == 1:
            return moments_NS
        return merge_moments(self.trainer.strategy.all_gather(moments_NS).transpose(0, 1))

    def _any_rank(self, fired_F: torch.Tensor) -> torch.Tensor:
        """Summed over ranks: a feature firing on any rank counts."""
        return self.trainer.strategy.reduce(fired_F, reduce_op="sum") if self.trainer.world_size > 1 else fired_F

    def _metrics(self, stage: str, moments_NS: torch.Tensor) -> dict[str, torch.Tensor]:
        metrics, total = {}, 0.0
        for name, moments_S in zip(self.saes, moments_NS):
            stats = moment_metrics(moments_S)
            total = total + stats["mse"] + self.hparams.l1_coefficient * stats["l1"]  # sae_loss of these rows
            metrics.update({f"{stage}/{name}/{k}": v.float() for k, v in stats.items()})
        metrics[f"{stage}/loss"] = total.float()
        return metrics

    @torch.no_grad()
    def _log_train(self, x_BD: torch.Tensor, parts: dict) -> None:
        moments_NS = torch.stack([row_moments(x_BD, x_hat_BD, codes_BF, self._stats_dtype)
                                  for x_hat_BD, codes_BF in parts.values()])
        metrics = self._metrics("train", self._global(moments_NS))
        for name, activity in self.activity.items():
            metrics[f"train/{name}/dead_fraction"] = activity.dead_fraction(self.global_step, self.hparams.dead_window,
                                                                          self._any_rank)
        # The same global values on every rank: nothing left for Lightning to sync.
        self.log_dict(metrics, on_step=True, on_epoch=False, batch_size=x_BD.shape[0])

    # Validation and test: the held-out, document-aligned tail of the cache.

    def on_validation_epoch_start(self) -> None:
        self._val_fired = {name: torch.zeros(sae.d_hidden, dtype=torch.bool, device=self.device)
                           for name, sae in self.saes.items()}
        self._val_moments = torch.stack([empty_moments(self.d_in, self._stats_dtype, self.device)] * len(self.saes))

    def validation_step(self, x_BD: torch.Tensor, batch_idx: int) -> None:
        self._evaluate(x_BD)

    def on_validation_epoch_end(self) -> None:
        self._log_epoch("val")

    on_test_epoch_start = on_validation_epoch_start

    def test_step(self, x_BD: torch.Tensor, batch_idx: int) -> None:
        self._evaluate(x_BD)

    def on_test_epoch_end(self) -> None:
        self._log_epoch("test")

    @torch.no_grad()
    def _evaluate(self, x_BD: torch.Tensor) -> None:
        batch_NS = []
        for name, sae in self.saes.items():
            x_hat_BD, codes_BF = sae(x_BD)
            self._val_fired[name] |= codes_BF.amax(dim=0) > 0
            batch_NS.append(row_moments(x_BD, x_hat_BD, codes_BF, self._stats_dtype))
        self._val_moments = merge_moments(torch.stack([self._val_moments, torch.stack(batch_NS)], dim=-2))

    def _log_epoch(self, stage: str) -> None:
        """Metrics over the whole held-out set, every rank's rows together; a feature that fires on no held-out row
        is dead there."""
        metrics = self._metrics(stage, self._global(self._val_moments))
        fired_F = self._any_rank(torch.cat([fired.float() for fired in self._val_fired.values()])) > 0
        for name, fired in zip(self._val_fired, fired_F.split([f.numel() for f in self._val_fired.values()])):
            metrics[f"{stage}/{name}/dead_fraction"] = 1.0 - fired.float().mean()
        # Already the same on every rank; sync_dist only tells Lightning so.
        self.log_dict(metrics, on_epoch=True, sync_dist=True)


class ExportSAEs(L.Callback):
    """When a fit ends, write every SAE of the module as cfg.json + sae_weights.safetensors under `dirpath/x<e>`
    (rank 0 only). Without `dirpath`, a datamodule reading `<run_dir>/cache/layer-NN` exports to
    `<run_dir>/sae/layer-NN`, where the later stages look."""

    def __init__(self, dirpath: Optional[str] = None):
        self.dirpath = dirpath

    def target(self, trainer: L.Trainer) -> Path:
        if self.dirpath is not None:
            return Path(self.dirpath)
        cache = getattr(trainer.datamodule, "cache", None)
        if cache is None or cache.dir.parent.name != "cache" or cache.layer is None:
            raise UserError("ExportSAEs needs dirpath unless the data is an ActivationDataModule reading "
                            "<run_dir>/cache/layer-NN; set trainer.callbacks' ExportSAEs dirpath")
        from irm.sae.export import layer_dir

        return layer_dir(cache.dir.parent.parent, cache.layer)

    def on_fit_end(self, trainer: L.Trainer, pl_module: SAEModule) -> None:
        if not trainer.is_global_zero:
            return
        from irm.sae.export import save_sae

        manifest = getattr(trainer.datamodule, "manifest", None) or {}
        root = self.target(trainer)
        hp = pl_module.hparams
        for name, sae in pl_module.saes.items():
            save_sae(sae, root / name, layer=manifest.get("layer"), site=manifest.get("site", "mlp_out"),
                     model_name=manifest.get("model"), context_size=manifest.get("max_length"),
                     irm={"expansion": int(name[1:]), "l1_coefficient": hp.l1_coefficient,
                          "learning_rate": hp.learning_rate, "global_step": trainer.global_step,
                          "cache_rows": manifest.get("rows"), "corpus_fingerprint": manifest.get("corpus_fingerprint")})
