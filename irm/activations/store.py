"""The shard store: a folder of `shard-NNNNN.safetensors` files (`shard-rRRRR-NNNNN` when several processes wrote
them) and `manifest.json` listing the shards in row order with each one's row count and sha256. One format for every
sharded artifact: the activation cache of a layer (paper 4.2: activations are computed once, then read by every SAE
epoch; `acts` [rows, width] and, per row, `token_ids`, `doc_ids` and `positions`) and the deltas stage's regression
rows (`irm.stages.deltas`). Writing keeps one shard in memory; reading goes through safetensors' memory map, one shard or
one row range at a time, whichever process wrote the shard."""

from __future__ import annotations

import bisect
import os
from pathlib import Path
from typing import Any, Iterator, Optional

import torch

from irm.artifacts import MANIFEST, atomic_path, read_json, sha256_file, write_json
from irm.errors import UserError

TENSORS = ("acts", "token_ids", "doc_ids", "positions")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ---------------------------------------------------------------------------------------------------------------
# The format: shards, their manifest records, the manifest, checksums


def save_shard(directory: str | os.PathLike, name: str, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Write the shard `name` in `directory` (visible only when complete); its manifest record {file, rows, sha256},
    rows being the tensors' first dimension."""
    from safetensors.torch import save_file

    path = Path(directory) / name
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
    return {"file": name, "rows": int(next(iter(tensors.values())).shape[0]), "sha256": sha256_file(path)}


def write_store_manifest(directory: str | os.PathLike, shards: list[dict[str, Any]], complete: bool = True,
                         **fields: Any) -> dict:
    """manifest.json of a store: `fields` (what the rows are), then `rows`, `shards` ({file, rows, sha256}, in row
    order) and `complete` (readers refuse a manifest that is not)."""
    record = {**fields, "rows": sum(int(s["rows"]) for s in shards), "shards": list(shards), "complete": complete}
    write_json(Path(directory) / MANIFEST, record)
    return record


def read_manifest(directory: str | os.PathLike, what: str, stage: str) -> dict:
    """The manifest of a complete store; a missing or unfinished one is a UserError naming `stage`, which writes it."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise UserError(f"no {what} in {directory} ({MANIFEST} missing); run `python -m irm {stage}` first")
    manifest = read_json(path)
    if not isinstance(manifest, dict) or not manifest.get("complete"):
        raise UserError(f"{what} {directory} is incomplete; rerun `python -m irm {stage}`")
    return manifest


def intact(directory: str | os.PathLike, shard: dict[str, Any], digests: Optional[dict[str, str]] = None) -> bool:
    """Whether the shard a manifest record names is on disk with its recorded sha256 (`digests`, when given,
    keeps each file's digest so a file listed twice is hashed once)."""
    path = Path(directory) / shard["file"]
    if not path.is_file():
        return False
    digest = digests.get(shard["file"]) if digests is not None else None
    if digest is None:
        digest = sha256_file(path)
        if digests is not None:
            digests[shard["file"]] = digest
    return digest == shard["sha256"]


def verify_shards(directory: str | os.PathLike, shards: list[dict[str, Any]], what: str, stage: str) -> None:
    """Check every listed shard against its sha256; a UserError naming the first missing or damaged one."""
    for shard in shards:
        path = Path(directory) / shard["file"]
        if not path.is_file():
            raise UserError(f"{what} shard {path} is missing; rerun `python -m irm {stage}`")
        if not intact(directory, shard):
            raise UserError(f"{what} shard {path} fails its checksum (damaged or modified); "
                            f"rerun `python -m irm {stage}`")


def cache_layer_dir(run_dir: str | os.PathLike, layer: int) -> Path:
    """`<run_dir>/cache/layer-NN`."""
    return Path(run_dir) / "cache" / f"layer-{int(layer):02d}"


def shard_name(index: int, rank: Optional[int] = None) -> str:
    """`shard-NNNNN.safetensors`; with `rank` (one of several processes writing into one folder) `shard-rRRRR-NNNNN`,
    so writers never collide."""
    return f"shard-{index:05d}.safetensors" if rank is None else f"shard-r{rank:04d}-{index:05d}.safetensors"


def write_manifest(directory: str | os.PathLike, shards: list[dict[str, Any]], width: int, dtype: str,
                   **manifest: Any) -> dict:
    """manifest.json of a complete cache: `shards` ({file, rows, sha256}) in row order, as written by one
    ShardWriter or by several in turn; `manifest` adds model, layer, site, corpus fingerprint..."""
    return write_store_manifest(directory, shards, **manifest, dtype=dtype, width=int(width))


class ShardWriter:
    """Appends rows of one layer to fixed-size shards in `directory`, flushing each shard as it fills, so memory is
    one preallocated shard whatever the corpus size. `close(**manifest)` writes the last shard and the manifest;
    `finish()` writes the last shard and returns the shard list, for a writer that is one of several (`rank`)."""

    def __init__(self, directory: str | os.PathLike, width: int, dtype: str = "float32", shard_rows: int = 65536,
                 rank: Optional[int] = None):
        if dtype not in DTYPES:
            raise UserError(f"unknown cache dtype {dtype!r}; use one of {', '.join(DTYPES)}")
        self.directory, self.width, self.dtype, self.rank = Path(directory), int(width), dtype, rank
        self.directory.mkdir(parents=True, exist_ok=True)
        self.acts_RD = torch.empty(shard_rows, width, dtype=DTYPES[dtype])
        self.ids_3R = torch.empty(3, shard_rows, dtype=torch.int64)  # token_ids, doc_ids, positions
        self.fill = 0
        self.shards: list[dict[str, Any]] = []

    @property
    def rows(self) -> int:
        return sum(s["rows"] for s in self.shards) + self.fill

    def add(self, acts_RD: torch.Tensor, token_ids: torch.Tensor, doc_ids: torch.Tensor,
            positions: torch.Tensor) -> None:
        n = acts_RD.shape[0]
        if acts_RD.shape[1] != self.width:
            raise ValueError(f"rows of width {acts_RD.shape[1]} added to a cache of width {self.width}")
        done = 0
        while done < n:
            take = min(n - done, self.acts_RD.shape[0] - self.fill)
            dst = slice(self.fill, self.fill + take)
            self.acts_RD[dst] = acts_RD[done:done + take]
            for i, column in enumerate((token_ids, doc_ids, positions)):
                self.ids_3R[i, dst] = column[done:done + take]
            self.fill += take
            done += take
            if self.fill == self.acts_RD.shape[0]:
                self._flush()

    def _flush(self) -> None:
        if self.fill == 0:
            return
        tensors = {"acts": self.acts_RD[: self.fill]}
        tensors.update({key: self.ids_3R[i, : self.fill] for i, key in enumerate(TENSORS[1:])})
        self.shards.append(save_shard(self.directory, shard_name(len(self.shards), self.rank), tensors))
        self.fill = 0

    def finish(self) -> list[dict[str, Any]]:
        """Flush the last shard; the shards written, in order ({file, rows, sha256})."""
        self._flush()
        return list(self.shards)

    def close(self, **manifest: Any) -> dict:
        """Flush the last shard and write manifest.json (`manifest` adds model, layer, site, corpus fingerprint...)."""
        return write_manifest(self.directory, self.finish(), self.width, self.dtype, **manifest)


class ShardStore:
    """Read side of a store (`what` names it in errors, `stage` is the stage that writes it). Nothing is loaded up
    front: shards are opened (memory-mapped) on demand."""

    def __init__(self, directory: str | os.PathLike, what: str, stage: str):
        self.dir, self.what, self.stage = Path(directory), what, stage
        self.manifest: dict = read_manifest(self.dir, what, stage)
        self.shards: list[dict] = list(self.manifest["shards"])
        self.rows: int = int(self.manifest["rows"])
        # offsets[i] = first global row of shard i; offsets[-1] = rows
        self.offsets: list[int] = [0]
        for s in self.shards:
            self.offsets.append(self.offsets[-1] + int(s["rows"]))
        if self.offsets[-1] != self.rows:
            raise UserError(f"{self.dir / MANIFEST} lists shards with {self.offsets[-1]} rows but says "
                            f"rows={self.rows}; rerun `python -m irm {stage}`")

    def __len__(self) -> int:
        return self.rows

    def path(self, shard: int) -> Path:
        return self.dir / self.shards[shard]["file"]

    def verify(self, shards: Optional[list[int]] = None) -> None:
        """Check every shard's sha256 against the manifest; UserError naming the first damaged or missing shard."""
        listed = self.shards if shards is None else [self.shards[i] for i in shards]
        verify_shards(self.dir, listed, self.what, self.stage)

    def _open(self, shard: int):
        from safetensors import SafetensorError, safe_open

        path = self.path(shard)
        try:
            return safe_open(str(path), framework="pt")
        except (OSError, SafetensorError) as e:
            raise UserError(f"cannot read {self.what} shard {path} ({e}); rerun `python -m irm {self.stage}`") from e

    def read_shard(self, shard: int, keys: Optional[tuple[str, ...]] = None) -> dict[str, torch.Tensor]:
        """Whole tensors of one shard (`keys`, or all it holds), in their stored dtype."""
        with self._open(shard) as f:
            return {k: f.get_tensor(k) for k in (f.keys() if keys is None else keys)}

    def read_all(self, keys: tuple[str, ...]) -> dict[str, torch.Tensor]:
        """Every row of `keys`, shards concatenated in manifest order."""
        parts = [self.read_shard(i, keys) for i in range(len(self.shards))]
        return {k: torch.cat([p[k] for p in parts]) for k in keys}

    def shard_of(self, row: int) -> int:
        return bisect.bisect_right(self.offsets, row) - 1


class ActivationCache(ShardStore):
    """Read side of one layer's cache."""

    def __init__(self, layer_dir: str | os.PathLike):
        super().__init__(layer_dir, "activation cache", "cache")
        self.width: int = int(self.manifest["width"])
        self.layer: Optional[int] = self.manifest.get("layer")
        self.dtype: str = self.manifest["dtype"]

    def read_shard(self, shard: int, keys: tuple[str, ...] = TENSORS) -> dict[str, torch.Tensor]:
        """Whole tensors of one shard, acts in their stored dtype."""
        return super().read_shard(shard, keys)

    def read_range(self, start: int, stop: int, keys: tuple[str, ...] = TENSORS) -> dict[str, torch.Tensor]:
        """Global rows [start, stop), read through the memory map (only those rows leave the disk). Acts as float32."""
        if not 0 <= start <= stop <= self.rows:
            raise IndexError(f"rows [{start}, {stop}) outside a cache of {self.rows} rows")
        parts: dict[str, list[torch.Tensor]] = {k: [] for k in keys}
        shard = self.shard_of(start) if start < self.rows else len(self.shards)
        while start < stop:
            lo, hi = start - self.offsets[shard], min(stop, self.offsets[shard + 1]) - self.offsets[shard]
            with self._open(shard) as f:
                for k in keys:
                    parts[k].append(f.get_slice(k)[lo:hi])
            start = self.offsets[shard] + hi
            shard += 1
        out = {k: torch.cat(v) if v else self._empty(k) for k, v in parts.items()}
        if "acts" in out:
            out["acts"] = out["acts"].float()
        return out

    def _empty(self, key: str) -> torch.Tensor:
        return torch.empty(0, self.width) if key == "acts" else torch.empty(0, dtype=torch.int64)

    def iter_batches(self, batch_rows: int, keys: tuple[str, ...] = TENSORS) -> Iterator[dict[str, torch.Tensor]]:
        """Every row in order, `batch_rows` at a time (the last batch may be shorter); acts as float32."""
        if batch_rows < 1:
            raise ValueError("batch_rows must be >= 1")
        for start in range(0, self.rows, batch_rows):
            yield self.read_range(start, min(start + batch_rows, self.rows), keys)

    def read_rows(self, indices, keys: tuple[str, ...] = TENSORS) -> dict[str, torch.Tensor]:
        """Rows at global `indices` (any order, repeats allowed), returned in that order; acts as float32."""
        idx = torch.as_tensor(indices, dtype=torch.int64).reshape(-1)
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= self.rows):
            raise IndexError(f"row index out of range for a cache of {self.rows} rows")
        out = {k: (torch.empty(idx.numel(), self.width) if k == "acts" else torch.empty(idx.numel(), dtype=torch.int64))
               for k in keys}
        shard_ids = torch.searchsorted(torch.as_tensor(self.offsets), idx, right=True) - 1
        for shard in torch.unique(shard_ids).tolist():
            where = (shard_ids == shard).nonzero().squeeze(1)
            local = idx[where] - self.offsets[shard]
            lo, hi = int(local.min()), int(local.max()) + 1
            with self._open(shard) as f:  # read only the span that holds the requested rows
                for k in keys:
                    out[k][where] = f.get_slice(k)[lo:hi][local - lo].to(out[k].dtype)
        return out
