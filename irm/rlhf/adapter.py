"""The two extra models TRL's PPOTrainer needs besides the policy (paper 4.1): our Python reward dressed as the
sequence classifier TRL calls, and a value model whose backbone starts from the policy's weights (or, head-only,
is the reference model itself: `SharedTrunkCritic`)."""

from __future__ import annotations

import copy
from typing import Callable, Optional, Sequence

import torch
from torch import nn
from transformers.modeling_outputs import BaseModelOutput

RewardFn = Callable[[Sequence[str]], Sequence[float]]


class _DecodeAndScore(nn.Module):
    """The adapter's "backbone": decodes every row's non-pad ids and scores the texts; the "hidden state" it returns
    is each text's reward repeated over all positions, so whichever position TRL reads, it reads the reward."""

    def __init__(self, reward_fn: RewardFn, tokenizer):
        super().__init__()
        self.reward_fn = reward_fn
        self.tokenizer = tokenizer

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **_) -> BaseModelOutput:
        # TRL zeroes pad positions in input_ids and marks them in attention_mask: decode only the real tokens.
        texts = [
            self.tokenizer.decode(ids[mask.bool()].tolist(), skip_special_tokens=True)
            for ids, mask in zip(input_ids, attention_mask)
        ]
        rewards = [float(r) for r in self.reward_fn(texts)]
        rewards = torch.as_tensor(rewards, dtype=torch.float32, device=input_ids.device)
        hidden = rewards[:, None, None].expand(-1, input_ids.shape[1], 1)
        return BaseModelOutput(last_hidden_state=hidden, hidden_states=(hidden,))


class RewardAdapter(nn.Module):
    """Any texts -> rewards function as the HF sequence classifier TRL's PPOTrainer expects: TRL calls
    `getattr(m, m.base_model_prefix)(input_ids=..., attention_mask=..., position_ids=..., output_hidden_states=True)`,
    then `m.score(hidden_states[-1])`, and takes the value at each sequence's last non-pad token. The text scored is
    prompt + completion, as the paper scores it (eq. 3)."""

    base_model_prefix = "backbone"

    def __init__(self, reward_fn: RewardFn, tokenizer):
        super().__init__()
        self.backbone = _DecodeAndScore(reward_fn, tokenizer)
        self.score = nn.Identity()


def linear_names(model: nn.Module) -> list[str]:
    """The distinct (last-component) names of the linear layers of a model's transformer body, attention and MLP:
    what `lora_targets: all-linear` adapts. The output head lies outside the body and is never among them."""
    from transformers.pytorch_utils import Conv1D  # GPT-2's linear layers

    body = getattr(model, model.base_model_prefix)
    return sorted({name.rsplit(".", 1)[-1] for name, m in body.named_modules() if isinstance(m, (nn.Linear, Conv1D))})


def lora_config(rlhf, policy: nn.Module):
    """The peft LoraConfig of `rlhf` (RLHFConfig) for `policy`, or None for full fine-tuning (lora_rank 0)."""
    if rlhf.lora_rank == 0:
        return None
    from peft import LoraConfig

    from irm.errors import UserError

    if rlhf.lora_rank < 0 or rlhf.lora_alpha <= 0 or not 0 <= rlhf.lora_dropout < 1:
        raise UserError(f"rlhf.lora_rank={rlhf.lora_rank}, lora_alpha={rlhf.lora_alpha}, lora_dropout="
                        f"{rlhf.lora_dropout}: need rank >= 0 (0: full fine-tuning), alpha > 0, 0 <= dropout < 1")
    names = linear_names(policy)
    targets = names if rlhf.lora_targets == "all-linear" else list(
        [rlhf.lora_targets] if isinstance(rlhf.lora_targets, str) else rlhf.lora_targets)
    unknown = sorted(set(targets) - set(names))
    if unknown or not targets:
        raise UserError(f"rlhf.lora_targets: {unknown or targets} are not linear layers of {type(policy).__name__}; "
                        f"use `all-linear` or some of {names}")
    return LoraConfig(r=rlhf.lora_rank, lora_alpha=rlhf.lora_alpha, lora_dropout=rlhf.lora_dropout,
                      target_modules=targets, bias="none", task_type="CAUSAL_LM")


