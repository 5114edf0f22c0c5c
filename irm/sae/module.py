"""The SAE LightningModule (paper 4.2, appendix D): a layer's dictionaries of every size (1x and 2x the activation
width) trained side by side on the same batches, so one read of the cache trains the pair. The ReLU SAE's step is
irm.sae.step, dead features and their resampling irm.sae.revival, the export when a fit ends irm.sae.callbacks."""

from __future__ import annotations

import dataclasses
import warnings
from typing import Optional

import lightning as L
import torch
from torch import nn

from irm.config import SAEConfig
from irm.errors import UserError
from irm.sae.model import (NORMALIZE_ROWS, SparseAutoencoder, auxk_loss, empty_moments, merge_moments,
                           moment_metrics, normalisation, row_moments, sae_loss)
from irm.sae.revival import FeatureActivity, resample_dead_
from irm.sae.step import ReluSAEStep, relu_step_forward, relu_step_grads

# ModelCheckpoint warns that under manual optimisation a mid-epoch checkpoint holds the state after the step. That is
# the state its step count and optimizer state describe, so resuming from it reproduces an uninterrupted run.
warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization", category=UserWarning)


class SAEModule(L.LightningModule):
    """Sparse autoencoders of sizes `expansions` x `d_in` over one layer's activations.

    Args:
        cfg: the `sae` section of the run config (irm.config.SAEConfig: each field's meaning is documented there,
            and `python -m irm fit --help` shows it); its ranges are checked by `SAEConfig.check` before any work.
            The module reads the dictionaries' settings; the data and Trainer settings (batch size, epochs, held-out
            fraction, ...) are read by the stage or the fit config that builds those.
        d_in: activation width; None takes it from the datamodule's `width` when the fit starts.

    The normalisation factor (`cfg.normalize`) is estimated from up to `NORMALIZE_ROWS` training rows, kept in each
    SAE as `input_scale` and exported in cfg.json.

    Decoder rows are rescaled to unit norm after every step (tied or not): the L1 term cannot be bought by
    shrinking codes against growing rows.

    The paper's ReLU SAE (no AuxK, encoder not centred, float32/64 outside autocast) trains through written-out
    gradients (`ReluSAEStep`); on one process they are set without autograd, so callbacks' `on_before_backward` /
    `on_after_backward` do not run for it (`on_before_optimizer_step` does, with the gradients in place).

    A training step reads no value back to the host (no `.item()`, no Python branch on a tensor; on a GPU the host
    never waits for the device): dead features are tracked and resampled on the device, when to resample follows from
    the step count, and the metrics are handed to `self.log_dict` as device tensors, which Lightning converts to
    numbers only when it writes them to its loggers (tests/test_sae_sync.py counts the reads; under DDP Lightning
    itself reads one flag per step, its SIGTERM broadcast). Training metrics (loss, MSE, normalised MSE, L1, L0, dead
    fraction, explained variance; in the normalised space) are those of the batch of each step Lightning writes to
    the logger (`trainer.log_every_n_steps`), not averages over the steps in between: statistics kept on every step
    would add passes over the codes and a dozen small kernel launches to every step. Under DDP they describe the
    global batch (every rank's batch of that step), and the validation/test metrics all held-out rows of every rank:
    each rank's statistics (`row_moments`) are gathered and merged, once per logging step or epoch.
    """

    def __init__(self, cfg: SAEConfig, d_in: Optional[int] = None):
        super().__init__()
        self.cfg = cfg if isinstance(cfg, SAEConfig) else SAEConfig(**cfg)  # a dict: from a checkpoint
        self.save_hyperparameters()
        # Checkpoints hold the section as a plain dict (they load with weights_only), which load_from_checkpoint and
        # the Lightning CLI's --ckpt_path pass back as `cfg`.
        self.hparams.cfg = dataclasses.asdict(self.cfg)
        # Manual optimisation: one backward for all dictionaries and no closure machinery per step.
        self.automatic_optimization = False
        self.saes = nn.ModuleDict()
        self.activity = nn.ModuleDict()
        # MMCS (max, hungarian) of the smallest and largest dictionary as initialised: what training added to it.
        self.register_buffer("init_mmcs", torch.full((2,), float("nan"), dtype=torch.float64))
        self._val_fired: dict[str, torch.Tensor] = {}
        self._val_moments: Optional[torch.Tensor] = None  # [dictionary, statistics] of the held-out rows seen so far
        self._items = 0  # loader items trained on in this fit (a resumed fit counts on from its checkpoint's)
        self._n_processes = 1  # the Trainer's world size, recorded in `setup`
        if d_in is not None:
            self._build(int(d_in))

    @property
    def revive(self) -> str:
        r = self.cfg.revive
        return ("auxk" if self.cfg.activation == "topk" else "resample") if r == "auto" else r

    def _build(self, d_in: int) -> None:
        self.hparams.d_in = d_in  # recorded in checkpoints, so load_from_checkpoint rebuilds the same shapes
        cfg = self.cfg
        for e in cfg.expansions:
            name = f"x{e}"
            k = min(int(cfg.k), e * d_in) if cfg.activation == "topk" else None
            self.saes[name] = SparseAutoencoder(d_in, e * d_in, tied=cfg.tied, activation=cfg.activation, k=k,
                                                center_input=cfg.center_input)
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
        self._n_processes = self.trainer.world_size
        width = getattr(self.trainer.datamodule, "width", None) if self.trainer.datamodule is not None else None
        if not self.saes:
            if width is None:
                raise UserError("SAEModule needs d_in (the activation width) or a datamodule with a `width`; "
                                "set model.init_args.d_in or use irm.activations.ActivationDataModule")
            self._build(int(width))
        elif width is not None and int(width) != self.d_in:
            raise UserError(f"the SAEs are {self.d_in} wide but the activations of {self.trainer.datamodule.cache.dir} "
                            f"are {width} wide; drop model.init_args.d_in or point data at the matching layer")
        if stage == "fit":
            self._items = 0  # a resumed fit's count comes with its checkpoint, restored after this
        if stage == "fit" and self.global_step == 0:
            # A resumed fit gets both from its checkpoint, which is restored after this.
            self._initialise_from_data()
            self._record_init_mmcs()

    @torch.no_grad()
    def _initialise_from_data(self) -> None:
        """Normalisation factor sqrt(d_in) / mean ||x|| over the tokens after each document's first among up to
        NORMALIZE_ROWS rows of the training part of the cache (every rank reads the same rows: the same factor
        everywhere), and b_dec at their normalised mean (irm.sae.model.normalisation)."""
        cache = getattr(self.trainer.datamodule, "cache", None)
        if cache is None:
            if self.cfg.normalize:
                raise UserError("normalize: true estimates the activations' scale from an ActivationDataModule's "
                                "cache; use one, or set normalize: false")
            return
        found = normalisation(cache, min(int(getattr(self.trainer.datamodule, "split", cache.rows)), NORMALIZE_ROWS),
                              self.cfg.normalize)
        if found is None:
            return
        scale, mean_D = found
        for sae in self.saes.values():
            sae.input_scale.fill_(float(scale))
            sae.b_dec.copy_(mean_D.float())

    @torch.no_grad()
    def _record_init_mmcs(self) -> None:
        if len(self.saes) < 2:
            return
        from irm.sae.mmcs import mmcs

        ordered = sorted(self.saes.values(), key=lambda s: s.d_hidden)
        small, large = ordered[0].dictionary.cpu(), ordered[-1].dictionary.cpu()
        self.init_mmcs.copy_(torch.tensor([mmcs(small, large, "max")[0], mmcs(small, large, "hungarian")[0]],
                                          dtype=torch.float64))

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["irm_items"] = self._items

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # Checkpoints from before the count was kept: right for one batch per item, the default.
        self._items = int(checkpoint.get("irm_items", checkpoint.get("global_step", 0)))
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
        """{dictionary name: (reconstruction, codes)} of raw activations."""
        return {name: sae(x) for name, sae in self.saes.items()}

    def configure_optimizers(self):
        # The fused kernel updates each tensor in one pass: the same Adam, at a fraction of the per-step cost that
        # dominates small batches (paper: 32 rows). CPU fused Adam needs a float parameter dtype (always here).
        return torch.optim.Adam(self.parameters(), lr=self.cfg.learning_rate, fused=True)

    def training_step(self, batch, batch_idx: int) -> None:
        """One optimizer step per batch: `batch` is a tensor [rows, width], or a list of them when the datamodule
        groups batches (ActivationDataModule's batches_per_item)."""
        self._items += 1
        for x_BD in batch if isinstance(batch, (list, tuple)) else (batch,):
            x_n, parts = self._step(x_BD)
        if self._logging_step():
            self._log_train(x_n, parts)

    @property
    def _l1(self) -> float:
        return self.cfg.l1_coefficient if self.cfg.activation == "relu" else 0.0

    def _step(self, x_BD: torch.Tensor):
        """One optimizer step on `x_BD`; (normalised x, {dictionary name: (normalised reconstruction, codes)}) from
        before the update."""
        cfg = self.cfg
        total = 0.0
        parts, x_n = {}, None
        auxk = self.revive == "auxk" and cfg.aux_coefficient > 0
        direct = {}  # {dictionary name: its gradients}, when they skip autograd (_direct_gradients)
        set_directly = self._direct_gradients()
        for name, sae in self.saes.items():
            x_n = x_BD * sae.input_scale.to(x_BD.dtype)
            activity = self.activity[name]
            if self._written_out(sae, x_n, auxk):
                if set_directly:
                    with torch.no_grad():
                        _, x_hat_n, codes_BF, code_sums_F, err_BD = relu_step_forward(
                            x_n, sae.W_dec, sae.W_enc, sae.b_enc, sae.b_dec, self._l1)
                        direct[name] = relu_step_grads(x_n, sae.W_dec, sae.W_enc, codes_BF, err_BD, self._l1, 1.0)
                else:
                    loss, x_hat_n, codes_BF, code_sums_F = ReluSAEStep.apply(x_n, sae.W_dec, sae.W_enc, sae.b_enc,
                                                                             sae.b_dec, self._l1)
                    total = total + loss
                activity.record(code_sums_F > 0)
                parts[name] = (x_hat_n, codes_BF)
                continue
            pre_BF = sae.pre_activations(x_n)
            codes_BF = sae.codes_from_pre(pre_BF)
            x_hat_n = sae.decode_normalized(codes_BF)
            total = total + sae_loss(x_n, x_hat_n, codes_BF, self._l1)[0]
            if auxk:
                dead_F = activity.dead(cfg.dead_window)
                k_aux = max(1, sae.d_in // 2)
                total = total + cfg.aux_coefficient * auxk_loss(sae, x_n, x_hat_n, pre_BF, dead_F, k_aux)
            activity.observe(codes_BF)
            parts[name] = (x_hat_n, codes_BF)
        opt = self.optimizers()
        opt.zero_grad(set_to_none=True)
        for name, grads in direct.items():
            sae = self.saes[name]
            for param, grad in zip((sae.W_dec, sae.W_enc, sae.b_enc, sae.b_dec), grads):
                if param is not None:
                    param.grad = grad
        if torch.is_tensor(total):
            self.manual_backward(total)
        opt.step()
        for sae in self.saes.values():
            sae.normalize_decoder_()
        if self.revive == "resample" and self._resample_due():
            for name, sae in self.saes.items():
                self._resample(name, sae, x_n, parts[name][0])
        return x_n, parts

    @staticmethod
    def _written_out(sae: SparseAutoencoder, x_n: torch.Tensor, auxk: bool) -> bool:
        """Whether `ReluSAEStep` computes this step: the paper's ReLU SAE (tied or not, encoder reading x unshifted,
        no auxiliary loss) on float32/float64 data in the parameters' dtype, outside autocast (mixed precision takes
        the autograd path, whose casts autocast manages)."""
        return (sae.activation == "relu" and not sae.center_input and not auxk and not x_n.requires_grad
                and x_n.dtype == sae.W_dec.dtype in (torch.float32, torch.float64)
                and not torch.is_autocast_enabled(x_n.device.type))

    def _direct_gradients(self) -> bool:
        """Whether the written-out step sets the gradients itself, without autograd and `manual_backward`: on one
        process only (under DDP, autograd's hooks all-reduce the gradients). What it skips per optimizer step is
        the autograd engine and Lightning's backward hooks (`on_before_backward`/`on_after_backward`); the optimizer
        step and its hooks (`on_before_optimizer_step`) run as always. At the paper's batch 32 that is ~7% of a
        step on a CPU core (benchmarks/RESULTS.md)."""
        return self._n_processes == 1

    def _resample_due(self) -> bool:
        step, window = self.global_step, self.cfg.dead_window
        if step == 0 or step % window:
            return False  # (estimated_stepping_batches below is not free: not on every step)
        # Lightning counts loader items; an item of grouped batches is several optimizer steps.
        total = self.trainer.estimated_stepping_batches * self.cfg.batches_per_item
        return step <= self.cfg.resample_until * total

    @torch.no_grad()
    def _resample(self, name: str, sae: SparseAutoencoder, x_n: torch.Tensor, x_hat_n: torch.Tensor) -> None:
        """Resample the dead features of `sae` towards this batch's badly reconstructed rows (irm.sae.revival).
        Under DDP the dead set is agreed across ranks and rank 0's rows are used everywhere."""
        activity = self.activity[name]
        dead_F = activity.dead(self.cfg.dead_window, self._min_rank)
        # Seeded by the step: a resumed fit (whose global RNG state Lightning does not restore) draws the same rows.
        resample_dead_(sae, dead_F, x_n, x_hat_n, self.optimizers().optimizer.state,
                       seed=self.global_step * 7919 + sae.d_hidden,
                       share=self._rank_zero if self._n_processes > 1 else None)
        activity.restart(dead_F)

    def _logging_step(self) -> bool:
        # The steps Lightning's logger writes on: every log_every_n_steps loader items (it counts items, not
        # optimizer steps, and writes on the item that completes each multiple).
        every = self.trainer.log_every_n_steps
        return every > 0 and self._items % every == 0

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

    def _rank_zero(self, t: torch.Tensor) -> torch.Tensor:
        """Rank 0's `t` on every rank, through a tensor collective (Lightning's `broadcast` pickles through the
        host)."""
        return self.trainer.strategy.all_gather(t)[0]

    def _min_rank(self, since_F: torch.Tensor) -> torch.Tensor:
        """Minimum over ranks: steps since a feature fired on any rank."""
        if self._n_processes == 1:
            return since_F
        return self.trainer.strategy.all_gather(since_F).amin(dim=0)

    def _metrics(self, stage: str, moments_NS: torch.Tensor) -> dict[str, torch.Tensor]:
        metrics, total = {}, 0.0
        for name, moments_S in zip(self.saes, moments_NS):
            stats = moment_metrics(moments_S)
            total = total + stats["mse"] + self._l1 * stats["l1"]  # sae_loss of these rows
            metrics.update({f"{stage}/{name}/{k}": v.float() for k, v in stats.items()})
        metrics[f"{stage}/loss"] = total.float()
        return metrics

    @torch.no_grad()
    def _log_train(self, x_n: torch.Tensor, parts: dict) -> None:
        moments_NS = torch.stack([row_moments(x_n, x_hat_n, codes_BF, self._stats_dtype)
                                  for x_hat_n, codes_BF in parts.values()])
        metrics = self._metrics("train", self._global(moments_NS))
        for name, activity in self.activity.items():
            metrics[f"train/{name}/dead_fraction"] = activity.dead_fraction(self.cfg.dead_window, self._min_rank)
        # The same global values on every rank: nothing left for Lightning to sync.
        self.log_dict(metrics, on_step=True, on_epoch=False, batch_size=x_n.shape[0])

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
            x_n = x_BD * sae.input_scale.to(x_BD.dtype)
            codes_BF = sae.encode_normalized(x_n)
            self._val_fired[name] |= codes_BF.amax(dim=0) > 0
            batch_NS.append(row_moments(x_n, sae.decode_normalized(codes_BF), codes_BF, self._stats_dtype))
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

