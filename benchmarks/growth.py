"""Cost as the work grows (issue 17.5): each measurement in its own process, so its peak memory is its own.

- corpus: the cache stage's loop (`irm.activations.collect.cache_activations`, the tiny config's model, site, layers,
  max_length and batch size) over 1k, 8k and 32k generated documents: seconds (should grow linearly) and the
  process's peak RSS (should stay flat: one batch and one shard in memory at a time).
- sae: one SAE epoch (irm's SAEModule under a Lightning Trainer reading the cache through ActivationDataModule,
  batch 4096, d_in 576 as SmolLM2, 2x width) over synthetic caches of growing size, read cold: after writing, every
  shard's pages are dropped from the page cache (fsync, then posix_fadvise DONTNEED, which Linux honours for clean
  pages), so the epoch reads them from disk as it would a cache larger than the page cache. Reported: epoch seconds,
  peak RSS against the cache's size (a full load would show RSS above the cache size), MB/s of cache read.
- model: `python -m irm rlhf` on the tiny GPT-NeoX (4 x 64), a wider tiny GPT-NeoX (8 x 256) and SmolLM2-135M
  (quickstart config: LoRA rank 16; "SmolLM2-135M full": the same with rlhf.lora_rank 0), each run for 1 and
  for 3 PPO steps (every run writes one full-state checkpoint at its last step): step seconds = (train time of 3 steps - train time of 1) / 2, checkpoint seconds ~ the 1-step run's train
  time minus one step, checkpoint size = bytes of that checkpoint folder.

- quickstart (issue 25.4): the quickstart's own model and settings (configs/quickstart.yaml: SmolLM2-135M, its cache
  site, max_length and batch size, its TopK SAE section) at 1x, 2x, 4x ... its `cache.n_documents` (`--multiples`):
  the cache loop over one of its layers (the model's forward dominates; the other layers add only their rows), then
  one epoch of the sae stage's SAEModule pair (1x and 2x) on that cache, each in the same fresh process: seconds
  and peak RSS (should stay flat) against the documents.
- calibration (issue 25.4): the calibrate stage's harness at a finished run's sizes (`--run`, e.g.
  runs/quickstart) for 2, 4, 8 ... worlds (`--worlds`): seconds against worlds (should be linear).

    python benchmarks/growth.py --threads 2 --json benchmarks/results/growth.json [--parts corpus sae model]
    python benchmarks/growth.py --threads 2 --parts quickstart calibration --run runs/quickstart \\
        --json benchmarks/results/growth_quickstart.json
"""

from __future__ import annotations

import _common  # noqa: F401, I001  (first: it sets TQDM_DISABLE, inherited by the child processes)

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import ROOT, base_parser, environment, parse_args, table, write_json

CORPUS_SIZES = (1000, 8000, 32000)
SAE_ROWS = (131072, 262144, 524288)  # x 576 x 4 bytes: 0.3, 0.6, 1.2 GB
SAE_D_IN = 576
MODELS = {
    "tiny 4x64": (ROOT / "configs" / "tiny.yaml", []),
    "tiny 8x256": (ROOT / "configs" / "tiny.yaml", ["--model.tiny_layers", "8", "--model.tiny_d_model", "256"]),
    "SmolLM2-135M": (ROOT / "configs" / "quickstart.yaml", []),  # as configured: LoRA rank 16, head-only critic
    "SmolLM2-135M full": (ROOT / "configs" / "quickstart.yaml", ["--rlhf.lora_rank", "0"]),  # the paper's full PPO
}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kilobytes


