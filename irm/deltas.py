"""Sentiment activation deltas (paper 4.3, E.2): every chosen layer's 1x SAE spliced into the tuned model at once,
its codes read at the sentiment token of each triple variant. Delta+ = sum over layers of ||codes(positive) -
codes(neutral)||, Delta- = minus the same for the negative variant. The regression rows are x = the concatenated
codes (layers x width) of the positive or negative variant and y = its delta, streamed from safetensors shards.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, Optional, Sequence

from irm.artifacts import RunDir, atomic_path, read_json, sha256_file, write_json
from irm.config import RunConfig
from irm.errors import UserError

DELTAS_DIR = "deltas"
MANIFEST = "manifest.json"
SHARD_TRIPLES = 1024  # triples per shard (two rows each): a shard is the unit of resuming and of streaming


# ---------------------------------------------------------------------------------------------------------------
# SAE codes through the spliced model


def load_saes(run_dir: str | Path, layers: Sequence[int], model, site: str = "mlp_out") -> dict:
    """The exported 1x SAE of every layer, in eval mode on `model`'s device; one trained on another width (another
    model or site) is refused."""
    from irm.models import site_width
    from irm.sae import load_sae, sae_dir

    device = next(model.parameters()).device
    saes = {}
    for layer in layers:
        path = sae_dir(run_dir, layer, 1)
        if not path.exists():
            raise UserError(f"no 1x SAE for layer {layer} in {path}; run `python -m irm sae` first")
        saes[layer] = load_sae(path, d_in=site_width(model, site), device=device).eval()
    return saes


class _Stop(Exception):
    """Raised by the last spliced block: nothing after it (later blocks, the LM head) is read."""


def _stop(_module, _args, _out):
    raise _Stop


def iter_codes(model, saes: dict, sequences: Sequence[Sequence[int]], pad_id: int, batch_size: int,
               site: str = "mlp_out", desc: str = "SAE codes") -> Iterator[tuple]:
    """For batches of token-id sequences (left-padded, positions counted from each sequence's first real token),
    run `model` with every SAE in `saes` spliced in (output replaced by decode(encode(output))) and yield
    (indices into `sequences`, mask_BT, codes_BTLF): the codes of every layer in `saes` order, on the CPU.
    Sequences are batched by length so little compute goes to padding."""
    import torch

    from irm.models import blocks, splice
    from irm.runtime import progress

    if batch_size < 1:
        raise UserError(f"batch size must be at least 1, got {batch_size}")
    device = next(model.parameters()).device
    layers = list(saes)
    recorded: dict[int, torch.Tensor] = {}

    def through(layer):
        sae = saes[layer]
        dtype = next(sae.parameters()).dtype

        def fn(out):
            codes = sae.encode(out.to(dtype))
            recorded[layer] = codes
            return sae.decode(codes).to(out.dtype)

        return fn

    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    batches = [order[i: i + batch_size] for i in range(0, len(order), batch_size)]
    stopper = blocks(model)[max(layers)].register_forward_hook(_stop)
    try:
        with torch.inference_mode(), splice(model, {layer: through(layer) for layer in layers}, site=site):
            for batch in progress(batches, desc=desc, unit="batch"):
                width = max(len(sequences[i]) for i in batch)
                ids_BT = torch.full((len(batch), width), pad_id, dtype=torch.long)
                mask_BT = torch.zeros((len(batch), width), dtype=torch.long)
                for row, i in enumerate(batch):
                    seq = sequences[i]
                    ids_BT[row, width - len(seq):] = torch.as_tensor(seq, dtype=torch.long)
                    mask_BT[row, width - len(seq):] = 1
                # Explicit positions: with left padding the model would otherwise count pads as positions.
                pos_BT = (mask_BT.cumsum(-1) - 1).clamp(min=0)
                recorded.clear()
                try:
                    model(input_ids=ids_BT.to(device), attention_mask=mask_BT.to(device),
                          position_ids=pos_BT.to(device))
                except _Stop:
                    pass
                codes_BTLF = torch.stack([recorded[layer].float() for layer in layers], dim=2).cpu()
                yield batch, mask_BT, codes_BTLF
    finally:
        stopper.remove()


def codes_at(model, saes: dict, items: Sequence[tuple[Sequence[int], Sequence[int]]], pad_id: int,
             batch_size: int, site: str = "mlp_out", desc: str = "SAE codes") -> "torch.Tensor":
    """codes_NLF: for each (token ids, word positions) item, the SAE codes of every layer at the word, averaged
    over the word's tokens when it has several (multi_token: pool)."""
    import torch

    out: Optional[torch.Tensor] = None
    for batch, mask_BT, codes_BTLF in iter_codes(model, saes, [ids for ids, _ in items], pad_id, batch_size,
                                                  site, desc):
        if out is None:
            out = torch.zeros((len(items), *codes_BTLF.shape[2:]))
        width = mask_BT.shape[1]
        for row, i in enumerate(batch):
            ids, positions = items[i]
            shift = width - len(ids)
            out[i] = codes_BTLF[row, [shift + p for p in positions]].mean(dim=0)
    return out if out is not None else torch.zeros((0, len(saes), 0))


def sentiment_deltas(pos_NLF, neu_NLF, neg_NLF) -> tuple["torch.Tensor", "torch.Tensor"]:
    """(Delta+, Delta-) per triple: the per-layer Euclidean distances to the neutral codes, summed over layers;
    Delta- negated (paper 4.3)."""
    plus = (pos_NLF - neu_NLF).norm(dim=-1).sum(dim=-1)
    minus = -(neg_NLF - neu_NLF).norm(dim=-1).sum(dim=-1)
    return plus, minus


# ---------------------------------------------------------------------------------------------------------------
# The shards


def write_shard(directory: Path, index: int, x, y, triple, sign) -> dict:
    """One shard `shard-NNNNN.safetensors` (x float32 [rows, features], y float32, triple and sign int64)."""
    from safetensors.torch import save_file

    name = f"shard-{index:05d}.safetensors"
    with atomic_path(directory / name) as tmp:
        save_file({"x": x.float().contiguous(), "y": y.float().contiguous(), "triple": triple.long().contiguous(),
                   "sign": sign.long().contiguous()}, str(tmp))
    return {"file": name, "rows": int(x.shape[0]), "sha256": sha256_file(directory / name)}


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
    """The deltas manifest, refusing an unfinished one."""
    directory = Path(directory)
    m = read_json(directory / MANIFEST) if (directory / MANIFEST).exists() else None
    if not m or not m.get("complete"):
        raise UserError(f"no complete deltas in {directory}; run `python -m irm deltas` first")
    return m


def verify(directory: str | Path, manifest: dict) -> None:
    for shard in manifest["shards"]:
        path = Path(directory) / shard["file"]
        if not path.is_file() or sha256_file(path) != shard["sha256"]:
            raise UserError(f"deltas shard {path} is missing or corrupt (checksum mismatch); rerun "
                            "`python -m irm deltas`")


def run(cfg: RunConfig) -> dict:
    from irm.divergence import chosen_layers
    from irm.models import load_tuned, n_layers
    from irm.runtime import progress, resolve_device, seed_all
    from irm.stages import mark_done, stage_fingerprint
    from irm.triples import VARIANTS, read_triples

    seed_all(cfg.seed)
    device = resolve_device(cfg.device)
    root = RunDir(cfg.run_dir)
    out_dir = root.path(DELTAS_DIR)
    triples = read_triples(cfg.run_dir)
    model, tokenizer = load_tuned(cfg, device=device)
    layers = chosen_layers(cfg, n_layers(model))
    saes = load_saes(cfg.run_dir, layers, model, cfg.cache.site)
    width = int(next(iter(saes.values())).dictionary.shape[0])  # features of the 1x dictionary
    fp = stage_fingerprint(cfg, "deltas")

    # Resume: shards of an unfinished run with the same fingerprint are kept when their checksums hold.
    old = read_json(out_dir / MANIFEST) if (out_dir / MANIFEST).exists() else {}
    shards = []
    if old.get("fingerprint") == fp and old.get("layers") == layers:
        for shard in old.get("shards", []):
            p = out_dir / shard["file"]
            if not p.is_file() or sha256_file(p) != shard["sha256"]:
                break
            shards.append(shard)
    manifest = {"layers": layers, "site": cfg.cache.site, "width": width, "n_features": len(layers) * width,
                "n_triples": len(triples), "fingerprint": fp, "shards": shards, "complete": False,
                "x": "concatenated 1x-SAE codes at the sentiment token, layer-major (layers x width)",
                "y": "Delta+ (positive rows, sign +1) or Delta- (negative rows, sign -1): sum over layers of the "
                     "Euclidean distance to the neutral variant's codes, negated for negatives",
                "pooling": "mean over the word's tokens when it has several"}
    done = sum(s["rows"] for s in shards) // 2
    chunks = [range(i, min(i + SHARD_TRIPLES, len(triples))) for i in range(done, len(triples), SHARD_TRIPLES)]
    for chunk in progress(chunks, desc="deltas: shards", unit="shard"):
        codes = {}
        for variant in VARIANTS:
            items = [(triples[i]["ids"][variant], triples[i]["positions"][variant]) for i in chunk]
            codes[variant] = codes_at(model, saes, items, tokenizer.pad_token_id, cfg.cache.batch_size,
                                      cfg.cache.site, desc=f"deltas: {variant}")
        rows = rows_of([triples[i]["id"] for i in chunk], codes["positive"], codes["neutral"], codes["negative"])
        manifest["shards"].append(write_shard(out_dir, len(manifest["shards"]), **rows))
        manifest["rows"] = sum(s["rows"] for s in manifest["shards"])
        write_json(out_dir / MANIFEST, manifest)

    manifest["rows"] = sum(s["rows"] for s in manifest["shards"])
    manifest["complete"] = True
    write_json(out_dir / MANIFEST, manifest)
    mark_done(cfg, "deltas", [DELTAS_DIR], rows=manifest["rows"])
    summary = {"rows": manifest["rows"], "n_triples": len(triples), "layers": layers, "n_features":
               manifest["n_features"], "shards": len(manifest["shards"])}
    print(f"deltas: {summary['rows']} rows from {len(triples)} triples, {summary['n_features']} features "
          f"(layers {layers} x {width}), {summary['shards']} shards in {out_dir}")
    return summary
