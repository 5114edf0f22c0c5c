"""Paired activations for model diffing: the base and the tuned model's activations of one layer at the same tokens,
as two activation caches read in lockstep (the tuned cache the `cache` stage writes, a base cache written the same
way over the same documents: equal rows, token ids, document ids and positions, checked when opened). Two
caches rather than one stacked store: the tuned cache is already there and serves the SAEs unchanged, and either
side reads as an ordinary `ActivationCache`.

`PairedDataModule` streams them like `ActivationDataModule` (shuffled shards and rows, seeded by epoch, DDP split,
a document-aligned held-out tail, resumable), one shard of each model in memory at a time. Its batches are
[rows, 2, width] (base, tuned: `irm.diff.model.BASE`/`TUNED`), or with `difference=True` the tuned minus base
activations [rows, width], which an ordinary SAE trains on (the diff-SAE baseline); `cache` is then a view of the
differences, so the SAE module's normalisation reads them as it reads a cache."""

from __future__ import annotations

import os
from typing import Optional

import lightning as L
import torch

from irm.activations.datamodule import RowSampler, ShardBatches, validation_start
from irm.activations.store import TENSORS, ActivationCache
from irm.diff.model import BASE, TUNED
from irm.errors import UserError

ALIGNMENT_KEYS = TENSORS[1:]  # token_ids, doc_ids, positions: equal row by row in an aligned pair


class PairedCache:
    """The base and tuned caches of one layer, checked to hold the same tokens in the same shards."""

    def __init__(self, base_dir: str | os.PathLike, tuned_dir: str | os.PathLike, stage: str = "diff"):
        self.base, self.tuned = ActivationCache(base_dir), ActivationCache(tuned_dir)
        fix = f"rebuild the base cache with `python -m irm {stage} --force`"
        if self.base.width != self.tuned.width:
            raise UserError(f"base activations {self.base.dir} are {self.base.width} wide, tuned {self.tuned.dir} "
                            f"{self.tuned.width}: not the same layer and site; {fix}")
        if self.base.rows != self.tuned.rows:
            raise UserError(f"base cache {self.base.dir} holds {self.base.rows} rows, tuned cache {self.tuned.dir} "
                            f"{self.tuned.rows}; {fix}")
        b, t = self.base.read_all(ALIGNMENT_KEYS), self.tuned.read_all(ALIGNMENT_KEYS)
        if any(not torch.equal(b[k], t[k]) for k in ALIGNMENT_KEYS):
            raise UserError(f"base cache {self.base.dir} and tuned cache {self.tuned.dir} hold different tokens; {fix}")
        self.width, self.rows, self.layer = self.tuned.width, self.tuned.rows, self.tuned.layer
        self.dir = self.tuned.dir

    def verify(self) -> None:
        self.base.verify()
        self.tuned.verify()

    def read_range(self, start: int, stop: int, keys: tuple[str, ...] = TENSORS) -> dict[str, torch.Tensor]:
        """Rows [start, stop) of both: `acts` [rows, 2, width] (base, tuned), the other keys once."""
        tuned = self.tuned.read_range(start, stop, keys)
        if "acts" in keys:
            base = self.base.read_range(start, stop, ("acts",))["acts"]
            tuned["acts"] = torch.stack([base, tuned["acts"]], dim=1)
        return tuned

    def iter_batches(self, batch_rows: int, keys: tuple[str, ...] = TENSORS):
        """Every row of both in order, `batch_rows` at a time, as `read_range` gives them."""
        if batch_rows < 1:
            raise ValueError("batch_rows must be >= 1")
        for start in range(0, self.rows, batch_rows):
            yield self.read_range(start, min(start + batch_rows, self.rows), keys)

    def read_rows(self, indices, keys: tuple[str, ...] = TENSORS) -> dict[str, torch.Tensor]:
        """Rows at global `indices` of both (any order), `acts` [rows, 2, width] as `read_range`."""
        tuned = self.tuned.read_rows(indices, keys)
        if "acts" in keys:
            tuned["acts"] = torch.stack([self.base.read_rows(indices, ("acts",))["acts"], tuned["acts"]], dim=1)
        return tuned


