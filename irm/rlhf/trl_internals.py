"""The three places irm works around TRL's experimental PPOTrainer where TRL gives no public hook. Checked against
trl==1.12.0 (pinned in pyproject.toml; PPOTrainer was removed in 1.13): `tests/test_rlhf.py` fails, naming what
moved, when the installed TRL is another version or either internal below changed (`changed_internals`)."""

from __future__ import annotations

import contextlib
import inspect

CHECKED_TRL = "1.12.0"
# trl.experimental.ppo.ppo_trainer.batch_generation's parameters, in order, as PPOTrainer.train calls it.
ROLLOUT_PARAMETERS = ("model", "queries", "local_rollout_forward_batch_size", "pad_token_id", "generation_config")


def replace_prompt_loader(trainer, loader) -> None:
    """Make `trainer` (a PPOTrainer) draw its prompts from `loader`. TRL builds `trainer.dataloader` in __init__ with
    a shuffling sampler of its own (no argument chooses another) and `train()` iterates that attribute directly
    (`get_train_dataloader` is never called)."""
    trainer.dataloader = loader


def expose_policy_through_wrapper(trainer) -> None:
    """TRL's reference pass (and its adapters-off context) reaches the policy as `self.model.policy`: under data
    parallelism `self.model` is the DDP wrapper, which has no such attribute, so LoRA PPO on several processes failed
    ("'DistributedDataParallel' object has no attribute 'policy'"). The wrapper gets the policy as a plain
    attribute, not a registered module: its parameters and state dict stay as they were. On one process, nothing."""
    inner = trainer.accelerator.unwrap_model(trainer.model)
    if inner is not trainer.model:
        object.__setattr__(trainer.model, "policy", inner.policy)


@contextlib.contextmanager
def rollouts_sampled_by(batch_generation):
    """Within this context PPOTrainer.train samples its rollouts through `batch_generation` (the parameters of
    ROLLOUT_PARAMETERS, returning (query+response ids, logits)): train() calls the module-level function of
    trl.experimental.ppo.ppo_trainer by name, not a method a subclass could override."""
    from trl.experimental.ppo import ppo_trainer

    original = ppo_trainer.batch_generation
    ppo_trainer.batch_generation = batch_generation
    try:
        yield
    finally:
        ppo_trainer.batch_generation = original


def changed_internals() -> list[str]:
    """What no longer holds of the TRL internals above, one line each (empty: the overrides are sound)."""
    import trl
    from trl.experimental.ppo import PPOTrainer, ppo_trainer

    problems = []
    if trl.__version__ != CHECKED_TRL:
        problems.append(f"trl is {trl.__version__}, the overrides were checked against {CHECKED_TRL}")
    rollout = getattr(ppo_trainer, "batch_generation", None)
    if rollout is None or tuple(inspect.signature(rollout).parameters) != ROLLOUT_PARAMETERS:
        problems.append("trl.experimental.ppo.ppo_trainer.batch_generation is gone or takes other parameters")
    train = inspect.getsource(PPOTrainer.train)
    if "batch_generation(" not in train:
        problems.append("PPOTrainer.train no longer samples through batch_generation")
    if "self.dataloader" not in train:
        problems.append("PPOTrainer.train no longer iterates self.dataloader")
    # the reference pass: train() reads `model.policy` of `model = self.model`, the adapters-off context
    # `self.model.policy`; both are what expose_policy_through_wrapper serves under DDP
    if "forward(model.policy" not in train or "self.model.policy" not in inspect.getsource(PPOTrainer.null_ref_context):
        problems.append("PPOTrainer's reference pass no longer reads the policy as self.model.policy")
    return problems
