"""Full PPO state checkpoints and resuming from them. TRL's PPOTrainer restarts at step 0 and saves only the policy;
this callback saves policy, value model, optimizer, scheduler, step counters, prompt position and every RNG into
`<run_dir>/rlhf/checkpoints/step-NNNNNN/` (atomically, the last KEEP kept) and, when training begins, restores the
newest one, so the run continues at step k+1 drawing the random numbers the uninterrupted run would have drawn.

Under data parallelism (torchrun / accelerate launch) the replicas hold identical weights and optimizer state, so rank
0 alone writes them, with every rank's RNG state gathered into `rng.pt`; every rank restores the same checkpoint and
its own RNG state. The ranks agree, through collectives, on stopping and on which checkpoint they could all read."""

from __future__ import annotations

import json
import random
import re
import shutil
import sys
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from safetensors.torch import load_file, load_model, save_file, save_model
from transformers import TrainerCallback

from irm.artifacts import atomic_dir
from irm.errors import UserError

KEEP = 2  # checkpoints kept: never partial (atomic_dir), but one spare in case the newest is damaged or deleted
STATE = "state.json"  # written last: its presence marks a complete checkpoint
_NAME = re.compile(r"step-(\d{6})")


class TrainingInterrupted(Exception):
    """A stop signal arrived; training finished its step, wrote `checkpoint` and stopped."""

    def __init__(self, signum: int, step: int, checkpoint: Path):
        super().__init__(f"stopped by signal {signum} after step {step}")
        self.signum, self.step, self.checkpoint = signum, step, checkpoint


def checkpoints(root: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under `root` as (step, dir), oldest first."""
    found = []
    if root.is_dir():
        for d in root.iterdir():
            m = _NAME.fullmatch(d.name)
            if m and (d / STATE).is_file():
                found.append((int(m.group(1)), d))
    return sorted(found)


def read_state(ckpt: Path) -> dict:
    return json.loads((ckpt / STATE).read_text(encoding="utf-8"))


def _process_group():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def rank() -> int:
    dist = _process_group()
    return dist.get_rank() if dist else 0


def barrier() -> None:
    dist = _process_group()
    if dist:
        dist.barrier()


def _reduce(value: int, op: str) -> int:
    """`value` reduced over all ranks (op "max" or "min"); the value itself in a single process."""
    dist = _process_group()
    if not dist:
        return value
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
    t = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.MIN)
    return int(t.item())


def _all_gather(obj) -> list:
    dist = _process_group()
    if not dist:
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _rng_state() -> dict:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": random.getstate(),
    }


def _set_rng_state(rng: dict) -> None:
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    n = rng["numpy"]
    keys = n["keys"].numpy().astype(np.uint32)
    np.random.set_state((n["kind"], keys, n["pos"], n["has_gauss"], n["cached_gaussian"]))
    random.setstate(rng["python"])


def _save_weights(module: torch.nn.Module, path: Path) -> None:
    """A module's weights: all of them, or, when some are frozen (LoRA: the base weights, which every run loads
    the same), only the trainable ones - megabytes instead of the whole model."""
    params = dict(module.named_parameters())
    if all(p.requires_grad for p in params.values()):
        save_model(module, str(path))  # save_model handles tied embeddings
    else:
        save_file({n: p.detach().contiguous() for n, p in params.items() if p.requires_grad}, str(path))


def _load_weights(module: torch.nn.Module, path: Path, device: torch.device) -> None:
    params = dict(module.named_parameters())
    if all(p.requires_grad for p in params.values()):
        load_model(module, path, device=str(device))
        return
    state = load_file(str(path), device=str(device))
    trainable = {n for n, p in params.items() if p.requires_grad}
    if set(state) != trainable:
        raise ValueError(f"{path} holds other parameters than the model trains")
    with torch.no_grad():
        for n, t in state.items():
            params[n].copy_(t)


def _parts(model) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(policy, value model) of TRL's PolicyAndValueWrapper, unwrapped from DDP if accelerate wrapped it."""
    wrapper = getattr(model, "module", model)
    return wrapper.policy, wrapper.value_model


