"""SAE training throughput (activations/s) of irm against a plain PyTorch loop, SAELens and dictionary_learning.

The same ReLU + L1 sparse autoencoder (d_hidden = 2 x d_in, Adam lr 1e-3, L1 coefficient 1e-3) is trained on the
same float32 activations, written first as an irm activation cache:

- irm: `SAEModule` under the Lightning `Trainer` that `python -m irm sae` builds (TensorBoard logger, periodic
  checkpoints), reading the cache through `ActivationDataModule` (shard loads, shuffling and all); tied weights;
- plain: the same maths as a hand-written PyTorch loop over in-memory batches (tied weights, fused Adam as irm);
- saelens: `sae_lens.SAETrainer.fit` on a `StandardTrainingSAE` fed the in-memory batches (its standard SAE is
  untied, and its step adds gradient clipping and firing statistics: what a SAELens user gets);
- dictionary_learning: `StandardTrainer.update` on in-memory batches (untied, decoder norm constraint each step).

Each repetition times a fixed number of training steps after a few warm-up steps (data writing, model building
and Trainer setup are not timed); libraries run interleaved, in a rotating order, and the GEMM rate is measured
in every round, because these machines are shared and noisy: read the ratios, not the absolute numbers.
Roofline: a step costs 10 x batch x d_in x d_hidden FLOPs (forward 2 GEMMs, backward 3), so at the measured
GEMM rate the ceiling is gemm_flops / (10 x d_in x d_hidden) activations/s.

    python benchmarks/sae_throughput.py --json benchmarks/results/sae_throughput.json [--profile]
"""

from __future__ import annotations

import _common  # noqa: F401, I001  (first: it sets TQDM_DISABLE, which tqdm reads when torch imports it)

import math
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

import torch
import torch.nn.functional as F

from _common import (base_parser, environment, gemm_gflops, median, parse_args, quiet_lightning, ratio_median,
                     table, warm_up_cpu, write_json)

LIBS = ("irm", "plain", "saelens", "dictionary_learning")
EXPANSION = 2  # d_hidden = 2 x d_in
LEARNING_RATE = 1.0e-3  # paper appendix D
L1_COEFFICIENT = 1.0e-3  # paper appendix D
FLOPS_PER_ACT = 10  # x d_in x d_hidden: forward x W^T and f W; backward dL/df, dL/dW (decoder), dL/dW (encoder)
DEVICE = "cpu"  # --device; on CUDA every contender trains there (irm through Lightning's "gpu" accelerator)


def sync() -> None:
    """Wait for the device's queued work: a timestamp on CUDA means nothing before it."""
    if DEVICE.startswith("cuda"):
        torch.cuda.synchronize()


def device_gemm_gflops(n: int = 1024, repeats: int = 5) -> float:
    """The fp32 GEMM rate where the SAEs train: the CPU's (_common.gemm_gflops) or, on CUDA, an n=8192 product
    in true fp32 (TF32 off, PyTorch's default for matmul)."""
    if not DEVICE.startswith("cuda"):
        return gemm_gflops(n, repeats)
    n = 8192
    a, b = torch.randn(n, n, device=DEVICE), torch.randn(n, n, device=DEVICE)
    out = torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        torch.mm(a, b, out=out)
        sync()
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n**3 / best / 1e9