def child(kind: str, size: int, work: Path) -> dict:
    """One measurement (run in a fresh process by `spawn`)."""
    import torch

    if kind == "corpus":
        from irm.activations import ShardWriter
        from irm.activations.collect import cache_activations
        from irm.cli import parse_config
        from irm.data import load_texts
        from irm.models import load_model, n_layers, site_width

        cfg = parse_config("cache", ["--config", str(ROOT / "configs" / "tiny.yaml"), "--run_dir", str(work)])
        cfg.corpus.n_documents = size
        c = cfg.cache
        model, tokenizer = load_model(cfg.model, seed=cfg.seed, device="cpu")
        t0 = time.perf_counter()
        texts = load_texts(cfg.corpus, cfg.corpus.split, cfg.seed, n=size)
        t_texts = time.perf_counter() - t0
        k = cfg.divergence.top_k
        layers = list(range(n_layers(model) - k, n_layers(model)))
        width = site_width(model, c.site)
        writers = {layer: ShardWriter(work / f"layer-{layer:02d}", width, c.dtype, c.shard_rows) for layer in layers}
        t0 = time.perf_counter()
        cache_activations(model, tokenizer, texts, writers, site=c.site, batch_size=c.batch_size,
                          max_length=c.max_length, storage_dtype=c.dtype)
        manifests = {layer: w.close(layer=layer) for layer, w in writers.items()}
        seconds = time.perf_counter() - t0
        rows = sum(m["rows"] for m in manifests.values())
        disk = sum(p.stat().st_size for p in work.rglob("*.safetensors"))
        return {"documents": len(texts), "rows": rows, "seconds": seconds, "text_seconds": t_texts,
                "peak_rss_mb": peak_rss_mb(), "cache_mb": disk / 1e6}

    if kind == "sae":
        import lightning as L

        from irm.activations import ActivationDataModule, ShardWriter
        from irm.config import SAEConfig
        from irm.sae import SAEModule

        layer_dir = work / "layer-00"
        writer = ShardWriter(layer_dir, width=SAE_D_IN, dtype="float32", shard_rows=65536)
        g = torch.Generator().manual_seed(0)
        for start in range(0, size, 8192):
            n = min(8192, size - start)
            row = torch.arange(start, start + n)
            writer.add(torch.relu(torch.randn(n, SAE_D_IN, generator=g)), torch.zeros(n, dtype=torch.int64),
                       row // 64, row % 64)
        writer.close(model="synthetic", layer=0, site="mlp_out", corpus_fingerprint="synthetic")
        shards = sorted(layer_dir.glob("*.safetensors"))
        for path in shards:  # drop the cache's pages: the epoch reads from disk
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
        resident = _resident_mb(shards)  # what of the cache is still in the page cache (fincore), ~0 after the drop
        rss_before = peak_rss_mb()
        torch.manual_seed(0)
        data = ActivationDataModule(str(layer_dir), SAEConfig(batch_size=4096, val_fraction=0.0), seed=0)
        module = SAEModule(SAEConfig(expansions=[2], l1_coefficient=1e-3, learning_rate=1e-3, tied=True), d_in=SAE_D_IN)
        trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                            default_root_dir=str(work))
        t0 = time.perf_counter()
        trainer.fit(module, datamodule=data)
        seconds = time.perf_counter() - t0
        cache_mb = sum(p.stat().st_size for p in shards) / 1e6
        return {"rows": size, "cache_mb": cache_mb, "epoch_seconds": seconds, "read_mb_per_s": cache_mb / seconds,
                "peak_rss_mb": peak_rss_mb(), "peak_rss_mb_before_fit": rss_before,
                "page_cache_mb_before_epoch": resident}
    if kind == "quickstart":
        return _quickstart_child(size, work)
    raise ValueError(kind)


QUICKSTART = ROOT / "configs" / "quickstart.yaml"
QUICKSTART_LAYER = 17  # one of the quickstart's three chosen layers (its divergence picks 17, 18, 29)


def _quickstart_child(multiple: int, work: Path) -> dict:
    """`multiple` x the quickstart's documents through the cache loop (one layer) and one SAE epoch on that cache."""
    import lightning as L
    import torch

    from irm.activations import ActivationDataModule, ShardWriter
    from irm.activations.collect import cache_activations
    from irm.cli import parse_config
    from irm.data import load_texts
    from irm.models import load_model, site_width
    from irm.sae import SAEModule

    cfg = parse_config("cache", ["--config", str(QUICKSTART), "--run_dir", str(work)])
    c = cfg.cache
    n = multiple * c.n_documents
    model, tokenizer = load_model(cfg.model, seed=cfg.seed, device="cpu")
    texts = load_texts(cfg.corpus, cfg.corpus.split, cfg.seed, n=n)
    layer_dir = work / f"layer-{QUICKSTART_LAYER:02d}"
    writer = ShardWriter(layer_dir, site_width(model, c.site), c.dtype, c.shard_rows)
    t0 = time.perf_counter()
    cache_activations(model, tokenizer, texts, {QUICKSTART_LAYER: writer}, site=c.site, batch_size=c.batch_size,
                      max_length=c.max_length, storage_dtype=c.dtype)
    manifest = writer.close(layer=QUICKSTART_LAYER, model=cfg.model.name, site=c.site, corpus_fingerprint="growth")
    cache_seconds = time.perf_counter() - t0
    rss_cache = peak_rss_mb()
    del model
    torch.manual_seed(cfg.seed)
    data = ActivationDataModule(str(layer_dir), cfg.sae, seed=cfg.seed)
    data.setup("fit")
    module = SAEModule(cfg.sae, d_in=data.width)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=0, default_root_dir=str(work))
    t0 = time.perf_counter()
    trainer.fit(module, datamodule=data)
    sae_seconds = time.perf_counter() - t0
    cache_mb = sum(p.stat().st_size for p in layer_dir.glob("*.safetensors")) / 1e6
    return {"multiple": multiple, "documents": len(texts), "rows": manifest["rows"], "cache_mb": cache_mb,
            "cache_seconds": cache_seconds, "peak_rss_mb_after_cache": rss_cache, "sae_epoch_seconds": sae_seconds,
            "sae_steps": trainer.global_step, "peak_rss_mb": peak_rss_mb()}


