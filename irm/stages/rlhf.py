"""`python -m irm rlhf`: PPO fine-tuning of the base model M_base into M_RLHF against the reward (paper 4.1, C),
through TRL's PPOTrainer with a frozen reference copy of the base, a value model and our reward behind an adapter;
or, with `model.tuned`, the user's own tuned model taken as M_RLHF (`given_policy`).
Resumable from full-state checkpoints; SIGINT/SIGTERM finish the current step, checkpoint and exit.

Data parallel under a multi-process launcher (`torchrun --nproc_per_node N -m irm rlhf ...` or `accelerate launch
-m irm rlhf ...`): TRL's accelerate-based trainer gives each process 1/N of every batch and all-reduces gradients;
rank 0 alone writes the run directory, checkpoints, the policy and TensorBoard."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import gc
import os
import signal
import sys
import threading
import time
from pathlib import Path

from irm.artifacts import CHECKPOINTS, atomic_dir, fingerprint, read_jsonl
from irm.config import RunConfig, fingerprint_data
from irm.errors import UserError
from irm.loggers import tensorboard_dir
from irm.rlhf.checkpoint import FullStateCheckpoints, TrainingInterrupted
from irm.runtime import start
from irm.stages import artifact, is_done, mark_done, open_run_dir

STAGE = "rlhf"


def checkpoint_key(cfg: RunConfig, world_size: int = 1) -> str:
    """What a checkpoint must have been made from to be resumed: everything that shapes the PPO trajectory up to
    its step, the process count included (each rank has its own random stream). Not `steps` (the learning rate is
    constant, so a longer run continues a shorter one exactly), not `checkpoint_every`."""
    rlhf = {k: v for k, v in dataclasses.asdict(cfg.rlhf).items()
            if k not in ("steps", "checkpoint_every", "keep_final_checkpoint")}
    # reward.lexicon by its file's content, and the fields added since left out when unset (fingerprint_data)
    model, reward = (fingerprint_data(n, dataclasses.asdict(getattr(cfg, n))) for n in ("model", "reward"))
    if world_size == 1:  # the key single-process runs always had
        return fingerprint(cfg.seed, model, cfg.corpus, reward, rlhf)
    return fingerprint(cfg.seed, model, cfg.corpus, reward, rlhf, world_size)


def launch_world() -> tuple[int, int, int]:
    """(rank, local rank, process count) as torchrun, accelerate launch and SLURM-through-torchrun set them."""
    env = os.environ
    return int(env.get("RANK", 0)), int(env.get("LOCAL_RANK", 0)), int(env.get("WORLD_SIZE", 1))


@contextlib.contextmanager
def stop_after_step_on_signals(ckpt: FullStateCheckpoints):
    """SIGINT/SIGTERM ask the trainer to finish its step, checkpoint and stop; a second signal stops at once."""
    if threading.current_thread() is not threading.main_thread():  # signal handlers can only be set there
        yield
        return

    def handler(signum, _frame):
        if ckpt.stop_signal is not None:
            raise KeyboardInterrupt
        ckpt.request_stop(signum)
        print(f"\nirm rlhf: {signal.Signals(signum).name}: finishing this PPO step, then checkpointing "
              "(send it again to stop at once, without a checkpoint)", file=sys.stderr)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def _ppo_prompts(cfg: RunConfig, tokenizer) -> list:
    """Token ids of the PPO prompts; a batch needs at least `rlhf.batch_size` of them."""
    from irm.data import load_texts, make_prompts

    texts = load_texts(cfg.corpus, cfg.corpus.split, seed=cfg.seed)
    prompts = make_prompts(texts, tokenizer, cfg.rlhf.prompt_min_tokens, cfg.rlhf.prompt_max_tokens, seed=cfg.seed)
    if len(prompts) < cfg.rlhf.batch_size:
        raise UserError(
            f"only {len(prompts)} PPO prompts from corpus split {cfg.corpus.split!r}, fewer than rlhf.batch_size="
            f"{cfg.rlhf.batch_size}; use a larger corpus (corpus.n_documents) or a smaller batch"
        )
    return prompts


def _announce(cfg: RunConfig, world_size: int, lora, n_prompts: int, log_dir) -> None:
    ranks = f" on each of {world_size} processes" if world_size > 1 else ""
    how = f"LoRA rank {cfg.rlhf.lora_rank}" if lora else "full fine-tuning"
    print(f"irm rlhf: PPO ({how}) on {cfg.model.name} against the {cfg.reward.kind} reward: {cfg.rlhf.steps} "
          f"steps of {cfg.rlhf.batch_size} prompts ({cfg.rlhf.batch_size // world_size}{ranks}), {n_prompts} "
          f"prompts in all; TensorBoard: {log_dir}", file=sys.stderr)


def _train(cfg: RunConfig, trainer, ckpt: FullStateCheckpoints, scalars, bar, rank: int) -> float:
    """Runs PPO to the end and returns its wall seconds; a stop signal exits (SystemExit) once checkpointed."""
    start = time.perf_counter()
    # TRL runs gc.collect() twice per step; freezing what exists now (libraries, models) takes those from ~0.25 s
    # each to microseconds on a tiny model.
    gc.collect()
    gc.freeze()
    stop = None
    try:
        with stop_after_step_on_signals(ckpt):
            trainer.train()
    except TrainingInterrupted as e:
        stop = e
    finally:
        gc.unfreeze()
        scalars.close()
        bar.close()
    if stop is not None and rank > 0:
        raise SystemExit(128 + stop.signum)
    if stop is not None:
        print(f"irm rlhf: stopped by {signal.Signals(stop.signum).name} after step {stop.step} of {cfg.rlhf.steps}; "
              f"state saved in {stop.checkpoint}. Rerun the same command to resume.", file=sys.stderr)
        raise SystemExit(128 + stop.signum)
    return time.perf_counter() - start


def _save_policy(cfg: RunConfig, out: Path, trainer, policy, tokenizer, lora, generation_config,
                 ckpt: FullStateCheckpoints, seconds: float, ran: int) -> None:
    """Rank 0: the tuned policy to `<out>/policy`, the stage recorded with its timing and reward summary."""
    if lora is not None:  # downstream stages read a plain model: the adapters folded into the weights
        policy = trainer.policy_model.merge_and_unload()
    policy.generation_config = generation_config
    saved, metrics_path = artifact(cfg.run_dir, "policy"), artifact(cfg.run_dir, "rlhf_metrics")
    with atomic_dir(saved) as tmp:
        policy.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    metrics = read_jsonl(metrics_path)
    summary = {"seconds_per_step": seconds / ran if ran else None}
    if metrics:
        summary["reward_first_step"] = metrics[0]["rlhf/reward_mean"]
        summary["reward_last_step"] = metrics[-1]["rlhf/reward_mean"]
    mark_done(cfg, STAGE, [saved, metrics_path], **summary)
    ckpt.finish()
    rate = f"{summary['seconds_per_step']:.2f} s/step" if ran else "nothing left to train"
    rewards = (f"; mean reward {summary['reward_first_step']:.3f} at step 1, {summary['reward_last_step']:.3f} at step "
               f"{metrics[-1]['step']}" if metrics else "")
    print(f"irm rlhf: done ({rate}{rewards}); tuned policy in {saved}", file=sys.stderr)


def given_policy(cfg: RunConfig) -> None:
    """`model.tuned`: no PPO. The given tuned model (its pairing with model.name checked by irm.config.check_all) is
    saved as the run's policy, where every later stage reads M_RLHF as it reads a PPO-trained one, and the manifest
    records what it was (name, checksum of local files or the hub commit)."""
    from irm.models import load_given_tuned, tuned_identity

    open_run_dir(cfg)
    start(cfg.seed, "cpu")
    model, tokenizer = load_given_tuned(cfg.model, cfg.seed, device="cpu")
    saved = artifact(cfg.run_dir, "policy")
    with atomic_dir(saved) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    identity = tuned_identity(cfg.model, getattr(model.config, "_commit_hash", None))
    mark_done(cfg, STAGE, [saved], tuned=identity)
    print(f"irm rlhf: no training: the tuned model {cfg.model.tuned} (model.tuned) is the run's policy, saved in "
          f"{saved}", file=sys.stderr)


def run(cfg: RunConfig, callbacks: tuple = ()) -> None:
    """Train (or resume) PPO and save the tuned policy to `<run_dir>/rlhf/policy`. `callbacks`: extra
    TrainerCallbacks, run after ours (tests use them to watch or interrupt training)."""
    out = Path(cfg.run_dir) / STAGE
    if is_done(cfg, STAGE):
        print(f"irm rlhf: up to date: {artifact(cfg.run_dir, 'policy')} was trained with this config; nothing to do", file=sys.stderr)
        return
    rank, local_rank, world_size = launch_world()
    if cfg.model.tuned is not None:
        if rank == 0:
            given_policy(cfg)
        return
    if rank == 0:
        open_run_dir(cfg)
    device = start(cfg.seed, cfg.device)

    import torch
    from datasets import Dataset

    from irm.models import load_model
    from irm.reward import build_reward
    from irm.rlhf.adapter import RewardAdapter, lora_config, value_model_from
    from irm.rlhf.monitor import ProgressBar, ScalarLogger
    from irm.rlhf.trainer import PromptOrder, ResumablePPOTrainer, ppo_config, rollout_rule

    # TRL needs an output_dir and creates it, but writes nothing there (save_strategy "no"): our checkpoint folder.
    args = ppo_config(cfg.rlhf, str(out / CHECKPOINTS), cfg.seed, use_cpu=device.type == "cpu",
                      world_size=world_size)
    if device.type == "cuda" and world_size > 1:
        device = torch.device("cuda", local_rank)  # one GPU per process, as accelerate assigns them
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)  # accelerate places everything on the current CUDA device

    policy, tokenizer = load_model(cfg.model, seed=cfg.seed, device=device)
    generation_config = copy.deepcopy(policy.generation_config)  # TRL rewrites eos_token_id for its sampling
    lora = lora_config(cfg.rlhf, policy)
    # LoRA: TRL's reference is the policy with its adapters off, no copy.
    reference = None if lora else copy.deepcopy(policy).requires_grad_(False).eval()
    value_model = value_model_from(policy, lora, head_only=cfg.rlhf.value_head_only)
    reward_model = RewardAdapter(build_reward(cfg.reward, device=device), tokenizer)

    prompts = _ppo_prompts(cfg, tokenizer)

    order = PromptOrder(len(prompts), cfg.seed, rank, world_size, cfg.rlhf.batch_size // world_size)
    ckpt = FullStateCheckpoints(out / CHECKPOINTS, cfg.rlhf.checkpoint_every, checkpoint_key(cfg, world_size), order,
                                final=cfg.rlhf.keep_final_checkpoint)
    scalars = ScalarLogger(tensorboard_dir(cfg.log_dir, cfg.run_dir, STAGE), artifact(cfg.run_dir, "rlhf_metrics"),
                           cfg)
    bar = ProgressBar()
    # TRL averages the logged metrics over ranks: rank 0 alone writes them and draws the bar.
    watchers = [scalars, bar] if rank == 0 else []
    trainer = ResumablePPOTrainer(
        args=args,
        processing_class=tokenizer,
        model=policy,
        ref_model=reference,
        reward_model=reward_model,
        train_dataset=Dataset.from_dict({"input_ids": prompts}),
        value_model=value_model,
        peft_config=lora,
        callbacks=[ckpt, *watchers, *callbacks],
        prompt_order=order,
        rule=rollout_rule(cfg.rlhf),
    )
    if trainer.accelerator.num_processes != world_size:
        raise UserError(f"the launcher started {trainer.accelerator.num_processes} processes but set WORLD_SIZE="
                        f"{world_size}; start the rlhf stage with python, torchrun or accelerate launch")
    if rank == 0:
        _announce(cfg, world_size, lora, len(prompts), scalars.log_dir)
    seconds = _train(cfg, trainer, ckpt, scalars, bar, rank)
    ran = cfg.rlhf.steps - ckpt.resumed_step
    if rank > 0:  # the replicas are identical: rank 0 saves the policy and records the stage
        trainer.accelerator.wait_for_everyone()
        return

    _save_policy(cfg, out, trainer, policy, tokenizer, lora, generation_config, ckpt, seconds, ran)
    trainer.accelerator.wait_for_everyone()  # the other ranks exit only once the policy is saved
