"""Quality of exported SAEs, measured the way SAELens / SAEBench report it, by the sae stage after each fit:

- on the held-out tail of the layer's activation cache (documents the SAE never trained on): L0 (active features
  per token), explained variance (1 - Var(x - x_hat) / Var(x), variances summed over dimensions; also without each
  document's first token, an attention sink whose huge activations can dominate the variance), normalised MSE,
  the dead fraction (features that fire on no held-out token) and every feature's firing frequency;
- downstream, on a few held-out documents of the corpus: the tuned model's next-token loss clean, with the SAE's
  reconstruction spliced in at its layer, and with the layer's output zeroed; CE loss recovered =
  (L_zero - L_sae) / (L_zero - L_clean) (1: the splice costs nothing; 0: as bad as deleting the layer's output).

Every number is computed with the exported SAE (`load_sae`) on raw activations, as every later stage uses it.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional, Sequence

import torch

from irm.sae.model import moment_metrics, merge_moments, row_moments

METRICS_FILE = "metrics.json"  # per exported SAE, beside its cfg.json


@torch.no_grad()
def heldout_metrics(sae, cache, start: int, stop: Optional[int] = None, batch_rows: int = 8192) -> dict:
    """Reconstruction and sparsity of `sae` on cache rows [start, stop): l0, l0_fraction (of the width),
    explained_variance, nmse, dead_fraction, rows, and feature_frequency (the fraction of rows each feature fires
    on). Statistics in float64, merged across batches exactly."""
    stop = cache.rows if stop is None else stop
    moments = {"all": None, "later": None}
    fired_F = torch.zeros(sae.d_hidden, dtype=torch.float64)
    device = sae.W_dec.device
    for lo in range(start, stop, batch_rows):
        rows = cache.read_range(lo, min(stop, lo + batch_rows), ("acts", "positions"))
        x_BD = rows["acts"].float().to(device)
        x_hat_BD, codes_BF = sae(x_BD)
        fired_F += (codes_BF > 0).sum(dim=0).double().cpu()
        later = (rows["positions"] > 0).to(device)
        for key, keep in (("all", slice(None)), ("later", later)):
            batch = row_moments(x_BD[keep], x_hat_BD[keep], codes_BF[keep]).cpu()
            moments[key] = batch if moments[key] is None else merge_moments(torch.stack([moments[key], batch]))
    n = max(0, stop - start)
    if moments["all"] is None:
        return {"rows": 0}
    stats = {k: float(v) for k, v in moment_metrics(moments["all"]).items()}
    later = {k: float(v) for k, v in moment_metrics(moments["later"]).items()}
    freq_F = fired_F / max(1, n)
    return {"rows": n, "l0": stats["l0"], "l0_fraction": stats["l0"] / sae.d_hidden,
            "explained_variance": stats["explained_variance"], "nmse": stats["nmse"],
            # Without each document's first token, whose activations can dwarf every other token's (an attention
            # sink) and then dominate the variance: the number that says how well ordinary tokens are reconstructed.
            "explained_variance_after_first": later["explained_variance"], "l0_after_first": later["l0"],
            "dead_fraction": float((fired_F == 0).double().mean()), "feature_frequency": freq_F.tolist()}


def _tokenize(tokenizer, texts: Sequence[str], max_length: int):
    enc = tokenizer(list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


@torch.no_grad()
def lm_loss(model, ids_BT: torch.Tensor, mask_BT: torch.Tensor, batch_size: int = 8) -> tuple[float, int]:
    """(summed next-token cross-entropy, predicted tokens) over the real tokens of the batch, padding excluded,
    positions counted from each text's first real token (as the cache counts them)."""
    import torch.nn.functional as F

    device = next(model.parameters()).device
    total, count = 0.0, 0
    for lo in range(0, ids_BT.shape[0], batch_size):
        ids, mask = ids_BT[lo:lo + batch_size].to(device), mask_BT[lo:lo + batch_size].to(device)
        pos = (mask.cumsum(-1) - 1).clamp_min(0)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).logits.float()
        keep = (mask[:, :-1] * mask[:, 1:]).bool()  # both the predicting and the predicted token are real
        ce = F.cross_entropy(logits[:, :-1][keep], ids[:, 1:][keep], reduction="sum")
        total += float(ce)
        count += int(keep.sum())
    return total, count


@torch.no_grad()
def ce_loss_recovered(model, tokenizer, texts: Sequence[str], layer: int, saes: dict, *, site: str = "mlp_out",
                      max_length: int = 64, batch_size: int = 8, clean: Optional[tuple[float, int]] = None) -> dict:
    """{"clean", "zero_ablated", "tokens", "documents", name: {"spliced", "recovered", "delta"}} for every SAE in
    `saes` ({name: SparseAutoencoder} of `layer`): mean next-token losses in nats per token. `recovered` is None
    when zeroing the layer costs nothing measurable (the ratio would be noise over noise). `clean`: the clean
    (summed loss, tokens) of these texts when already known (it is the same for every layer)."""
    from irm.models import splice

    ids, mask = _tokenize(tokenizer, texts, max_length)
    clean, n = lm_loss(model, ids, mask, batch_size) if clean is None else clean
    with splice(model, {layer: lambda x: torch.zeros_like(x)}, site=site):
        zero, _ = lm_loss(model, ids, mask, batch_size)
    out: dict = {"clean_sum": clean, "clean": clean / max(n, 1), "zero_ablated": zero / max(n, 1), "tokens": n, "documents": len(texts)}
    gap = out["zero_ablated"] - out["clean"]
    for name, sae in saes.items():
        dtype = sae.W_dec.dtype

        def through(x, sae=sae, dtype=dtype):
            return sae.decode(sae.encode(x.to(dtype))).to(x.dtype)

        with splice(model, {layer: through}, site=site):
            spliced, _ = lm_loss(model, ids, mask, batch_size)
        spliced /= max(n, 1)
        out[name] = {"spliced": spliced, "delta": spliced - out["clean"],
                     "recovered": (out["zero_ablated"] - spliced) / gap if abs(gap) > 1e-6 else None}
    return out


def finite(v):
    """JSON-safe: NaN/inf become None."""
    return v if v is None or not isinstance(v, float) or math.isfinite(v) else None


def summary_row(metrics: dict) -> dict:
    """A dictionary's metrics without its per-feature list."""
    return {k: finite(v) for k, v in metrics.items() if k != "feature_frequency"}


def read_feature_frequency(sae_directory: str | Path) -> Optional[list[float]]:
    """The held-out firing frequency of every feature of the SAE exported in `sae_directory`, or None when the sae
    stage has not measured it (an SAE trained through `python -m irm fit`)."""
    from irm.artifacts import read_json

    path = Path(sae_directory) / METRICS_FILE
    if not path.is_file():
        return None
    return read_json(path).get("feature_frequency")