def calibration_cost(run: Path, worlds: list[int], seed: int) -> list[dict]:
    """Seconds of the calibrate stage's harness at the sizes its stage takes for `run` (its run_sizes under its own
    config.yaml's calibrate section), per number of worlds (in this process)."""
    from irm.cli import parse_config
    from irm.stages.calibrate import calibrate, run_sizes, stage_sizes

    sizes = stage_sizes(parse_config("calibrate", ["--config", str(run / "config.yaml")]), run_sizes(run))
    out = []
    for w in worlds:
        t0 = time.perf_counter()
        calibrate(sizes, w, seed)
        out.append({"worlds": w, "seconds": time.perf_counter() - t0, "sizes": sizes})
        print(f"calibration {w} worlds: {out[-1]['seconds']:.1f} s", file=sys.stderr, flush=True)
    return out


def _resident_mb(paths) -> float | None:
    """MB of these files held in the page cache, from util-linux's `fincore` (None where it is missing)."""
    try:
        done = subprocess.run(["fincore", "--bytes", "--noheadings", "--raw", "-o", "RES", *map(str, paths)],
                              capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return sum(int(v) for v in done.stdout.split()) / 1e6


def spawn(kind: str, size: int, work: Path, threads) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, __file__, "--child", kind, str(size), str(work)]
    if threads:
        cmd += ["--threads", str(threads)]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=str(work))
    if done.returncode != 0:
        raise SystemExit(f"{kind} {size} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def rlhf_run(config: Path, extra: list[str], steps: int, work: Path, threads) -> dict:
    from irm.artifacts import RunDir

    run_dir = work / f"run-{steps}"
    cmd = [sys.executable, "-m", "irm", "rlhf", "--config", str(config), "--run_dir", str(run_dir), "--log_dir",
           str(work / "logs"), "--device", "cpu", "--rlhf.steps", str(steps), "--rlhf.checkpoint_every", str(steps),
           "--rlhf.keep_final_checkpoint", "true", *extra] + (["--threads", str(threads)] if threads else [])
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=str(ROOT))
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    per_step = float(RunDir(run_dir).stage_record("rlhf")["seconds_per_step"])
    ckpts = sorted((run_dir / "rlhf" / "checkpoints").glob("step-*"))
    size = sum(p.stat().st_size for p in ckpts[-1].rglob("*") if p.is_file()) if ckpts else 0
    return {"steps": steps, "train_seconds": per_step * steps, "process_seconds": wall, "checkpoint_bytes": size}


def model_growth(name: str, work: Path, threads) -> dict:
    config, extra = MODELS[name]
    one = rlhf_run(config, extra, 1, work / "one", threads)
    three = rlhf_run(config, extra, 3, work / "three", threads)
    step = (three["train_seconds"] - one["train_seconds"]) / 2
    return {"model": name, "step_seconds": step, "checkpoint_seconds": one["train_seconds"] - step,
            "checkpoint_bytes": three["checkpoint_bytes"], "runs": [one, three]}


