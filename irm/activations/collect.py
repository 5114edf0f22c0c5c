"""A model's activations at some layers over a list of texts, appended row by row to shard writers
(irm.activations.store): the cache stage's work, and the diff stage's for the base model."""

from __future__ import annotations

from typing import Optional

import torch

from irm.activations.store import ShardWriter
from irm.errors import UserError
from irm.parallel import Ranks


FLOAT16_MAX = 65504.0


def cache_activations(model, tokenizer, texts: list[str], writers: dict[int, ShardWriter], *, site: str = "mlp_out",
                      batch_size: int = 16, max_length: int = 64, storage_dtype: str = "float32",
                      first_doc: int = 0, ranks: Optional[Ranks] = None) -> None:
    """Append the `site` activations of every layer in `writers` over `texts` (first `max_length` tokens of each)
    to that layer's writer: one row per non-padding token, documents in order, positions ascending. `texts` are
    documents `first_doc`, `first_doc + 1`, ... of the corpus (one process's share): doc_ids are corpus-wide.
    `ranks` only decides which process shows the progress bar."""
    from irm.models import capture, stop_after

    device = next(model.parameters()).device
    layers = sorted(writers)
    starts = range(0, len(texts), batch_size)
    bar = (ranks or Ranks()).progress(starts, desc=f"cache {site} of layers {layers}", total=len(starts), unit="batch")
    # Nothing after the deepest cached layer is needed: not its later blocks, nor the output head.
    with torch.inference_mode(), capture(model, layers, site) as acts, stop_after(model, layers[-1]) as forward:
        for start in bar:
            enc = tokenizer(texts[start:start + batch_size], padding=True, truncation=True, max_length=max_length,
                            return_tensors="pt")
            ids_BS, mask_BS = enc["input_ids"].to(device), enc["attention_mask"].to(device)
            # Left padding shifts a document right; explicit positions give it the positions it has alone, so a
            # row's activations do not depend on which documents share its batch.
            pos_BS = (mask_BS.cumsum(-1) - 1).clamp_min(0)
            forward(input_ids=ids_BS, attention_mask=mask_BS, position_ids=pos_BS, use_cache=False)
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