class DifferenceView:
    """A paired cache read as one cache of tuned - base activations (what an SAE module reads to normalise)."""

    def __init__(self, paired: PairedCache):
        self.paired = paired
        self.width, self.rows, self.layer, self.dir = paired.width, paired.rows, paired.layer, paired.dir

    def read_range(self, start: int, stop: int, keys: tuple[str, ...] = TENSORS) -> dict[str, torch.Tensor]:
        out = self.paired.read_range(start, stop, keys)
        if "acts" in out:
            out["acts"] = out["acts"][:, TUNED] - out["acts"][:, BASE]
        return out


class PairedBatches(ShardBatches):
    """ShardBatches over the tuned cache whose every shard comes with the base cache's rows of that shard (read as a
    row range, so the two caches may be sharded differently, e.g. written by different numbers of processes):
    items are [rows, 2, width], or tuned - base [rows, width] (`difference`). One sampler plans the reading, so rows
    stay paired through every shuffle."""

    def __init__(self, paired: PairedCache, sampler: RowSampler, batch_size: int, difference: bool = False):
        super().__init__(paired.tuned, sampler, batch_size)
        self.paired, self.difference = paired, difference

    def _load(self, shard: int) -> torch.Tensor:
        tuned = super()._load(shard).float()  # checked for NaN/inf; the base cache was checked as it was written
        offsets = self.cache.offsets
        base = self.paired.base.read_range(offsets[shard], offsets[shard + 1], ("acts",))["acts"]
        return tuned - base if self.difference else torch.stack([base, tuned], dim=1)


class PairedDataModule(L.LightningDataModule):
    """Batches of a layer's paired activations (`base_dir`, `tuned_dir`: the two caches' layer folders).

    `width` is known from the manifests as soon as this is constructed."""

    def __init__(self, base_dir: str, tuned_dir: str, batch_size: int = 256, val_fraction: float = 0.1,
                 seed: int = 0, shuffle: bool = True, verify: bool = True, difference: bool = False):
        super().__init__()
        if batch_size < 1:
            raise UserError(f"batch_size must be >= 1, not {batch_size}")
        self.save_hyperparameters()
        self.paired = PairedCache(base_dir, tuned_dir)
        self.cache = DifferenceView(self.paired) if difference else self.paired
        self.width = self.paired.width
        self.manifest = self.paired.tuned.manifest
        self.split = validation_start(self.paired.tuned, val_fraction)
        self._verified = False
        self._train: Optional[PairedBatches] = None
        self._val: Optional[PairedBatches] = None

    def setup(self, stage: str) -> None:
        if self.hparams.verify and not self._verified:
            self.paired.verify()
            self._verified = True
        rank, world = (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)
        hp, tuned = self.hparams, self.paired.tuned
        train = RowSampler(tuned, 0, self.split, rank=rank, world_size=world, shuffle=hp.shuffle, seed=hp.seed)
        if train.rows_per_rank() == 0:
            raise UserError(f"paired cache {tuned.dir} leaves no training rows for each of {world} process(es); "
                            "cache more documents")
        val = RowSampler(tuned, self.split, tuned.rows, rank=rank, world_size=world, shuffle=False)
        self._train = PairedBatches(self.paired, train, hp.batch_size, hp.difference)
        self._val = PairedBatches(self.paired, val, hp.batch_size, hp.difference)

    def train_dataloader(self) -> PairedBatches:
        return self._train

    def every_row(self) -> PairedBatches:
        """Every row of the pair in cache order, unshuffled, in this module's batch size (on one process): what a
        latent fires on is read over all of them (irm.diff.enrichment)."""
        return PairedBatches(self.paired, RowSampler(self.paired.tuned, 0, self.paired.rows, shuffle=False),
                             self.hparams.batch_size, self.hparams.difference)

    def val_dataloader(self):
        return self._val if self._val is not None and len(self._val) else []

    def test_dataloader(self):
        return self.val_dataloader()