def main(argv=None) -> dict:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--child":
        kind, size, work = sys.argv[2], int(sys.argv[3]), Path(sys.argv[4])
        if "--threads" in sys.argv:
            from irm.runtime import set_threads

            set_threads(int(sys.argv[sys.argv.index("--threads") + 1]))
        print(json.dumps(child(kind, size, work)))
        return {}
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--parts", nargs="+", choices=("corpus", "sae", "model", "quickstart", "calibration"),
                   default=["corpus", "sae", "model"])
    p.add_argument("--multiples", nargs="+", type=int, default=[1, 4, 16],
                   help="quickstart: multiples of its cache.n_documents")
    p.add_argument("--run", type=Path, default=ROOT / "runs" / "quickstart",
                   help="calibration: a finished run directory whose sizes the worlds take")
    p.add_argument("--worlds", nargs="+", type=int, default=[2, 4, 8, 16], help="calibration: numbers of worlds")
    p.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS)[:3])
    args = parse_args(p, argv)
    corpus_sizes = (200, 400) if args.quick else CORPUS_SIZES
    sae_rows = (8192, 16384) if args.quick else SAE_ROWS
    models = ["tiny 4x64"] if args.quick else args.models
    record = {"environment": environment()}
    with tempfile.TemporaryDirectory(prefix="irm-growth-") as tmp:
        tmp = Path(tmp)
        if "corpus" in args.parts:
            record["corpus"] = []
            for n in corpus_sizes:
                record["corpus"].append(spawn("corpus", n, tmp / f"corpus-{n}", args.threads))
                print(f"corpus {n}: {record['corpus'][-1]}", file=sys.stderr, flush=True)
            base = record["corpus"][0]
            print(table(["documents", "rows cached", "cache MB", "cache s", "s per 1k docs", "peak RSS MB",
                         "time vs 1k", "docs vs 1k"],
                        [[r["documents"], r["rows"], r["cache_mb"], r["seconds"], 1000 * r["seconds"] / r["documents"],
                          r["peak_rss_mb"], r["seconds"] / base["seconds"], r["documents"] / base["documents"]]
                         for r in record["corpus"]]))
        if "sae" in args.parts:
            record["sae"] = []
            for rows in sae_rows:
                record["sae"].append(spawn("sae", rows, tmp / f"sae-{rows}", args.threads))
                print(f"sae {rows}: {record['sae'][-1]}", file=sys.stderr, flush=True)
                # The next size writes its own cache: this one's disk space goes now.
                subprocess.run(["rm", "-rf", str(tmp / f"sae-{rows}")], check=False)
            base = record["sae"][0]
            print(table(["rows", "cache MB", "in page cache MB", "epoch s", "MB/s read", "peak RSS MB", "RSS / cache",
                         "time vs first"],
                        [[r["rows"], r["cache_mb"], r["page_cache_mb_before_epoch"], r["epoch_seconds"],
                          r["read_mb_per_s"], r["peak_rss_mb"],
                          r["peak_rss_mb"] / r["cache_mb"], r["epoch_seconds"] / base["epoch_seconds"]]
                         for r in record["sae"]]))
        if "model" in args.parts:
            record["model"] = []
            for name in models:
                record["model"].append(model_growth(name, tmp / name.replace(" ", "_"), args.threads))
                print(f"model {name}: {record['model'][-1]}", file=sys.stderr, flush=True)
            print(table(["model", "PPO step s", "checkpoint s", "checkpoint MB"],
                        [[r["model"], r["step_seconds"], r["checkpoint_seconds"], r["checkpoint_bytes"] / 1e6]
                         for r in record["model"]]))
        if "quickstart" in args.parts:
            record["quickstart"] = []
            for m in ([1, 2] if args.quick else args.multiples):
                record["quickstart"].append(spawn("quickstart", m, tmp / f"quickstart-{m}", args.threads))
                print(f"quickstart {m}x: {record['quickstart'][-1]}", file=sys.stderr, flush=True)
                subprocess.run(["rm", "-rf", str(tmp / f"quickstart-{m}")], check=False)
            base = record["quickstart"][0]
            print(table(["documents", "x", "rows", "cache MB", "cache s", "cache s / 1x", "SAE epoch s",
                         "SAE s / 1x", "peak RSS MB"],
                        [[r["documents"], r["multiple"], r["rows"], r["cache_mb"], r["cache_seconds"],
                          r["cache_seconds"] / base["cache_seconds"], r["sae_epoch_seconds"],
                          r["sae_epoch_seconds"] / base["sae_epoch_seconds"], r["peak_rss_mb"]]
                         for r in record["quickstart"]]))
    if "calibration" in args.parts:
        record["calibration"] = calibration_cost(args.run, [2, 4] if args.quick else args.worlds, 0)
        base = record["calibration"][0]
        print(table(["worlds", "seconds", "seconds per world", "time vs first", "worlds vs first"],
                    [[r["worlds"], r["seconds"], r["seconds"] / r["worlds"], r["seconds"] / base["seconds"],
                      r["worlds"] / base["worlds"]] for r in record["calibration"]]))
    write_json(args.json, record)
    return record


if __name__ == "__main__":
    main()