def steps_for(batch: int, quick: bool) -> tuple[int, int]:
    """(warm-up steps, timed steps): about 12k timed activations per repetition (a second or two at batch 4096
    on 2 cores), at least 10 steps; warm-up a tenth of that, at least 2 (allocator, Adam state, BLAS packing)."""
    timed = 3 if quick else max(10, 12288 // batch)
    if DEVICE.startswith("cuda") and not quick:  # a GPU step takes microseconds: time enough of them to see it
        timed = min(2000, max(200, 2**20 // batch))
    return (1 if quick else max(2, timed // 10)), timed


# ---------------------------------------------------------------------------------------------- the shared data


def write_cache(layer_dir: Path, d_in: int, rows: int, seed: int = 0, shard_rows: int = 8192) -> None:
    """An irm activation cache of `rows` synthetic activations that look like MLP outputs: sparse non-negative
    combinations of 4 x d_in random unit directions plus a little noise. Shards are small, so shard loading
    happens inside the timed steps about as often per row as in a real run."""
    from irm.activations import ShardWriter

    g = torch.Generator().manual_seed(seed)
    directions_FD = F.normalize(torch.randn(4 * d_in, d_in, generator=g), dim=1)
    writer = ShardWriter(layer_dir, width=d_in, dtype="float32", shard_rows=shard_rows)
    doc_len = 64  # rows of one "document": positions 0..63, as the cache stage writes them
    for start in range(0, rows, 4096):
        n = min(4096, rows - start)
        codes_RF = torch.relu(torch.randn(n, directions_FD.shape[0], generator=g) - 2.0)  # ~2% of features on
        acts_RD = codes_RF @ directions_FD + 0.05 * torch.randn(n, d_in, generator=g)
        row = torch.arange(start, start + n)
        writer.add(acts_RD, torch.zeros(n, dtype=torch.int64), row // doc_len, row % doc_len)
    writer.close(model="synthetic", layer=0, site="mlp_out", corpus_fingerprint=f"synthetic-{seed}")


def in_memory_batches(acts_RD: torch.Tensor, batch: int, n: int) -> Iterator[torch.Tensor]:
    """The peers' data: `n` consecutive slices of the activations already in memory (no copies)."""
    return (acts_RD[i * batch:(i + 1) * batch] for i in range(n))


# ---------------------------------------------------------------------------------------------- one timed run each


class _Stopwatch:
    """Seconds from the request of batch `warmup` (the first timed one) to `stop()`."""

    def __init__(self, warmup: int):
        self.warmup, self.t0, self.t1 = warmup, None, None

    def wrap(self, batches: Iterator[torch.Tensor]) -> Iterator[torch.Tensor]:
        for i, x in enumerate(batches):
            if i == self.warmup:
                sync()
                self.t0 = time.perf_counter()
            yield x

    def stop(self) -> float:
        sync()
        self.t1 = time.perf_counter()
        return self.t1 - self.t0


def run_irm(layer_dir: Path, batch: int, d_in: int, warmup: int, steps: int, work: Path,
            batches_per_item: int = 1, profile: bool = False) -> tuple[float, int]:
    """(seconds, optimizer steps) of the timed span. The Trainer is the one `python -m irm sae` builds (TensorBoard
    logger, ModelCheckpoint at the configured interval), minus the export at the end of the fit. `profile` prints
    Lightning's SimpleProfiler table (time per hook) to stderr."""
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import TensorBoardLogger
    from lightning.pytorch.profilers import SimpleProfiler

    from irm.activations import ActivationDataModule
    from irm.config import SAEConfig
    from irm.sae import SAEModule

    quiet_lightning()

    class Clock(L.Callback):
        # Stamps at the ends of loader items, counted in optimizer steps (an item may hold several batches): the
        # timed span holds data fetches and steps with every Lightning hook, as _Stopwatch's does for the others.
        def __init__(self):
            self.t0 = self.t1 = self.s0 = self.s1 = None

        def on_train_batch_end(self, trainer, *_):
            sync()
            now, step = time.perf_counter(), trainer.global_step
            if self.t0 is None and step >= warmup:
                self.t0, self.s0 = now, step
            self.t1, self.s1 = now, step

    sae = SAEConfig(expansions=[EXPANSION], l1_coefficient=L1_COEFFICIENT, learning_rate=LEARNING_RATE, tied=True,
                    batch_size=batch, val_fraction=0.0, batches_per_item=batches_per_item)
    shutil.rmtree(work, ignore_errors=True)  # the previous repetition's checkpoints and logs
    torch.manual_seed(0)
    clock = Clock()
    data = ActivationDataModule(str(layer_dir), sae, seed=0)
    module = SAEModule(sae, d_in=d_in)
    every = math.ceil(sae.checkpoint_every / batches_per_item) * batches_per_item  # as the stage rounds it
    checkpoints = ModelCheckpoint(dirpath=str(work / "checkpoints"), save_last=True, every_n_train_steps=every)
    profiler = SimpleProfiler() if profile else None
    trainer = L.Trainer(accelerator="gpu" if DEVICE.startswith("cuda") else "cpu", devices=1, max_steps=warmup + steps,
                        logger=TensorBoardLogger(work / "logs"),
                        callbacks=[checkpoints, clock], enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, profiler=profiler, default_root_dir=str(work))
    trainer.fit(module, datamodule=data)
    if profiler is not None:
        print(profiler.summary(), file=sys.stderr)
    return clock.t1 - clock.t0, clock.s1 - clock.s0


def plain_loss(x_BD: torch.Tensor, w_FD: torch.Tensor, b_enc: torch.Tensor, b_dec: torch.Tensor) -> torch.Tensor:
    """The tied SAE's loss written out: f = ReLU(x W^T + b_enc), x_hat = f W + b_dec, MSE + alpha * mean row L1(f)."""
    f_BF = torch.relu(F.linear(x_BD, w_FD, b_enc))
    x_hat_BD = F.linear(f_BF, w_FD.t(), b_dec)
    return F.mse_loss(x_hat_BD, x_BD) + L1_COEFFICIENT * f_BF.sum() / x_BD.shape[0]


def run_plain(batches: Iterator[torch.Tensor], d_in: int, warmup: int, steps: int) -> float:
    d_hidden = EXPANSION * d_in
    torch.manual_seed(0)
    w_FD = torch.nn.Parameter(F.normalize(torch.randn(d_hidden, d_in), dim=1).to(DEVICE))
    b_enc = torch.nn.Parameter(torch.zeros(d_hidden, device=DEVICE))
    b_dec = torch.nn.Parameter(torch.zeros(d_in, device=DEVICE))
    # Fused Adam, as irm's SAEModule configures it: irm / plain then measures what Lightning and the DataModule add.
    # (PyTorch's default, unfused Adam costs about 2 ms more a step at d_in 576 on one core: a third of a batch-32
    # step.)
    opt = torch.optim.Adam([w_FD, b_enc, b_dec], lr=LEARNING_RATE, fused=True)
    watch = _Stopwatch(warmup)
    for x_BD in watch.wrap(batches):
        loss = plain_loss(x_BD, w_FD, b_enc, b_dec)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return watch.stop()


def run_saelens(batches: Iterator[torch.Tensor], batch: int, d_in: int, warmup: int, steps: int) -> float:
    from sae_lens import SAETrainer, StandardTrainingSAE, StandardTrainingSAEConfig
    from sae_lens.config import LoggingConfig, SAETrainerConfig

    torch.manual_seed(0)
    sae = StandardTrainingSAE(StandardTrainingSAEConfig(d_in=d_in, d_sae=EXPANSION * d_in,
                                                        l1_coefficient=L1_COEFFICIENT, dtype="float32", device=DEVICE))
    cfg = SAETrainerConfig(total_training_samples=(warmup + steps) * batch, train_batch_size_samples=batch,
                           lr=LEARNING_RATE, lr_end=LEARNING_RATE / 10, device=DEVICE,
                           logger=LoggingConfig(log_to_wandb=False))
    watch = _Stopwatch(warmup)
    SAETrainer(cfg=cfg, sae=sae, data_provider=watch.wrap(batches)).fit()
    return watch.stop()


def run_dictionary_learning(batches: Iterator[torch.Tensor], d_in: int, warmup: int, steps: int) -> float:
    from dictionary_learning.trainers.standard import StandardTrainer

    trainer = StandardTrainer(steps=warmup + steps, activation_dim=d_in, dict_size=EXPANSION * d_in, layer=0,
                              lm_name="synthetic", lr=LEARNING_RATE, l1_penalty=L1_COEFFICIENT, warmup_steps=0,
                              sparsity_warmup_steps=None, seed=0, device=DEVICE, wandb_name=None)
    watch = _Stopwatch(warmup)
    for step, x_BD in enumerate(watch.wrap(batches)):
        trainer.update(step, x_BD)
    return watch.stop()


# ---------------------------------------------------------------------------------------------- the experiment


def main(argv: list[str] | None = None) -> dict:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--batches", type=int, nargs="+", default=[32, 4096], help="batch sizes (paper: 32)")
    p.add_argument("--d-in", type=int, nargs="+", default=[576, 512],
                   help="activation widths (576: SmolLM2-135M, 512: Pythia-70m)")
    p.add_argument("--reps", type=int, default=5, help="interleaved repetitions per setting (medians reported)")
    p.add_argument("--libs", nargs="+", choices=LIBS, default=list(LIBS))
    p.add_argument("--batches-per-item", type=int, default=None,
                   help="irm's sae.batches_per_item (optimizer steps per Lightning batch; default: the config's)")
    p.add_argument("--profile", action="store_true",
                   help="after the measurements, one irm run per setting under Lightning's SimpleProfiler")
    p.add_argument("--workdir", type=Path, default=None, help="where the caches go (default: a temporary folder)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda: where every contender trains")
    args = parse_args(p, argv)
    global DEVICE
    DEVICE = args.device
    if args.batches_per_item is None:
        from irm.config import SAEConfig

        args.batches_per_item = SAEConfig().batches_per_item
    if args.quick:
        args.batches, args.d_in, args.reps = [8, 64], [32], 1

    with tempfile.TemporaryDirectory(prefix="irm-bench-") as tmp:
        work = args.workdir or Path(tmp)
        caches, acts = {}, {}
        for d_in in args.d_in:
            rows = max(sum(steps_for(b, args.quick)) * b for b in args.batches)
            caches[d_in] = work / f"d{d_in}" / "cache" / "layer-00"
            write_cache(caches[d_in], d_in, rows)
            from irm.activations import ActivationCache

            acts[d_in] = ActivationCache(caches[d_in]).read_range(0, rows, ("acts",))["acts"].to(DEVICE)

        if DEVICE.startswith("cuda"):
            device_gemm_gflops()  # warm-up: clocks, cuBLAS handles
        else:
            warm_up_cpu(0.2 if args.quick else 3.0)
        gemm: list[float] = []
        runs: dict[tuple[int, int], dict[str, list[float]]] = {}
        for d_in in args.d_in:
            for batch in args.batches:
                warmup, steps = steps_for(batch, args.quick)
                runs[d_in, batch] = per_lib = {lib: [] for lib in args.libs}
                for rep in range(args.reps):
                    gemm.append(device_gemm_gflops())
                    order = args.libs[rep % len(args.libs):] + args.libs[:rep % len(args.libs)]
                    for lib in order:
                        feed = in_memory_batches(acts[d_in], batch, warmup + steps)
                        timed = steps
                        if lib == "irm":
                            seconds, timed = run_irm(caches[d_in], batch, d_in, warmup, steps, work / "irm",
                                                     args.batches_per_item)
                        elif lib == "plain":
                            seconds = run_plain(feed, d_in, warmup, steps)
                        elif lib == "saelens":
                            seconds = run_saelens(feed, batch, d_in, warmup, steps)
                        else:
                            seconds = run_dictionary_learning(feed, d_in, warmup, steps)
                        per_lib[lib].append(timed * batch / seconds)
                    print(f"d_in {d_in} batch {batch} rep {rep + 1}/{args.reps}: " + ", ".join(
                        f"{lib} {per_lib[lib][-1]:,.0f}" for lib in args.libs) + " acts/s", file=sys.stderr)

        if args.profile and "irm" in args.libs:
            for (d_in, batch) in runs:
                warmup, steps = steps_for(batch, args.quick)
                print(f"\n== Lightning SimpleProfiler, irm, d_in {d_in}, batch {batch} ==", file=sys.stderr)
                run_irm(caches[d_in], batch, d_in, warmup, steps, work / "irm", args.batches_per_item, profile=True)

    gflops = median(gemm)
    record = {
        "gemm_gflops": gflops,
        "results": [{"lib": lib, "batch": batch, "d_in": d_in, "d_hidden": EXPANSION * d_in,
                     "acts_per_s": median(values), "acts_per_s_reps": values}
                    for (d_in, batch), per_lib in runs.items() for lib, values in per_lib.items()],
        "gemm_gflops_reps": gemm,
        "settings": {"reps": args.reps, "batches_per_item": args.batches_per_item,
                     "steps": {b: steps_for(b, args.quick) for b in args.batches},
                     "expansion": EXPANSION, "learning_rate": LEARNING_RATE, "l1_coefficient": L1_COEFFICIENT,
                     "device": DEVICE, **({"gpu": torch.cuda.get_device_name()} if DEVICE.startswith("cuda") else {}),
                     **environment()},
    }
    write_json(args.json, record)
    print(report(runs, gflops))
    return record


def report(runs: dict[tuple[int, int], dict[str, list[float]]], gflops: float) -> str:
    """Throughputs (medians) and irm's ratios to each peer (medians of per-repetition ratios) and to the roofline."""
    libs = list(next(iter(runs.values())))
    peers = [lib for lib in libs if lib != "irm"]
    headers = ["d_in", "batch", *(f"{lib} acts/s" for lib in libs)]
    if "irm" in libs:
        headers += [f"irm / {lib}" for lib in peers] + ["irm / roofline"]
    rows = []
    for (d_in, batch), per_lib in runs.items():
        row = [d_in, batch, *(round(median(per_lib[lib])) for lib in libs)]
        if "irm" in libs:
            roofline = gflops * 1e9 / (FLOPS_PER_ACT * d_in * EXPANSION * d_in)
            row += [ratio_median(per_lib["irm"], per_lib[lib]) for lib in peers]
            row += [median(per_lib["irm"]) / roofline]
        rows.append(row)
    return f"fp32 GEMM {gflops:.0f} GFLOP/s (median of rounds)\n" + table(headers, rows)


if __name__ == "__main__":
    main()
