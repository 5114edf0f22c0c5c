"""`python -m irm cache` (paper 4.2): run the tuned model M_RLHF once over the corpus and store the chosen layers'
MLP activations, padding excluded, with each row's token id, document id and position, as sharded safetensors per
layer (irm.activations.store). SAE training then reads the cache instead of rerunning the model on every batch.
With `devices: N` or under torchrun the documents are split between processes (irm.parallel), one cache either way."""

from __future__ import annotations

import contextlib

from irm.activations.collect import cache_activations
from irm.activations.store import MANIFEST, ShardWriter, cache_layer_dir, write_manifest
from irm.parallel import Ranks, launch


def run(cfg) -> None:
    """Cache the chosen layers' activations over cfg.corpus (split cfg.corpus.split) and record the stage.

    With `devices: N` (or N processes started by torchrun) each process caches a contiguous share of the documents
    into one shared temporary folder per layer; once every process has finished, rank 0 writes the layer's single
    manifest and moves the folder into place. Across several nodes, run_dir must be on a filesystem that every node
    sees at the same path (NFS, Lustre, ...): the shards of all ranks end up in one folder."""
    launch(cfg, _cache_worker)


def _cache_worker(ranks: Ranks, cfg) -> None:
    """One process's part of `run`: its share of the documents, and on rank 0 the manifests and the record."""
    from irm.artifacts import atomic_dir
    from irm.data import corpus_fingerprint, load_texts
    from irm.layers import chosen_layers
    from irm.models import load_tuned, n_layers, site_width
    from irm.runtime import start
    from irm.stages import artifact, mark_done

    device = start(cfg.seed, ranks=ranks)
    c = cfg.cache
    model, tokenizer = load_tuned(cfg, device=device)
    layers = chosen_layers(cfg, n_layers(model))
    width = site_width(model, c.site)
    texts = load_texts(cfg.corpus, cfg.corpus.split, cfg.seed, n=c.n_documents)
    share = ranks.split(len(texts))
    record = {
        "model": cfg.model.name,
        "policy": str(artifact(cfg.run_dir, "policy")),
        "site": c.site,
        "corpus_fingerprint": corpus_fingerprint(cfg.corpus, cfg.corpus.split, cfg.seed),
        "split": cfg.corpus.split,
        "documents": len(texts),
        "max_length": c.max_length,
        "world_size": ranks.world_size,
    }
    targets = {layer: cache_layer_dir(cfg.run_dir, layer) for layer in layers}
    # Each layer's shards go to a temporary folder (made by rank 0, written by every rank) that replaces the old
    # cache only when rank 0 leaves this block, after every rank's shards are in the manifest: an interrupted run
    # leaves the previous cache (or none), never a partial one. A rank that fails ends the run (the launcher stops
    # the others) before rank 0 can list its shards; the next run clears the abandoned folder.
    with contextlib.ExitStack() as stack:
        tmp = ranks.broadcast({layer: stack.enter_context(atomic_dir(path)) for layer, path in targets.items()}
                              if ranks.is_main else None)
        own = None if ranks.world_size == 1 else ranks.rank
        writers = {layer: ShardWriter(tmp[layer], width, c.dtype, c.shard_rows, rank=own) for layer in layers}
        cache_activations(model, tokenizer, texts[share.start:share.stop], writers, site=c.site,
                          batch_size=c.batch_size, max_length=c.max_length, storage_dtype=c.dtype,
                          first_doc=share.start, ranks=ranks)
        shards = ranks.gather({layer: writer.finish() for layer, writer in writers.items()})
        if ranks.is_main:
            for layer in layers:
                # Rank order is document order (ranks hold contiguous shares): rows read as one process wrote them.
                write_manifest(tmp[layer], [s for of_rank in shards for s in of_rank[layer]], width, c.dtype,
                               layer=layer, **record)
    if ranks.is_main:
        # The manifests hold every shard's sha256; readers verify shards against them, so the run manifest need not
        # hash gigabytes of shards again.
        mark_done(cfg, "cache", [path / MANIFEST for path in targets.values()])
    # No process returns before the caches are in place and recorded.
    ranks.barrier()
