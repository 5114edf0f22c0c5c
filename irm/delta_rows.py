"""The regression's rows (paper 4.3, E.2) and the deltas store that holds them: how a batch of triples becomes rows
through the spliced SAEs (the deltas stage and the control build theirs with `triple_rows`), and the reader of the
deltas stage's shards (the regression and the control read them)."""

from __future__ import annotations

from pathlib import Path

from irm.activations.store import ShardStore, read_manifest as read_store_manifest, verify_shards
from irm.readers import VARIANTS
from irm.sae.splice import n_codes

KEYS = ("x", "y", "triple", "sign")  # the tensors of a deltas shard, a row each
RAW = "x_raw"  # also in each shard: the activations the codes of `x` encode (the SAEs' inputs; the control reads them)


def sentiment_deltas(pos_NLF, neu_NLF, neg_NLF) -> tuple["torch.Tensor", "torch.Tensor"]:
    """(Delta+, Delta-) per triple: the per-layer Euclidean distances to the neutral codes, summed over layers;
    Delta- negated (paper 4.3)."""
    plus = (pos_NLF - neu_NLF).norm(dim=-1).sum(dim=-1)
    minus = -(neg_NLF - neu_NLF).norm(dim=-1).sum(dim=-1)
    return plus, minus


def triple_rows(model, saes: dict, triples: list[dict], pad_id: int, batch_size: int, site: str, desc: str,
                progress_bar: bool = True) -> dict:
    """The regression rows of `triples` read through `saes` spliced into `model` (`rows_of`), with RAW: the
    activations the codes encode, at the sentiment token of each variant. One shared-prefix read: the three variants
    share the text before the word, so each prefix runs once."""
    from irm.sae.splice import codes_at as shared_prefix_codes, with_inputs

    width = n_codes(saes)
    items = [(t["ids"][v], t["positions"][v]) for v in VARIANTS for t in triples]
    both = shared_prefix_codes(model, with_inputs(saes), items, pad_id, batch_size, site, desc=desc,
                               progress_bar=progress_bar)
    codes = dict(zip(VARIANTS, both[..., :width].split(len(triples))))
    raw = dict(zip(VARIANTS, both[..., width:].split(len(triples))))
    ids = [t["id"] for t in triples]
    rows = rows_of(ids, codes["positive"], codes["neutral"], codes["negative"])
    rows[RAW] = rows_of(ids, raw["positive"], raw["neutral"], raw["negative"])["x"]
    return rows


def rows_of(triple_ids, pos_NLF, neu_NLF, neg_NLF) -> dict:
    """Regression rows of a chunk of triples: each triple's positive row (y = Delta+) then its negative row."""
    import torch

    plus, minus = sentiment_deltas(pos_NLF, neu_NLF, neg_NLF)
    n = pos_NLF.shape[0]
    x = torch.stack([pos_NLF.flatten(1), neg_NLF.flatten(1)], dim=1).reshape(2 * n, -1)
    y = torch.stack([plus, minus], dim=1).reshape(-1)
    triple = torch.as_tensor(triple_ids, dtype=torch.long).repeat_interleave(2)
    sign = torch.tensor([1, -1], dtype=torch.long).repeat(n)
    return {"x": x, "y": y, "triple": triple, "sign": sign}


def read_manifest(directory: str | Path) -> dict:
    """The deltas manifest, refusing a missing or unfinished one."""
    return read_store_manifest(directory, "deltas", "deltas")


def verify(directory: str | Path, manifest: dict) -> None:
    """Every shard `manifest` lists is on disk with its recorded sha256, else a UserError naming the first that is not."""
    verify_shards(directory, manifest["shards"], "deltas", "deltas")


def open_deltas(directory: str | Path) -> ShardStore:
    """The deltas of a run as a shard store (`irm.activations.store`), every shard checked against its sha256 first.
    `store.manifest` has layers, site, width (codes per layer), n_features, n_triples; `store.read_shard(i, keys)`."""
    store = ShardStore(directory, "deltas", "deltas")
    store.verify()
    return store


def read_rows(directory: str | Path, keys: tuple[str, ...] = KEYS) -> dict:
    """Every deltas row in manifest order (triple order; each triple's positive row, then its negative), after the
    checks the regression makes: {x [rows, n_features] float32 (the tuned model's SAE codes, layer-major), y
    float32, triple int64, sign int64 (+1 positive, -1 negative)}, `keys` of those."""
    return open_deltas(directory).read_all(keys)