class ReferenceTrunk(nn.Module):
    """The body of a head-only critic: the reference model's body (the base model's weights, frozen), returning its
    last hidden states the way TRL reads a value model's backbone (`hidden_states[-1]`). It has no weights of its
    own. TRL runs the reference model on every rollout batch just before the critic, and the critic's body again
    on every mini-batch of every PPO epoch; the body being the reference's, the hidden states of that one reference
    pass (`remember`, fed by a hook the trainer sets) answer all of them: three of a step's full forward passes
    fewer at the quickstart's settings. Rows are matched by their input ids and mask; a row not seen is computed
    by `compute` (set by the trainer: the reference's body)."""

    def __init__(self):
        super().__init__()
        self.compute: Optional[Callable[..., torch.Tensor]] = None
        self._seen: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def remember(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, hidden: torch.Tensor) -> None:
        self._seen.append((input_ids, attention_mask.bool(), hidden.detach()))

    def forget(self) -> None:
        self._seen.clear()

    def _lookup(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Optional[torch.Tensor]:
        """The remembered hidden states of every row, or None unless all rows were seen (at this width)."""
        for ids, mask, hidden in self._seen:
            if ids.shape[1] != input_ids.shape[1] or ids.device != input_ids.device:
                continue
            same_RS = ((input_ids[:, None] == ids[None]) & (attention_mask.bool()[:, None] == mask[None])).all(-1)
            found_R = same_RS.any(1)
            if bool(found_R.all()):
                return hidden[same_RS.int().argmax(1)]
        return None

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **kwargs) -> BaseModelOutput:
        hidden = self._lookup(input_ids, attention_mask)
        if hidden is None:
            if self.compute is None:
                raise RuntimeError("the head-only critic's trunk is not bound to a reference model")
            hidden = self.compute(input_ids=input_ids, attention_mask=attention_mask,
                                  position_ids=kwargs.get("position_ids"))
        return BaseModelOutput(last_hidden_state=hidden, hidden_states=(hidden,))


class SharedTrunkCritic(nn.Module):
    """A head-only value model (`rlhf.value_head_only`): TRL's value-model interface (`base_model_prefix`, the
    backbone, `score`) over a `ReferenceTrunk`, so that its only weights are the one-output head. The same values as
    a frozen copy of the base model's body under the head, without the copy (half a gigabyte for SmolLM2-135M) or
    its forward passes."""

    base_model_prefix = "trunk"

    def __init__(self, score: nn.Module):
        super().__init__()
        self.trunk = ReferenceTrunk()
        self.score = score


def value_model_from(policy: nn.Module, lora=None, head_only: bool = False) -> nn.Module:
    """A one-output sequence-classification model of the policy's architecture whose backbone starts as a copy of
    the policy's (the value head is freshly initialised): PPO's critic, trained jointly with the policy. With a
    peft `lora` config the backbone is frozen and gets adapters of that config (injected in place, so TRL still
    finds the backbone and the head by their usual names); the head trains in full. `head_only`: the backbone is
    the frozen base model, which the reference model already is: a `SharedTrunkCritic` with that head (its
    initialisation, and the random numbers it draws, are the full model's: runs are the same as with a copy)."""
    from transformers import AutoModelForSequenceClassification

    config = copy.deepcopy(policy.config)
    config.num_labels = 1
    value = AutoModelForSequenceClassification.from_config(config, dtype=policy.dtype)
    if head_only:
        return SharedTrunkCritic(value.score).to(policy.device)
    prefix = policy.base_model_prefix
    getattr(value, prefix).load_state_dict(getattr(policy, prefix).state_dict())
    if lora is not None:
        from peft import inject_adapter_in_model

        value.requires_grad_(False)
        inject_adapter_in_model(copy.deepcopy(lora), getattr(value, prefix))  # adapters come in trainable
        value.score.requires_grad_(True)
    return value.to(policy.device)
