"""Data parallelism for the stages outside Lightning's Trainer and TRL (cache, deltas, lexicon, ablate), on Lightning
Fabric's strategies rather than home-made process management.

Two ways in, one code path:
- `devices: N` in the config (`--devices N` on the command line): this process spawns N workers through Fabric's
  `ddp_spawn` (one GPU each, or N CPU processes talking gloo) and waits for them; it works inside the pipeline.
- an external launcher (`torchrun --nproc_per_node 8 --nnodes 2 ... -m irm cache --config ...`, SLURM through
  torchrun): every process runs the stage and Fabric's `ddp` strategy joins them; `devices` is then ignored.

A stage writes its work as `fn(ranks, cfg, ...)`: it takes its share of the work (`ranks.split`), writes per-rank
output where several processes may write at once, meets the others at `ranks.barrier()` or `ranks.gather(obj)`, and
leaves run-directory bookkeeping (manifests, `mark_done`) to `ranks.is_main`. `launch(cfg, fn, ...)` returns rank 0's
return value to the caller. With one process nothing is spawned and no process group is created."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional, Sequence

from irm.errors import UserError


def launched_externally() -> bool:
    """True when torchrun / accelerate launch / SLURM-through-torchrun started several processes for this stage."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


@dataclass
class Ranks:
    """This process's place among the stage's workers. `rank 0 of 1` when nothing was launched."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: Any = None  # torch.device this rank computes on
    fabric: Any = field(default=None, repr=False)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def split(self, n: int) -> range:
        """This rank's contiguous share of range(n): rank r gets [r*n/W, (r+1)*n/W). Contiguous, so rows written in
        rank order are the single-process order."""
        return range(self.rank * n // self.world_size, (self.rank + 1) * n // self.world_size)

    def barrier(self) -> None:
        if self.world_size > 1:
            self.fabric.barrier()

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's `obj` (picklable), indexed by rank, on every rank."""
        if self.world_size == 1:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank."""
        return obj if self.world_size == 1 else self.fabric.broadcast(obj, src=0)

    def progress(self, iterable: Optional[Iterable] = None, *, desc: str, total: Optional[int] = None,
                 unit: str = "it"):
        """irm.runtime.progress on rank 0; silent elsewhere (one bar per run, not one per process)."""
        from irm.runtime import progress

        return progress(iterable, desc=desc if self.world_size == 1 else f"{desc} [rank 0 of {self.world_size}]",
                        total=total, unit=unit, disable=not self.is_main)


def _accelerator(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        return "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise UserError("device 'cuda' requested but no CUDA GPU is visible; use device: cpu or auto")
        return "cuda"
    raise UserError(f"devices > 1 needs device auto, cpu or cuda (each process takes its own GPU), not {device!r}")


def _worker(fabric, fn: Callable, cfg, threads: Optional[int], args: tuple, kwargs: dict) -> Any:
    import torch

    if fabric.device.type == "cpu" and threads:
        torch.set_num_threads(threads)
    ranks = Ranks(fabric.global_rank, fabric.world_size, fabric.local_rank, fabric.device, fabric)
    result = fn(ranks, cfg, *args, **kwargs)
    # A gloo process group left for interpreter shutdown can abort the process on exit ("terminate called without an
    # active exception"). Only after success: a failing rank that tore its group down would make the ranks waiting
    # for it fail first with "connection reset", hiding the real error.
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    return result


def launch(cfg, fn: Callable, *args: Any, **kwargs: Any) -> Any:
    """Run `fn(ranks, cfg, *args, **kwargs)` on `cfg.devices` processes (or the externally launched ones) and return
    rank 0's result. `fn` must be a module-level function and its arguments picklable (spawned workers import it)."""
    devices = int(getattr(cfg, "devices", 1))
    if devices < 1:
        raise UserError(f"devices must be >= 1, not {devices}")
    if not launched_externally() and devices == 1:
        from irm.runtime import resolve_device

        return fn(Ranks(device=resolve_device(cfg.device)), cfg, *args, **kwargs)

    from lightning.fabric import Fabric

    if launched_externally():
        world, local = int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_WORLD_SIZE", os.environ["WORLD_SIZE"]))
        fabric = Fabric(accelerator=_accelerator(cfg.device), devices=local, num_nodes=world // local,
                        strategy="ddp")
        threads = None
    else:
        accelerator = _accelerator(cfg.device)
        if accelerator == "cuda":
            import torch

            if devices > torch.cuda.device_count():
                raise UserError(f"devices: {devices} but only {torch.cuda.device_count()} CUDA GPU(s) are visible")
        fabric = Fabric(accelerator=accelerator, devices=devices, strategy="ddp_spawn")
        # N CPU processes share the cores: one thread pool each the size of its share, not N pools of all of them.
        threads = max(1, (os.cpu_count() or 1) // devices) if accelerator == "cpu" else None
    try:
        return fabric.launch(_worker, fn, cfg, threads, args, kwargs)
    except Exception as e:  # a spawned worker's error arrives as text: a UserError stays a one-line UserError
        message = _worker_user_error(e)
        if message is None:
            raise
        raise UserError(message) from None


def _worker_user_error(error: BaseException) -> Optional[str]:
    """The message of the UserError a spawned worker raised (torch reports it as its traceback's text), else None."""
    marker = f"{UserError.__module__}.{UserError.__qualname__}: "
    lines = str(error).rstrip().splitlines()
    return lines[-1][len(marker):] if lines and lines[-1].startswith(marker) else None


def split_list(items: Sequence, ranks: Ranks) -> list:
    """This rank's contiguous share of `items`."""
    r = ranks.split(len(items))
    return list(items[r.start:r.stop])
