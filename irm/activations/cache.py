"""`python -m irm cache` (paper 4.2): run the tuned model M_RLHF once over the corpus and store the chosen layers'
MLP activations, padding excluded, with each row's token id, document id and position, as sharded safetensors per
layer (irm.activations.store). SAE training then reads the cache instead of rerunning the model on every batch."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from irm.activations.store import MANIFEST, ShardWriter, cache_layer_dir
from irm.errors import UserError

FLOAT16_MAX = 65504.0


def cache_activations(model, tokenizer, texts: list[str], writers: dict[int, ShardWriter], *, site: str = "mlp_out",
                      batch_size: int = 16, max_length: int = 64, storage_dtype: str = "float32") -> None:
    """Append the `site` activations of every layer in `writers` over `texts` (first `max_length` tokens of each)
    to that layer's writer: one row per non-padding token, documents in order, positions ascending."""
    from irm.models import capture
    from irm.runtime import progress

    if batch_size < 1 or max_length < 1:
        raise UserError(f"cache.batch_size ({batch_size}) and cache.max_length ({max_length}) must be >= 1")
    device = next(model.parameters()).device
    layers = sorted(writers)
    starts = range(0, len(texts), batch_size)
    with torch.inference_mode(), capture(model, layers, site) as acts:
        for start in progress(starts, desc=f"cache {site} of layers {layers}", total=len(starts), unit="batch"):
            enc = tokenizer(texts[start:start + batch_size], padding=True, truncation=True, max_length=max_length,
                            return_tensors="pt")
            ids_BS, mask_BS = enc["input_ids"].to(device), enc["attention_mask"].to(device)
            # Left padding shifts a document right; explicit positions give it the positions it has alone, so a
            # row's activations do not depend on which documents share its batch.
            pos_BS = (mask_BS.cumsum(-1) - 1).clamp_min(0)
            model(input_ids=ids_BS, attention_mask=mask_BS, position_ids=pos_BS, use_cache=False)
            keep_BS = mask_BS.bool()
            doc_BS = torch.arange(start, start + ids_BS.shape[0], device=device).unsqueeze(1).expand_as(ids_BS)
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
    """Cache the chosen layers' activations over cfg.corpus (split cfg.corpus.split) and record the stage."""
    from irm.artifacts import atomic_dir
    from irm.data import corpus_fingerprint, load_texts
    from irm.divergence import chosen_layers
    from irm.models import load_tuned, n_layers, site_width
    from irm.runtime import resolve_device, seed_all
    from irm.stages import mark_done

    seed_all(cfg.seed)
    c = cfg.cache
    model, tokenizer = load_tuned(cfg, device=resolve_device(cfg.device))
    layers = chosen_layers(cfg, n_layers(model))
    width = site_width(model, c.site)
    texts = load_texts(cfg.corpus, cfg.corpus.split, cfg.seed, n=c.n_documents)
    record = {
        "model": cfg.model.name,
        "policy": str(Path(cfg.run_dir) / "rlhf" / "policy"),
        "site": c.site,
        "corpus_fingerprint": corpus_fingerprint(cfg.corpus, cfg.corpus.split, cfg.seed),
        "split": cfg.corpus.split,
        "documents": len(texts),
        "max_length": c.max_length,
    }
    targets = {layer: cache_layer_dir(cfg.run_dir, layer) for layer in layers}
    # Each layer's shards go to a temporary folder that replaces the old cache only once complete: an interrupted
    # run leaves the previous cache (or none), never a partial one.
    with contextlib.ExitStack() as stack:
        writers = {layer: ShardWriter(stack.enter_context(atomic_dir(path)), width, c.dtype, c.shard_rows)
                   for layer, path in targets.items()}
        cache_activations(model, tokenizer, texts, writers, site=c.site, batch_size=c.batch_size,
                          max_length=c.max_length, storage_dtype=c.dtype)
        for layer, writer in writers.items():
            writer.close(layer=layer, **record)
    # The manifests hold every shard's sha256; readers verify shards against them, so the run manifest need not
    # hash gigabytes of shards again.
    mark_done(cfg, "cache", [path / MANIFEST for path in targets.values()])