class FullStateCheckpoints(TrainerCallback):
    """Saves the whole PPO state every `every` steps, at the last step, and when a stop was requested (then raises
    TrainingInterrupted); restores the newest checkpoint at train begin. `key` names the configuration a checkpoint
    belongs to: checkpoints of another configuration are deleted, not resumed."""

    def __init__(self, root: Path, every: int, key: str, prompt_order, final: bool = True):
        self.root = Path(root)
        self.every = max(1, every)
        self.final = final  # False: no checkpoint at the last step (the stage deletes them once the policy is saved)
        self.key = key
        self.prompt_order = prompt_order
        self.stop_signal: Optional[int] = None
        self.resumed_step = 0

    def request_stop(self, signum: int) -> None:
        self.stop_signal = signum

    def resumable(self, max_steps: int) -> list[tuple[int, Path]]:
        """Checkpoints to resume from, newest first: none if the newest belongs to another configuration or to a run
        longer than `max_steps` steps (then they are all deleted)."""
        found = checkpoints(self.root)
        stale = bool(found) and (read_state(found[-1][1]).get("key") != self.key or found[-1][0] > max_steps)
        barrier()  # every rank has looked before rank 0 deletes anything
        if stale:
            if rank() == 0:
                print(f"irm rlhf: the checkpoints in {self.root} come from another configuration (or a longer run, "
                      "or another process count); starting afresh", file=sys.stderr)
                shutil.rmtree(self.root)
            barrier()
            return []
        return found[::-1]

    def on_train_begin(self, args, state, control, model=None, optimizer=None, lr_scheduler=None, **kwargs):
        for step, ckpt in self.resumable(state.max_steps):
            try:
                self.restore(ckpt, state, model, optimizer, lr_scheduler)
                ok = True
            except Exception as e:  # noqa: BLE001 - a damaged file makes torch/safetensors/json raise almost anything
                print(f"irm rlhf: cannot read checkpoint {ckpt} ({e}); trying an older one", file=sys.stderr)
                ok = False
            if not _reduce(int(ok), "min"):  # resume only from a checkpoint every rank could read
                continue
            # TRL's loop begins right after this event and runs `num_total_batches` updates: only the remaining ones.
            args.num_total_batches = state.max_steps - step
            self.resumed_step = step
            if rank() == 0:
                print(f"irm rlhf: resuming from {ckpt} (step {step} of {state.max_steps})", file=sys.stderr)
            return
        if checkpoints(self.root):  # some weights may be half-restored: a fresh start needs fresh models
            raise UserError(f"no checkpoint in {self.root} could be read; delete that folder to start PPO over")

    def restore(self, ckpt: Path, state, model, optimizer, lr_scheduler) -> None:
        policy, value = _parts(model)
        device = next(policy.parameters()).device
        meta = read_state(ckpt)
        rngs = torch.load(ckpt / "rng.pt", weights_only=True)  # one state per rank
        rng = rngs[rank()]
        _load_weights(policy, ckpt / "policy.safetensors", device)
        _load_weights(value, ckpt / "value.safetensors", device)
        optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", map_location=device, weights_only=True))
        lr_scheduler.load_state_dict(torch.load(ckpt / "scheduler.pt", weights_only=True))
        state.global_step, state.episode = meta["step"], meta["episode"]
        state.log_history = meta["log_history"]
        self.prompt_order.start = meta["episode"]
        _set_rng_state(rng)  # last: nothing after it may draw random numbers before training starts

    def on_step_end(self, args, state, control, model=None, optimizer=None, lr_scheduler=None, **kwargs):
        step = state.global_step
        # A launcher forwards a signal to every rank, but not necessarily within the same step: all stop together.
        signum = _reduce(self.stop_signal or 0, "max")
        last = step == state.max_steps
        if signum or (self.final and last) or (step % self.every == 0 and not last):
            ckpt = self.save(state, model, optimizer, lr_scheduler)
            if signum:
                raise TrainingInterrupted(signum, step, ckpt)

    def on_train_end(self, args, state, control, **kwargs):
        args.num_total_batches = state.max_steps

    def finish(self) -> None:
        """After a completed run whose policy is saved (rank 0): with `final` False, delete the checkpoints."""
        if not self.final:
            shutil.rmtree(self.root, ignore_errors=True)

    def save(self, state, model, optimizer, lr_scheduler) -> Path:
        step = state.global_step
        policy, value = _parts(model)
        target = self.root / f"step-{step:06d}"
        rngs = _all_gather(_rng_state())
        if rank() == 0:
            with atomic_dir(target) as tmp:
                _save_weights(policy, tmp / "policy.safetensors")
                _save_weights(value, tmp / "value.safetensors")
                torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
                torch.save(lr_scheduler.state_dict(), tmp / "scheduler.pt")
                torch.save(rngs, tmp / "rng.pt")
                meta = {"step": step, "episode": state.episode, "key": self.key, "log_history": state.log_history}
                (tmp / STATE).write_text(json.dumps(meta, indent=1), encoding="utf-8")
            for _, old in checkpoints(self.root)[:-KEEP]:
                shutil.rmtree(old, ignore_errors=True)
        barrier()  # no rank goes on (or exits on a stop) before the checkpoint is complete
        return target
