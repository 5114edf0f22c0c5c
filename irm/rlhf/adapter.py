"""The two extra models TRL's PPOTrainer needs besides the policy (paper 4.1): our Python reward dressed as the
sequence classifier TRL calls, and a value model whose backbone starts from the policy's weights."""

from __future__ import annotations

import copy
from typing import Callable, Sequence

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


def value_model_from(policy: nn.Module) -> nn.Module:
    """A one-output sequence-classification model of the policy's architecture whose backbone starts as a copy of
    the policy's (the value head is freshly initialised): PPO's critic, trained jointly with the policy."""
    from transformers import AutoModelForSequenceClassification

    config = copy.deepcopy(policy.config)
    config.num_labels = 1
    value = AutoModelForSequenceClassification.from_config(config, dtype=policy.dtype)
    prefix = policy.base_model_prefix
    getattr(value, prefix).load_state_dict(getattr(policy, prefix).state_dict())
    return value.to(policy.device)
