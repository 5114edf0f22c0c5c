"""Streaming SAE training data from a layer's activation cache: shuffled by shard order and within each shard
(seeded by epoch), split by rows between DDP ranks, a document-aligned tail held out for validation, and resumable
mid-epoch (the loader's state_dict), so a resumed fit sees the batches an uninterrupted one would have seen."""

from __future__ import annotations

import ast
import math
from typing import Any, Iterator, Optional

import lightning as L
import torch

from irm.activations.store import ActivationCache
from irm.config import SAEConfig
from irm.errors import UserError


class RowSampler:
    """Which rows of [start, stop) one rank reads in an epoch, as (shard, local row indices) in reading order.

    Every rank draws the same permutations (same seed and epoch) and takes every world_size-th row of each shard,
    truncated to an equal count: ranks see disjoint rows and the same number of batches (DDP needs both). At most
    world_size - 1 rows per shard sit out an epoch, different ones each epoch."""

    def __init__(self, cache: ActivationCache, start: int, stop: int, *, rank: int = 0, world_size: int = 1,
                 shuffle: bool = True, seed: int = 0):
        self.cache, self.start, self.stop = cache, start, stop
        self.rank, self.world_size, self.shuffle, self.seed = rank, world_size, shuffle, seed
        self.epoch = 0
        # (shard, first local row, end local row) of every shard overlapping [start, stop)
        self.spans = []
        for shard in range(len(cache.shards)):
            lo = max(start, cache.offsets[shard]) - cache.offsets[shard]
            hi = min(stop, cache.offsets[shard + 1]) - cache.offsets[shard]
            if hi > lo:
                self.spans.append((shard, lo, hi))

    def set_epoch(self, epoch: int) -> None:
        """Called by Lightning at the start of each epoch (as for a DistributedSampler)."""
        self.epoch = epoch

    def rows_per_rank(self) -> int:
        return sum((hi - lo) // self.world_size for _, lo, hi in self.spans)

    def plan(self) -> list[tuple[int, torch.Tensor]]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(len(self.spans), generator=g).tolist() if self.shuffle else range(len(self.spans))
        out = []
        for i in order:
            shard, lo, hi = self.spans[i]
            local = torch.randperm(hi - lo, generator=g) + lo if self.shuffle else torch.arange(lo, hi)
            per_rank = (hi - lo) // self.world_size
            out.append((shard, local[self.rank::self.world_size][:per_rank]))
        return out


class ShardBatches:
    """An iterable of float32 activation batches [rows, width] for one rank, one shard in memory at a time.

    With `batches_per_item` k > 1 each item is a list of k consecutive batches (the last item may hold fewer):
    SAEModule takes one optimizer step per batch, so the updates are those of `batch_size`, while Lightning's
    per-item work is shared by k steps (it dominates at small batches such as the paper's 32).

    Lightning finds `sampler.set_epoch` and, because this object has state_dict/load_state_dict, saves how many
    items of the current epoch were consumed into each checkpoint and restores it on resume."""

    def __init__(self, cache: ActivationCache, sampler: RowSampler, batch_size: int, batches_per_item: int = 1):
        self.cache, self.sampler = cache, sampler
        self.batch_size, self.batches_per_item = batch_size, batches_per_item
        # DataLoader's attribute for "batches are formed by the loader itself" (batch_size=None); Lightning reads it.
        self.batch_sampler = None
        self._position = {"epoch": 0, "items": 0}  # progress of the epoch being read
        self._resume: Optional[dict[str, int]] = None
        self._finite: set[int] = set()  # shards already checked for NaN/inf

    def __len__(self) -> int:
        return math.ceil(math.ceil(self.sampler.rows_per_rank() / self.batch_size) / self.batches_per_item)

    def state_dict(self) -> dict[str, Any]:
        return dict(self._position)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._resume = {"epoch": int(state["epoch"]), "items": int(state["items"])}

    def __iter__(self) -> Iterator:
        # A generator: nothing runs until the first item is requested, after Lightning has called set_epoch.
        epoch = self.sampler.epoch
        skip = self._resume["items"] if self._resume is not None and self._resume["epoch"] == epoch else 0
        self._resume = None
        self._position = {"epoch": epoch, "items": skip}
        group: list[torch.Tensor] = []
        for batch in self._batches(skip_rows=skip * self.batches_per_item * self.batch_size):
            if self.batches_per_item == 1:
                self._position["items"] += 1
                yield batch
                continue
            group.append(batch)
            if len(group) == self.batches_per_item:
                self._position["items"] += 1
                yield group
                group = []
        if group:
            self._position["items"] += 1
            yield group

    def _batches(self, skip_rows: int) -> Iterator[torch.Tensor]:
        """The epoch's rows in `batch_size` batches (the last may be shorter), after the first `skip_rows`."""
        pending: list[torch.Tensor] = []
        pending_rows = 0
        for shard, rows in self.sampler.plan():
            if skip_rows >= rows.numel():  # resuming: whole shards already consumed are not even read
                skip_rows -= rows.numel()
                continue
            rows, skip_rows = rows[skip_rows:], 0
            acts_RD = self._load(shard)[rows].float()
            start = 0
            if pending:
                take = min(self.batch_size - pending_rows, acts_RD.shape[0])
                pending.append(acts_RD[:take])
                pending_rows += take
                start = take
                if pending_rows == self.batch_size:
                    yield torch.cat(pending)
                    pending, pending_rows = [], 0
            while acts_RD.shape[0] - start >= self.batch_size:
                yield acts_RD[start:start + self.batch_size]
                start += self.batch_size
            if start < acts_RD.shape[0]:
                pending.append(acts_RD[start:])
                pending_rows += acts_RD.shape[0] - start
        if pending:
            yield torch.cat(pending)

    def _load(self, shard: int) -> torch.Tensor:
        acts_RD = self.cache.read_shard(shard, ("acts",))["acts"]
        # A NaN or inf anywhere makes the sum non-finite, so a finite sum clears the shard in one cheap pass (summed in
        # the stored dtype: 30x faster than widening bf16/fp16 first). The row scan runs only when the sum is not
        # finite (a bad value, or finite values summing past the dtype's range, e.g. 65504 in float16) and finds the
        # row to report.
        if shard not in self._finite and not bool(torch.isfinite(acts_RD.sum())):
            bad = ~torch.isfinite(acts_RD).all(dim=1)
            if bool(bad.any()):
                row = int(bad.nonzero()[0, 0])
                where = self.cache.read_range(self.cache.offsets[shard] + row, self.cache.offsets[shard] + row + 1,
                                              ("doc_ids", "positions"))
                raise UserError(
                    f"cache shard {self.cache.path(shard)} row {row} (document {int(where['doc_ids'][0])}, token "
                    f"position {int(where['positions'][0])}) holds NaN or inf activations; the model overflowed: "
                    "rebuild the cache with model.dtype float32 and cache.dtype float32 or bfloat16"
                )
        self._finite.add(shard)
        return acts_RD


def checkpoint_interval(callback: L.Callback) -> int:
    """A checkpoint callback's every_n_train_steps, read from its public `state_key`, which names the constructor
    arguments that identify its state in a checkpoint (ModelCheckpoint's: "ModelCheckpoint{'monitor': None, ...,
    'every_n_train_steps': 200, ...}"); 0 when it names none."""
    key = callback.state_key
    try:
        args = ast.literal_eval(key[key.index("{"):])
    except (ValueError, SyntaxError):
        return 0
    return int(args.get("every_n_train_steps") or 0) if isinstance(args, dict) else 0


def validation_start(cache: ActivationCache, val_fraction: float) -> int:
    """First row of the held-out tail: the last `val_fraction` of rows, moved back to the start of the document it
    cuts (rows of a document are contiguous, `positions` count from 0), so no document is in both parts."""
    if not 0.0 <= val_fraction < 1.0:
        raise UserError(f"val_fraction must be in [0, 1), not {val_fraction}")
    if val_fraction == 0.0:
        return cache.rows
    cut = cache.rows - max(1, math.ceil(val_fraction * cache.rows))
    if cut <= 0:
        raise UserError(f"activation cache {cache.dir} has only {cache.rows} rows: too few to hold out "
                        f"val_fraction={val_fraction}; cache more documents or lower the fraction")
    aligned = cut - int(cache.read_range(cut, cut + 1, ("positions",))["positions"][0])
    # A cache of a single long document cannot be split at a document boundary; split it at the row instead.
    return aligned if aligned > 0 else cut


class ActivationDataModule(L.LightningDataModule):
    """Batches of one layer's cached activations for SAE training (`layer_dir` = `<run_dir>/cache/layer-NN`), as the
    `sae` section `cfg` (SAEConfig) sizes them: `batch_size` rows, `batches_per_item` batches per loader item, the
    last `val_fraction` held out; `seed` orders the rows.

    `width` (the activations' width) is known as soon as this is constructed, from the manifest alone."""

    def __init__(self, layer_dir: str, cfg: SAEConfig, seed: int = 0, shuffle: bool = True, verify: bool = True):
        super().__init__()
        self.cfg = cfg
        self.seed, self.shuffle, self.verify = seed, shuffle, verify
        self.cache = ActivationCache(layer_dir)
        self.width = self.cache.width
        self.manifest = self.cache.manifest
        self.split = validation_start(self.cache, cfg.val_fraction)
        self._verified = False
        self._train: Optional[ShardBatches] = None
        self._val: Optional[ShardBatches] = None

    def setup(self, stage: str) -> None:
        if self.verify and not self._verified:
            self.cache.verify()  # once per process: a damaged shard stops the run before any step
            self._verified = True
        rank, world = (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)
        cfg = self.cfg
        if self.trainer and cfg.batches_per_item > 1:
            # The optimizer-step count advances by batches_per_item per item: a checkpoint interval that is not a
            # multiple of it is never hit, and an interrupted run would have nothing recent to resume from.
            for cb in self.trainer.checkpoint_callbacks:
                every = checkpoint_interval(cb)
                if every and every % cfg.batches_per_item:
                    raise UserError(f"ModelCheckpoint every_n_train_steps={every} is not a multiple of "
                                    f"batches_per_item={cfg.batches_per_item}; make it one")
        train = RowSampler(self.cache, 0, self.split, rank=rank, world_size=world, shuffle=self.shuffle,
                           seed=self.seed)
        if train.rows_per_rank() == 0:
            raise UserError(f"activation cache {self.cache.dir} leaves no training rows for each of {world} "
                            "process(es); cache more documents")
        val = RowSampler(self.cache, self.split, self.cache.rows, rank=rank, world_size=world, shuffle=False)
        self._train = ShardBatches(self.cache, train, cfg.batch_size, cfg.batches_per_item)
        self._val = ShardBatches(self.cache, val, cfg.batch_size)

    def train_dataloader(self) -> ShardBatches:
        return self._train

    def val_dataloader(self):
        # No held-out rows (val_fraction 0, or fewer than one per rank): an empty list makes Lightning skip validation.
        return self._val if self._val is not None and len(self._val) else []

    def test_dataloader(self):
        return self.val_dataloader()
