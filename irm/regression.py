"""The linear implicit reward model R (paper 4.3, E.2): a LightningModule mapping the concatenated SAE codes at a
sentiment token to its sentiment activation delta, with an L2 penalty that makes it the authors' ridge regression,
and a LightningDataModule streaming the deltas stage's shards. `python -m irm regression` (irm.stages.regression)
and `python -m irm fit --config configs/regression.yaml` train the same classes; the fitted R is exported as
safetensors for the lexicon, validation and report stages (read with `irm.readers.load_irm`).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Iterator, Optional

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler

from irm.artifacts import atomic_path
from irm.config import RegressionConfig
from irm.delta_rows import open_deltas, read_manifest
from irm.errors import UserError



# ---------------------------------------------------------------------------------------------------------------
# Data: shards streamed one at a time


class DeltaShards(Dataset):
    """Map-style view of the deltas' shard store whose keys are whole batches, (shard index, row indices): only the
    shard being read is in memory."""

    def __init__(self, store):
        self.store = store
        self._loaded: tuple[int, dict] | None = None

    def _shard(self, index: int) -> dict:
        if self._loaded is None or self._loaded[0] != index:
            self._loaded = (index, self.store.read_shard(index, ("x", "y")))
        return self._loaded[1]

    def __getitem__(self, key: tuple[int, list[int]]) -> dict:
        shard, rows = key
        tensors = self._shard(shard)
        idx = torch.as_tensor(rows, dtype=torch.long)
        return {"x": tensors["x"][idx], "y": tensors["y"][idx]}

    def __len__(self) -> int:
        return len(self.store.shards)


class ShardBatchSampler(DistributedSampler):
    """Keys of `DeltaShards` batches: shards in turn, rows of one shard in one batch at most. With `shuffle`, shard
    order and rows within a shard are permuted, seeded by (seed, epoch), so a resumed epoch sees the same order.

    Under DDP every rank draws the same permutations and takes every world_size-th row of each shard, so ranks read
    disjoint rows. With `even` (training) each rank's share of a shard is cut to the same size: every rank takes the
    same number of steps on batches of the same sizes, so DDP's averaged gradient is the gradient of the global batch;
    at most world_size - 1 rows per shard sit out an epoch, different ones each epoch. Without it (validation) every
    row is read once. A DistributedSampler, so Lightning keeps it rather than wrapping it in its own, which would
    split batches instead of rows and pad with repeated batches."""

    def __init__(self, rows_per_shard: list[np.ndarray], batch_size: int, shuffle: bool, seed: int, rank: int = 0,
                 world_size: int = 1, even: bool = True):
        # Not DistributedSampler.__init__: its sizes count dataset items; ours are rows of shards.
        self.rows_per_shard = rows_per_shard
        self.batch_size = batch_size
        self.shuffle, self.seed, self.even = shuffle, seed, even
        self.rank, self.num_replicas = rank, world_size
        self.epoch = 0  # set_epoch (Lightning calls it each epoch) is DistributedSampler's

    def _share(self, n: int) -> int:
        """How many of a shard's n rows this rank reads."""
        return n // self.num_replicas if self.even else len(range(self.rank, n, self.num_replicas))

    def __iter__(self) -> Iterator[tuple[int, list[int]]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        shards = rng.permutation(len(self.rows_per_shard)) if self.shuffle else range(len(self.rows_per_shard))
        for s in shards:
            rows = self.rows_per_shard[s]
            if self.shuffle:
                rows = rng.permutation(rows)
            rows = rows[self.rank::self.num_replicas][:self._share(len(rows))]
            for i in range(0, len(rows), self.batch_size):
                yield int(s), rows[i: i + self.batch_size].tolist()

    def __len__(self) -> int:
        return sum(-(-self._share(len(r)) // self.batch_size) for r in self.rows_per_shard)


class DeltaDataModule(L.LightningDataModule):
    """Rows (x = SAE codes at the sentiment token, y = delta) of `<run_dir>/deltas`, in batches of
    `cfg.batch_size` (`cfg`: the `regression` section, RegressionConfig). A seeded `cfg.val_fraction` of the triples
    (both rows of each) is held out for validation metrics. Under DDP (or several nodes) each process reads its share
    of the rows (ShardBatchSampler), by global rank and world size."""

    def __init__(self, deltas_dir: str, cfg: RegressionConfig, seed: int = 0, num_workers: int = 0):
        super().__init__()
        self.deltas_dir = Path(deltas_dir)
        self.cfg = cfg
        self.seed = seed
        self.num_workers = num_workers
        self.manifest: Optional[dict] = None

    @property
    def n_features(self) -> int:
        if self.manifest is None:
            self.manifest = read_manifest(self.deltas_dir)
        return int(self.manifest["n_features"])

    def setup(self, stage: Optional[str] = None) -> None:
        self.store = open_deltas(self.deltas_dir)
        self.manifest = self.store.manifest
        n_triples = int(self.manifest["n_triples"])
        n_val = max(1, round(self.cfg.val_fraction * n_triples))
        if n_val >= n_triples:
            raise UserError(f"only {n_triples} triples: too few to hold out {self.cfg.val_fraction:.0%} for "
                            "validation; make more triples (triples.n) or lower regression.val_fraction")
        val_ids = np.random.default_rng(self.seed).permutation(n_triples)[:n_val]
        self.train_rows, self.val_rows = [], []
        for shard in range(len(self.store.shards)):
            triple = self.store.read_shard(shard, ("triple",))["triple"].numpy()
            is_val = np.isin(triple, val_ids)
            self.train_rows.append(np.flatnonzero(~is_val))
            self.val_rows.append(np.flatnonzero(is_val))
        world = self._world()[1]
        for what, rows in (("training", self.train_rows), ("held-out", self.val_rows)):
            # The last rank's share of a shard is the smallest: n // world rows.
            if sum(len(r) // world for r in rows) == 0:
                raise UserError(f"too few {what} rows in {self.deltas_dir} to give each of {world} processes one; "
                                "make more triples (triples.n), or use fewer processes")

    def _world(self) -> tuple[int, int]:
        return (self.trainer.global_rank, self.trainer.world_size) if self.trainer is not None else (0, 1)

    def _loader(self, rows: list[np.ndarray], shuffle: bool) -> DataLoader:
        rank, world = self._world()
        sampler = ShardBatchSampler(rows, self.cfg.batch_size, shuffle, self.seed, rank, world, even=shuffle)
        return DataLoader(DeltaShards(self.store), sampler=sampler, batch_size=None,
                          num_workers=self.num_workers)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_rows, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_rows, shuffle=False)

    def counts(self) -> dict:
        return {"train_rows": int(sum(len(r) for r in self.train_rows)),
                "val_rows": int(sum(len(r) for r in self.val_rows))}


# ---------------------------------------------------------------------------------------------------------------
# Model


class IRMRegression(L.LightningModule):
    """R(x) = w.x + b, trained on mean squared error, configured by `cfg` (the `regression` section,
    RegressionConfig: learning_rate, weight_decay, optimizer). `weight_decay` penalises w only (not the intercept).
    With `adam` or `sgd` the decay is added to the gradient (coupled), so the fixed point is exactly the ridge
    solution argmin MSE + weight_decay/2 ||w||^2; `adamw` decouples it (a different, scale-dependent shrinkage).
    `n_features` may be left out when a DeltaDataModule provides it."""

    def __init__(self, cfg: RegressionConfig, n_features: Optional[int] = None):
        super().__init__()
        self.cfg = cfg if isinstance(cfg, RegressionConfig) else RegressionConfig(**cfg)  # a dict: from a checkpoint
        self.save_hyperparameters()
        # Checkpoints hold the section as a plain dict (they load with weights_only), which load_from_checkpoint and
        # the Lightning CLI's --ckpt_path pass back as `cfg`.
        self.hparams.cfg = dataclasses.asdict(self.cfg)
        self.linear: Optional[nn.Linear] = None
        if n_features is not None:
            self._build(n_features)

    def _build(self, n_features: int) -> None:
        import torchmetrics

        self.linear = nn.Linear(n_features, 1)
        self.metrics = nn.ModuleDict({
            f"{split}_{name}": metric()
            for split in ("train", "val")
            for name, metric in (("mse", torchmetrics.MeanSquaredError), ("r2", torchmetrics.R2Score))
        })

    def configure_model(self) -> None:
        # Called before checkpoint restore and optimizer set-up: the width comes from the data when not given.
        if self.linear is None:
            dm = self.trainer.datamodule
            if dm is None or not hasattr(dm, "n_features"):
                raise UserError("IRMRegression needs n_features, or a DeltaDataModule to read it from")
            self.hparams["n_features"] = dm.n_features
            self._build(dm.n_features)

    def forward(self, x_BF: torch.Tensor) -> torch.Tensor:
        return self.linear(x_BF).squeeze(-1)

    def _step(self, batch: dict, split: str) -> torch.Tensor:
        pred_B = self(batch["x"])
        loss = F.mse_loss(pred_B, batch["y"])
        for name in ("mse", "r2"):
            metric = self.metrics[f"{split}_{name}"]
            metric.update(pred_B.detach(), batch["y"])
            self.log(f"{split}/{name}", metric, on_step=False, on_epoch=True, prog_bar=name == "r2",
                     batch_size=len(pred_B))
        return loss

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = self._step(batch, "train")
        # Under DDP the mean over ranks is the global batch's loss: every rank's batch has the same size.
        self.log("train/loss", loss, on_step=True, on_epoch=False, batch_size=len(batch["y"]), sync_dist=True)
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._step(batch, "val")

    def configure_optimizers(self):
        cfg = self.cfg
        groups = [{"params": [self.linear.weight], "weight_decay": cfg.weight_decay},
                  {"params": [self.linear.bias], "weight_decay": 0.0}]  # ridge leaves the intercept free
        cls = {"adam": torch.optim.Adam, "sgd": torch.optim.SGD, "adamw": torch.optim.AdamW}[cfg.optimizer]
        return cls(groups, lr=cfg.learning_rate)


# ---------------------------------------------------------------------------------------------------------------
# Export


def export(state: dict[str, torch.Tensor], manifest: dict, path: str | Path) -> None:
    """R, from an IRMRegression state dict, as `regression.safetensors`: weight [n_features], bias [1], layers; width,
    site in the metadata."""
    from safetensors.torch import save_file

    weight = state["linear.weight"].detach().reshape(-1).float().cpu().contiguous()
    bias = state["linear.bias"].detach().reshape(1).float().cpu().contiguous()
    layers = torch.as_tensor(manifest["layers"], dtype=torch.long)
    meta = {"layers": json.dumps(manifest["layers"]), "width": str(manifest["width"]), "site": manifest["site"],
            "n_features": str(weight.numel())}
    with atomic_path(path) as tmp:
        save_file({"weight": weight, "bias": bias, "layers": layers}, str(tmp), metadata=meta)


class ExportRegression(L.Callback):
    """Writes the fitted R to `path` at the end of fitting (the stage and `python -m irm fit` alike), from rank 0."""

    def __init__(self, path: str):
        self.path = path

    def on_fit_end(self, trainer: L.Trainer, pl_module: IRMRegression) -> None:
        # On every rank: under a sharding strategy (FSDP) this gathers the whole parameters onto rank 0, where the
        # module's own tensors would be this rank's shard.
        state = trainer.strategy.lightning_module_state_dict()
        if trainer.is_global_zero:
            export(state, trainer.datamodule.manifest, self.path)
