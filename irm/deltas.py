"""Sentiment activation deltas (paper 4.3, E.2): every chosen layer's 1x SAE spliced into the tuned model at once,
its codes read at the sentiment token of each triple variant. Delta+ = sum over layers of ||codes(positive) -
codes(neutral)||, Delta- = minus the same for the negative variant. The regression rows are x = the concatenated
codes (layers x width) of the positive or negative variant and y = its delta, streamed from safetensors shards.
With `devices: N` the shards still to do are divided among N processes (irm.parallel); each writes its own.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

from irm.activations.store import MANIFEST, ShardStore, intact, read_manifest as read_store_manifest, save_shard
from irm.activations.store import shard_name, verify_shards, write_store_manifest
from irm.artifacts import RunDir, append_jsonl, read_json, read_jsonl
from irm.config import RunConfig
from irm.stages import relpath
from irm.sae.splice import load_saes, n_codes

DELTAS_DIR = relpath("deltas")
KEYS = ("x", "y", "triple", "sign")  # the tensors of a deltas shard, a row each
RAW = "x_raw"  # also in each shard: the activations the codes of `x` encode (the SAEs' inputs; the control reads them)
SHARD_TRIPLES = 1024  # triples per shard (two rows each): a shard is the unit of resuming and of streaming
SHARD = re.compile(r"shard-(\d+)\.safetensors")  # named by its chunk: triples [index * SHARD_TRIPLES, ...)
JOURNAL = "journal-rank-{rank:05d}.jsonl"  # shards one process finished, appended as written; gone when complete
JOURNALS = "journal-rank-*.jsonl"


def sentiment_deltas(pos_NLF, neu_NLF, neg_NLF) -> tuple["torch.Tensor", "torch.Tensor"]:
    """(Delta+, Delta-) per triple: the per-layer Euclidean distances to the neutral codes, summed over layers;
    Delta- negated (paper 4.3)."""
    plus = (pos_NLF - neu_NLF).norm(dim=-1).sum(dim=-1)
    minus = -(neg_NLF - neu_NLF).norm(dim=-1).sum(dim=-1)
    return plus, minus


# ---------------------------------------------------------------------------------------------------------------
# The shards


def write_shard(directory: Path, index: int, x, y, triple, sign, x_raw=None) -> dict:
    """One shard `shard-NNNNN.safetensors` of the shard store (x float32 [rows, features], y float32, triple and
    sign int64, and x_raw float32 [rows, layers x d_in] when given); its manifest record {file, rows, sha256}."""
    tensors = {"x": x.float(), "y": y.float(), "triple": triple.long(), "sign": sign.long()}
    if x_raw is not None:
        tensors[RAW] = x_raw.float()
    return save_shard(directory, shard_name(index), tensors)


def triple_rows(model, saes: dict, triples: list[dict], pad_id: int, batch_size: int, site: str, desc: str,
                progress_bar: bool = True) -> dict:
    """The regression rows of `triples` read through `saes` spliced into `model` (`rows_of`), with RAW: the
    activations the codes encode, at the sentiment token of each variant. One shared-prefix read: the three variants
    share the text before the word, so each prefix runs once."""
    from irm.sae.splice import codes_at as shared_prefix_codes, with_inputs
    from irm.triples import VARIANTS

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


def finished_shards(directory: Path, fp: str, layers: list[int], chunks: list[range]) -> dict[int, dict]:
    """{chunk index: shard} of an earlier run with the same fingerprint: the shards its manifest or its processes'
    journals list whose rows fit the chunk and whose file still has the recorded checksum."""
    records = []
    old = read_json(directory / MANIFEST) if (directory / MANIFEST).exists() else {}
    if old.get("fingerprint") == fp and old.get("layers") == layers:
        records += old.get("shards", [])
    for journal in sorted(directory.glob(JOURNALS)):
        records += [r for r in read_jsonl(journal) if r.get("fingerprint") == fp and r.get("layers") == layers]
    kept, digests = {}, {}
    for rec in records:
        match = SHARD.fullmatch(rec["file"])
        chunk = int(match.group(1)) if match else len(chunks)
        if chunk >= len(chunks) or rec["rows"] != 2 * len(chunks[chunk]):
            continue
        if intact(directory, rec, digests):
            kept[chunk] = {"file": rec["file"], "rows": rec["rows"], "sha256": rec["sha256"]}
    return kept


def run(cfg: RunConfig) -> Optional[dict]:
    from irm.parallel import launch

    # The shard size travels as an argument: spawned processes import this module afresh.
    return launch(cfg, _deltas, SHARD_TRIPLES)


def _deltas(ranks, cfg: RunConfig, shard_triples: int) -> Optional[dict]:
    """One process's part of the stage: the chunks of `shard_triples` triples not done yet are split among the
    processes, each writes its shards (named by chunk, so the manifest lists them in triple order whoever wrote
    them) and records each in its own journal; rank 0 writes the manifest once all have finished."""
    from irm.divergence import chosen_layers
    from irm.models import load_tuned, n_layers
    from irm.parallel import split_list
    from irm.runtime import start
    from irm.stages import mark_done, stage_fingerprint
    from irm.triples import read_triples

    device = start(cfg.seed, ranks=ranks)
    out_dir = RunDir(cfg.run_dir).path(DELTAS_DIR)
    triples = read_triples(cfg.run_dir)
    model, tokenizer = load_tuned(cfg, device=device)
    layers = chosen_layers(cfg, n_layers(model))
    saes = load_saes(cfg.run_dir, layers, model, cfg.cache.site, cfg.sae.dictionary_pair()[0])
    width = n_codes(saes)
    fp = stage_fingerprint(cfg, "deltas")
    chunks = [range(i, min(i + shard_triples, len(triples))) for i in range(0, len(triples), shard_triples)]
    manifest = {"layers": layers, "site": cfg.cache.site, "width": width, "n_features": len(layers) * width,
                "n_triples": len(triples), "fingerprint": fp,
                "x": "concatenated 1x-SAE codes at the sentiment token, layer-major (layers x width)",
                "y": "Delta+ (positive rows, sign +1) or Delta- (negative rows, sign -1): sum over layers of the "
                     "Euclidean distance to the neutral variant's codes, negated for negatives",
                "pooling": "mean over the word's tokens when it has several",
                RAW: "the activations (the SAEs' inputs) that x's codes encode, layer-major (layers x d_in)"}

    # Resume, whatever the process count was: rank 0 decides which finished shards are kept, and marks the
    # manifest unfinished so no reader takes the shards being rewritten for complete deltas.
    kept = None
    if ranks.is_main:
        kept = finished_shards(out_dir, fp, layers, chunks)
        write_store_manifest(out_dir, [kept[c] for c in sorted(kept)], complete=False, **manifest)
    kept = ranks.broadcast(kept)
    journal = out_dir / JOURNAL.format(rank=ranks.rank)
    written = {}
    todo = [c for c in range(len(chunks)) if c not in kept]
    for c in ranks.progress(split_list(todo, ranks), desc="deltas: shards", unit="shard"):
        rows = triple_rows(model, saes, [triples[i] for i in chunks[c]], tokenizer.pad_token_id,
                           cfg.cache.batch_size, cfg.cache.site, desc="deltas: triples", progress_bar=ranks.is_main)
        written[c] = write_shard(out_dir, c, **rows)
        append_jsonl(journal, {**written[c], "fingerprint": fp, "layers": layers})
    for share in ranks.gather(written):
        kept.update(share)

    summary = None
    if ranks.is_main:
        manifest = write_store_manifest(out_dir, [kept[c] for c in range(len(chunks))], **manifest)
        # The manifest now lists every shard: journals and shards of other runs go, so the stage's outputs (all of
        # deltas/) are exactly what a single process writes.
        listed = {s["file"] for s in manifest["shards"]}
        for path in [*out_dir.glob(JOURNALS), *out_dir.glob("shard-*.safetensors")]:
            if path.name not in listed:
                path.unlink()
        mark_done(cfg, "deltas", [DELTAS_DIR], rows=manifest["rows"])
        summary = {"rows": manifest["rows"], "n_triples": len(triples), "layers": layers,
                   "n_features": manifest["n_features"], "shards": len(manifest["shards"]),
                   "shards_written": len(todo), "processes": ranks.world_size}
        print(f"deltas: {summary['rows']} rows from {len(triples)} triples, {summary['n_features']} features "
              f"(layers {layers} x {width}), {summary['shards']} shards in {out_dir}: {len(todo)} written by "
              f"{ranks.world_size} process(es), {summary['shards'] - len(todo)} kept from an earlier run")
    ranks.barrier()
    return summary
