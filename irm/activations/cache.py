"""`python -m irm cache` (paper 4.2): run the tuned model M_RLHF once over the corpus and store the chosen layers'
MLP activations, padding excluded, with each row's token id, document id and position, as sharded safetensors per
layer (irm.activations.store). SAE training then reads the cache instead of rerunning the model on every batch.
With `devices: N` or under torchrun the documents are split between processes (irm.parallel), one cache either way."""

from __future__ import annotations

import contextlib
from typing import Optional

import torch

from irm.activations.store import MANIFEST, ShardWriter, cache_layer_dir, write_manifest
from irm.errors import UserError
from irm.parallel import Ranks, launch

FLOAT16_MAX = 65504.0


def cache_activations(model, tokenizer, texts: list[str], writers: dict[int, ShardWriter], *, site: str = "mlp_out",
                      batch_size: int = 16, max_length: int = 64, storage_dtype: str = "float32",
                      first_doc: int = 0, ranks: Optional[Ranks] = None) -> None:
    """Append the `site` activations of every layer in `writers` over `texts` (first `max_length` tokens of each)
    to that layer's writer: one row per non-padding token, documents in order, positions ascending. `texts` are
    documents `first_doc`, `first_doc + 1`, ... of the corpus (one process's share): doc_ids are corpus-wide.
    `ranks` only decides which process shows the progress bar."""
    from irm.models import capture

    device = next(model.parameters()).device
    layers = sorted(writers)
    starts = range(0, len(texts), batch_size)
    bar = (ranks or Ranks()).progress(starts, desc=f"cache {site} of layers {layers}", total=len(starts), unit="batch")
    with torch.inference_mode(), capture(model, layers, site) as acts:
        for start in bar:
            enc = tokenizer(texts[start:start + batch_size], padding=True, truncation=True, max_length=max_length,
                            return_tensors="pt")
            ids_BS, mask_BS = enc["input_ids"].to(device), enc["attention_mask"].to(device)
            # Left padding shifts a document right; explicit positions give it the positions it has alone, so a
            # row's activations do not depend on which documents share its batch.
            pos_BS = (mask_BS.cumsum(-1) - 1).clamp_min(0)
            model(input_ids=ids_BS, attention_mask=mask_BS, position_ids=pos_BS, use_cache=False)
            keep_BS = mask_BS.bool()
            first = first_doc + start
            doc_BS = torch.arange(first, first + ids_BS.shape[0], device=device).unsqueeze(1).expand_as(ids_BS)
            token_ids, doc_ids, positions = ids_BS[keep_BS].cpu(), doc_BS[keep_BS].cpu(), pos_BS[keep_BS].cpu()
            for layer in layers:
                acts_RD = acts[layer][keep_BS]
                _check_values(acts_RD, layer, site, doc_ids, positions, storage_dtype)
                writers[layer].add(acts_RD.cpu(), token_ids, doc_ids, positions)


def _check_values(acts_RD: torch.Tensor, layer: int, site: str, doc_ids, positions, storage_dtype: str) -> None:
    """NaN/inf (or values float16 cannot hold) are reported with where they came from, never stored silently."""
    bad_R = ~torch.isfinite(acts_RD).all(dim=1)
    if bool(bad_R.any()):
        row = int(bad_R.nonzero()[0, 0])
        raise UserError(
            f"the tuned model's {site} activations at layer {layer} hold NaN or inf (document {int(doc_ids[row])}, "
            f"token position {int(positions[row])}); load the model in float32 (model.dtype: float32) or check "
            "the tuned policy for diverged weights"
        )
    if storage_dtype == "float16":
        peak = float(acts_RD.abs().amax()) if acts_RD.numel() else 0.0
        if peak > FLOAT16_MAX:
            raise UserError(f"layer {layer} {site} activations reach {peak:.4g}, beyond float16's range; "
                            "use cache.dtype: bfloat16 or float32")


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
    from irm.divergence import chosen_layers
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
