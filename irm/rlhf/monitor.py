"""What a user watches during PPO: TensorBoard scalars, a JSON-lines copy of them, and a progress bar with reward
and KL. All are TrainerCallbacks fed by TRL's per-step log."""

from __future__ import annotations

import json
from pathlib import Path

from transformers import TrainerCallback

from irm.artifacts import append_jsonl, read_jsonl, write_text
from irm.runtime import progress

# TRL's metric name -> ours (TensorBoard tag). TRL's "objective/scores" is the batch mean of our reward (eq. 3);
# "objective/kl" the summed per-token KL to the reference model, batch mean.
SCALARS = {
    "objective/scores": "rlhf/reward_mean",
    "objective/kl": "rlhf/kl",
    "loss/policy_avg": "rlhf/policy_loss",
    "loss/value_avg": "rlhf/value_loss",
    "policy/entropy_avg": "rlhf/entropy",  # per-token entropy of the policy during the PPO updates
    "objective/entropy": "rlhf/sequence_entropy",  # summed -log p of the sampled completions
    "objective/rlhf_reward": "rlhf/objective",  # reward minus the KL penalty: what PPO maximises
    "objective/non_score_reward": "rlhf/kl_penalty",
    "policy/approxkl_avg": "rlhf/approx_kl",
    "policy/clipfrac_avg": "rlhf/policy_clipfrac",
    "val/clipfrac_avg": "rlhf/value_clipfrac",
    "grad_norm": "rlhf/grad_norm",
    "lr": "rlhf/learning_rate",
}


def step_scalars(logs: dict) -> dict[str, float]:
    return {ours: float(logs[theirs]) for theirs, ours in SCALARS.items() if theirs in logs}


class ClosingCallback(TrainerCallback):
    """A callback holding something to close (a writer, a bar): closed when training ends, and by `close()` when it
    stops early (the rlhf stage closes its callbacks in a `finally`)."""

    def on_train_end(self, args, state, control, **kwargs):
        self.close()

    def close(self) -> None:
        raise NotImplementedError


class ScalarLogger(ClosingCallback):
    """TensorBoard scalars under `log_dir` and the same numbers as JSON lines in `jsonl`, one record per PPO step,
    and to the run's other loggers (`cfg.loggers`: csv, mlflow, wandb through irm.loggers; TRL's own `report_to`
    integrations read environment variables, a second configuration, so PPO logs through the same logger objects as
    the Lightning stages instead). A resumed run drops what a killed run logged after its checkpoint (TensorBoard
    through `purge_step`, the JSON lines by rewriting), so every step appears once there; the other loggers receive
    the resumed steps again."""

    def __init__(self, log_dir: Path, jsonl: Path, cfg=None):
        self.log_dir, self.jsonl = Path(log_dir), Path(jsonl)
        self.writer = None
        self.tensorboard = cfg is None or "tensorboard" in cfg.loggers
        self.others = [] if cfg is None else [n for n in cfg.loggers if n != "tensorboard"]
        self.cfg, self.loggers = cfg, []

    def on_train_begin(self, args, state, control, **kwargs):
        from torch.utils.tensorboard import SummaryWriter

        done = state.global_step
        kept = [r for r in read_jsonl(self.jsonl) if r["step"] <= done]
        write_text(self.jsonl, "".join(json.dumps(r) + "\n" for r in kept))
        if self.tensorboard:
            self.writer = SummaryWriter(str(self.log_dir), purge_step=done + 1 if done else None)
        if self.others:
            from irm.loggers import stage_loggers

            self.loggers = stage_loggers(self.cfg.log_dir, self.cfg.run_dir, self.log_dir.name, self.others)

    def on_log(self, args, state, control, logs=None, **kwargs):
        scalars = step_scalars(logs or {})
        if not scalars:
            return
        if self.writer is not None:
            for tag, value in scalars.items():
                self.writer.add_scalar(tag, value, state.global_step)
            self.writer.flush()  # a killed run keeps every step it logged
        if self.loggers:
            from irm.loggers import log_metrics

            log_metrics(self.loggers, scalars, state.global_step)
        append_jsonl(self.jsonl, {"step": state.global_step, **scalars})

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        if self.loggers:
            from irm.loggers import finish

            finish(self.loggers)
            self.loggers = []


class ProgressBar(ClosingCallback):
    """One bar over PPO steps showing the batch's mean reward and its KL to the reference model."""

    def __init__(self):
        self.bar = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.bar = progress(desc="PPO", total=state.max_steps, unit="step")
        self.bar.update(state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        s = step_scalars(logs or {})
        if "rlhf/reward_mean" in s:
            self.bar.set_postfix(reward=f"{s['rlhf/reward_mean']:.3f}", kl=f"{s.get('rlhf/kl', float('nan')):.3f}")

    def on_step_end(self, args, state, control, **kwargs):
        self.bar.update(state.global_step - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
