"""Activation cache throughput: tokens/s of the cache stage's loop (`irm.activations.collect.cache_activations`:
tokenise, forward with capture hooks, drop padding, check values, write shards, then the manifest with checksums)
against the same model's bare forward over the same batches (the same tokenizer call, then `model(...)` with no
hooks and nothing kept), interleaved; plus the cache's bytes on disk against rows x width x element size.

Models: the tiny GPT-NeoX of configs/tiny.yaml and the embedded SmolLM2-135M of configs/quickstart.yaml, with those
configs' cache settings (max_length, batch_size, dtype, number of layers). Loading the model is not timed.

    python benchmarks/cache_throughput.py --json benchmarks/results/cache_throughput.json
"""

from __future__ import annotations

import _common  # noqa: F401, I001  (first: it sets TQDM_DISABLE, which tqdm reads when torch imports it)

import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from _common import ROOT, base_parser, environment, median, parse_args, ratio_median, table, write_json

CONFIGS = {"tiny": ROOT / "configs" / "tiny.yaml", "smollm2": ROOT / "configs" / "quickstart.yaml"}
DOCUMENTS = {"tiny": 2000, "smollm2": 96}  # per repetition: a few seconds of forward passes on 2 cores


def bare_forward(model, tokenizer, texts: list[str], batch_size: int, max_length: int) -> None:
    """The forward passes the cache needs and nothing else: same batches, same positions, no hooks, no copies."""
    with torch.inference_mode():
        for start in range(0, len(texts), batch_size):
            enc = tokenizer(texts[start:start + batch_size], padding=True, truncation=True, max_length=max_length,
                            return_tensors="pt")
            pos_BS = (enc["attention_mask"].cumsum(-1) - 1).clamp_min(0)
            model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], position_ids=pos_BS,
                  use_cache=False)


def write_cache(model, tokenizer, texts: list[str], layers: list[int], out: Path, c) -> dict[int, dict]:
    """The cache stage's loop into fresh shard writers under `out`; returns each layer's manifest."""
    from irm.activations import ShardWriter
    from irm.activations.collect import cache_activations
    from irm.models import site_width

    shutil.rmtree(out, ignore_errors=True)
    width = site_width(model, c.site)
    writers = {layer: ShardWriter(out / f"layer-{layer:02d}", width, c.dtype, c.shard_rows) for layer in layers}
    cache_activations(model, tokenizer, texts, writers, site=c.site, batch_size=c.batch_size,
                      max_length=c.max_length, storage_dtype=c.dtype)
    return {layer: writer.close(layer=layer) for layer, writer in writers.items()}


def disk_usage(out: Path, manifests: dict[int, dict]) -> dict[str, int]:
    """Bytes on disk of the cache (shards + manifests) against the raw activations, rows x width x element size."""
    from irm.activations.store import DTYPES

    raw = sum(m["rows"] * m["width"] * DTYPES[m["dtype"]].itemsize for m in manifests.values())
    files = [p for p in out.rglob("*") if p.is_file()]
    shards = sum(p.stat().st_size for p in files if p.suffix == ".safetensors")
    return {"raw_bytes": raw, "disk_bytes": sum(p.stat().st_size for p in files), "shard_bytes": shards,
            # token_ids, doc_ids, positions: one int64 each per row
            "index_bytes": sum(m["rows"] * 3 * 8 for m in manifests.values())}


def measure(name: str, reps: int, n_docs: int, work: Path) -> dict:
    from irm.cli import parse_config
    from irm.data import load_texts
    from irm.models import load_model, n_layers

    cfg = parse_config("cache", ["--config", str(CONFIGS[name]), "--run_dir", str(work / "run")])
    c = cfg.cache
    model, tokenizer = load_model(cfg.model, seed=cfg.seed, device="cpu")
    # The stage caches the divergence stage's top-k layers; which ones does not change the cost, how many does.
    k = len(c.layers) if c.layers else cfg.divergence.top_k
    layers = list(range(n_layers(model) - k, n_layers(model)))
    texts = load_texts(cfg.corpus, cfg.corpus.split, cfg.seed, n=n_docs)
    out = work / name / "cache"
    manifests = write_cache(model, tokenizer, texts[:c.batch_size], layers, out, c)  # warm-up: allocator, kernels
    bare_forward(model, tokenizer, texts[:c.batch_size], c.batch_size, c.max_length)
    seconds = {"cache": [], "bare": []}
    for rep in range(reps):
        for what in (("cache", "bare") if rep % 2 == 0 else ("bare", "cache")):
            t0 = time.perf_counter()
            if what == "cache":
                manifests = write_cache(model, tokenizer, texts, layers, out, c)
            else:
                bare_forward(model, tokenizer, texts, c.batch_size, c.max_length)
            seconds[what].append(time.perf_counter() - t0)
        print(f"{name} rep {rep + 1}/{reps}: cache {seconds['cache'][-1]:.2f} s, bare forward "
              f"{seconds['bare'][-1]:.2f} s", file=sys.stderr)
    tokens = next(iter(manifests.values()))["rows"]  # non-padding tokens, the same for every layer
    disk = disk_usage(out, manifests)
    return {
        "model": name, "model_name": cfg.model.name, "layers": layers, "width": manifests[layers[0]]["width"],
        "dtype": c.dtype, "documents": len(texts), "tokens": tokens, "batch_size": c.batch_size,
        "max_length": c.max_length,
        "cache_tokens_per_s": median([tokens / s for s in seconds["cache"]]),
        "bare_tokens_per_s": median([tokens / s for s in seconds["bare"]]),
        "cache_over_bare": ratio_median([1 / s for s in seconds["cache"]], [1 / s for s in seconds["bare"]]),
        "seconds": seconds, **disk, "disk_over_raw": disk["disk_bytes"] / disk["raw_bytes"],
    }


def main(argv: list[str] | None = None) -> dict:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", choices=list(CONFIGS), default=list(CONFIGS))
    p.add_argument("--reps", type=int, default=3, help="interleaved repetitions (medians reported)")
    p.add_argument("--documents", type=int, default=None, help="documents per repetition (default: per model)")
    args = parse_args(p, argv)
    if args.quick:
        args.models, args.reps, args.documents = ["tiny"], 1, 32
    with tempfile.TemporaryDirectory(prefix="irm-cache-bench-") as tmp:
        results = [measure(m, args.reps, args.documents or DOCUMENTS[m], Path(tmp)) for m in args.models]
    record = {"results": results, "settings": {"reps": args.reps, **environment()}}
    write_json(args.json, record)
    print(report(results))
    return record


def report(results: list[dict]) -> str:
    headers = ["model", "layers x width", "tokens", "cache tok/s", "bare tok/s", "cache / bare", "disk MiB",
               "raw MiB", "disk / raw"]
    rows = [[r["model"], f"{len(r['layers'])} x {r['width']}", r["tokens"], round(r["cache_tokens_per_s"]),
             round(r["bare_tokens_per_s"]), r["cache_over_bare"], f"{r['disk_bytes'] / 2**20:.2f}",
             f"{r['raw_bytes'] / 2**20:.2f}", f"{r['disk_over_raw']:.3f}"] for r in results]
    return table(headers, rows)


if __name__ == "__main__":
    main()
