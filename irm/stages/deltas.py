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

from irm.activations.store import MANIFEST, intact, save_shard, shard_name, write_store_manifest
from irm.artifacts import RunDir, append_jsonl, read_json, read_jsonl
from irm.config import RunConfig
from irm.delta_rows import RAW, triple_rows
from irm.stages import relpath
from irm.sae.splice import load_saes, n_codes

DELTAS_DIR = relpath("deltas")
SHARD_TRIPLES = 1024  # triples per shard (two rows each): a shard is the unit of resuming and of streaming
SHARD = re.compile(r"shard-(\d+)\.safetensors")  # named by its chunk: triples [index * SHARD_TRIPLES, ...)
JOURNAL = "journal-rank-{rank:05d}.jsonl"  # shards one process finished, appended as written; gone when complete
JOURNALS = "journal-rank-*.jsonl"


# ---------------------------------------------------------------------------------------------------------------
# The shards


def write_shard(directory: Path, index: int, x, y, triple, sign, x_raw=None) -> dict:
    """One shard `shard-NNNNN.safetensors` of the shard store (x float32 [rows, features], y float32, triple and
    sign int64, and x_raw float32 [rows, layers x d_in] when given); its manifest record {file, rows, sha256}."""
    tensors = {"x": x.float(), "y": y.float(), "triple": triple.long(), "sign": sign.long()}
    if x_raw is not None:
        tensors[RAW] = x_raw.float()
    return save_shard(directory, shard_name(index), tensors)


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
    from irm.layers import chosen_layers
    from irm.models import load_tuned, n_layers
    from irm.parallel import split_list
    from irm.runtime import start
    from irm.stages import mark_done, stage_fingerprint
    from irm.readers import read_triples

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
