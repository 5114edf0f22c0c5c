"""The one way irm samples completions: PPO rollouts (stage `rlhf`, paper 4.1), the reward evaluation
(`evaluate-reward`, paper table 7) and the feature ablation (`ablate`, paper table 5) all call `generate` with a
`SamplingRule`, so a completion means the same thing in training, in table 7 and in table 5: at most `max_new_tokens`
tokens, ending at the first end-of-text token when `stop_at_eos` (the token is kept, the rest is padding), drawn from
the policy's own distribution at `temperature`, optionally cut to `top_k` / `top_p` (0 and 1: no cut, as PPO needs).

Two sources of randomness, one distribution:
- `seeds=None` (PPO): transformers' multinomial sampling from the global torch RNG, which the PPO checkpoints save and
  restore, so a resumed run draws what the uninterrupted run would have drawn.
- `seeds` given, one per prompt (tables 7 and 5): Gumbel-max sampling, argmax(warped logits + Gumbel noise), the noise
  of row i drawn from its own generator seeded by `seeds[i]`. A prompt's completion then depends only on its seed,
  not on the batch it shares or the process it runs in (resuming, any batch size, data parallelism), and two models
  or two interventions given the same seeds see the same noise (common random numbers for paired comparisons).

Generation is batched: prompts are left-padded, the KV cache is on, and the per-token work is tensor operations over
the whole batch (the Gumbel noise is one `torch.rand` per row and token: B small kernel calls, no per-sample work
beyond that). `benchmarks/generation.py` measures it against a bare `model.generate` loop.
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass

__all__ = ["SamplingRule", "Completions", "generate", "sample", "sample_prompts", "journalled_batches", "rule",
           "prompt_seed"]


@dataclass(frozen=True)
class SamplingRule:
    """How a completion is sampled. The defaults are PPO's (TRL's) rule: the policy's own distribution, stopping at
    end-of-text."""

    max_new_tokens: int
    stop_at_eos: bool = True
    temperature: float = 1.0
    top_k: int = 0  # 0: no top-k cut
    top_p: float = 1.0  # 1: no nucleus cut

    def __post_init__(self):
        if self.max_new_tokens < 1 or self.temperature <= 0 or self.top_k < 0 or not 0 < self.top_p <= 1:
            from irm.errors import UserError

            raise UserError(f"sampling rule {asdict(self)}: need max_new_tokens >= 1, temperature > 0, top_k >= 0 and "
                            "0 < top_p <= 1")

    def generation_config(self, tokenizer, seeded: bool = False):
        """The transformers GenerationConfig of this rule (PPO's TRL rollouts use it as is). `seeded`: the warps
        (temperature, top-k, top-p) are left to `generate`'s processors, which add per-prompt Gumbel noise after
        them and decode greedily."""
        from transformers import GenerationConfig

        warps = {} if seeded else dict(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p)
        return GenerationConfig(
            max_new_tokens=self.max_new_tokens,
            do_sample=not seeded,
            num_beams=1,
            eos_token_id=tokenizer.eos_token_id if self.stop_at_eos else None,
            pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
            use_cache=True,
            **warps,
        )

    def warpers(self) -> list:
        """The logits warpers transformers' sampling applies for this rule, in its order."""
        from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

        out = []
        if self.temperature != 1.0:
            out.append(TemperatureLogitsWarper(self.temperature))
        if self.top_k:
            out.append(TopKLogitsWarper(self.top_k))
        if self.top_p < 1.0:
            out.append(TopPLogitsWarper(self.top_p))
        return out


class _GumbelNoise:
    """Adds Gumbel(0, 1) noise to each row's (warped) scores from the row's own generator: greedy decoding of the
    result is a draw from softmax(scores) (Gumbel-max). Masked (-inf) tokens stay impossible."""

    def __init__(self, seeds: list[int]):
        self.seeds = seeds
        self.generators = None

    def __call__(self, input_ids, scores):
        import torch

        if self.generators is None:
            self.generators = [torch.Generator(device=scores.device).manual_seed(int(s)) for s in self.seeds]
        u = torch.empty(scores.shape, dtype=torch.float32, device=scores.device)
        for row, g in zip(u, self.generators):
            row.uniform_(generator=g)
        gumbel = -torch.log(-torch.log(u.clamp_min_(torch.finfo(torch.float32).tiny)))
        return scores + gumbel.to(scores.dtype)


def _generating_model(model):
    """The module whose `generate` runs: a peft model's base model (LoRA layers live inside it, active)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


@contextlib.contextmanager
def _only(model, config):
    """generate() fills every field left unset from model.generation_config (an end-of-text token that would stop a
    rule without one, a hub model's repetition penalty, ...): swap the rule's config in for the call."""
    saved, model.generation_config = model.generation_config, config
    try:
        yield
    finally:
        model.generation_config = saved


def generate(model, input_ids, attention_mask, rule: SamplingRule, tokenizer, seeds=None, output_scores=False):
    """Sample one completion per row of a left-padded batch. Returns the sequences (prompt + completion, padded after
    an end-of-text stop) and, with `output_scores`, the warped logits of every sampled step (B x T x V, what PPO's
    log-probabilities are computed from; only without `seeds`, where they carry no noise)."""
    import torch
    from transformers import LogitsProcessorList

    lm = _generating_model(model)
    seeded = seeds is not None
    if seeded and len(seeds) != input_ids.shape[0]:
        raise ValueError(f"{len(seeds)} seeds for {input_ids.shape[0]} prompts")
    if seeded and output_scores:
        raise ValueError("output_scores needs unseeded sampling (seeded scores carry the Gumbel noise)")
    config = rule.generation_config(tokenizer, seeded=seeded)
    config.return_dict_in_generate, config.output_scores = True, output_scores
    processors = LogitsProcessorList([*rule.warpers(), _GumbelNoise(seeds)] if seeded else [])
    with _only(lm, config), torch.no_grad():
        out = lm.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config,
                          logits_processor=processors)
    if output_scores:
        return out.sequences, torch.stack(out.scores, 1)
    return out.sequences


@dataclass
class Completions:
    """`texts`: prompt + completion as text, what the reward scores (paper eq. 3); `completions`: the completion
    alone; `new_ids`: the completion's token ids, up to and including an end-of-text stop."""

    texts: list[str]
    completions: list[str]
    new_ids: list[list[int]]


def sample(model, tokenizer, prompts: list[list[int]], rule: SamplingRule, seeds: list[int]) -> Completions:
    """One batch: every prompt (token ids) left-padded into one tensor, one completion each under `rule`, drawn with
    the prompt's seed."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    width = max(len(p) for p in prompts)
    import torch

    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):  # building the batch, once per call
        ids[i, width - len(p):] = torch.as_tensor(p, dtype=torch.long)
        mask[i, width - len(p):] = 1
    device = next(model.parameters()).device
    out = generate(model, ids.to(device), mask.to(device), rule, tokenizer, seeds=seeds)
    new = out[:, width:].tolist()
    eos = tokenizer.eos_token_id
    new_ids = [row[:row.index(eos) + 1] if rule.stop_at_eos and eos in row else row for row in new]
    completions = tokenizer.batch_decode(new_ids, skip_special_tokens=True)
    texts = tokenizer.batch_decode([p + c for p, c in zip(prompts, new_ids)], skip_special_tokens=True)
    return Completions(texts, completions, new_ids)


def rule(rlhf, max_new_tokens: int) -> SamplingRule:
    """The run's sampling rule at a given length: PPO's rollouts (`rlhf.response_length` tokens), table 7
    (`evaluate_reward.new_tokens`) and table 5 (`ablate.new_tokens`) differ in nothing else. `rlhf`: the RLHFConfig (its
    temperature is the distribution PPO trained); stop at end-of-text; no top-k / top-p cut (TRL's PPO loss assumes
    none)."""
    return SamplingRule(max_new_tokens=max_new_tokens, stop_at_eos=True, temperature=rlhf.temperature)


def prompt_seed(seed: int, index: int) -> int:
    """The sampling seed of prompt `index` of a run seeded `seed`: the same in every model, condition, batch, resume
    and process."""
    import numpy as np

    return int(np.random.SeedSequence([seed, index]).generate_state(1, np.uint64)[0])


def sample_prompts(model, tokenizer, prompts: list[list[int]], indices: list[int], rule: SamplingRule,
                   seed: int) -> Completions:
    """Completions of `prompts[i]` for i in `indices` (one batch), prompt i drawn with `prompt_seed(seed, i)`: the
    same completion whatever batch, resume or process it falls in, and the same noise for every model or
    intervention given the same prompts (evaluate-reward and ablate)."""
    return sample(model, tokenizer, [prompts[i] for i in indices], rule, [prompt_seed(seed, i) for i in indices])


def journalled_batches(ranks, journal, todo: list[int], total: int, batch_size: int, step, desc: str) -> list:
    """The one sample-score-journal loop (evaluate-reward, ablate): the prompts `todo` (indices among `total`; the
    rest were finished by an earlier run) are split among `ranks` (contiguous shares), each rank runs
    `step(indices) -> record` on `batch_size` of its prompts at a time and appends the record to its `journal` as
    soon as it is made, so a killed run never redoes a batch. Returns every rank's new (indices, record), on every
    rank. The progress bar counts prompts."""
    from irm.artifacts import append_jsonl
    from irm.parallel import split_list

    mine = split_list(todo, ranks)
    new = []
    with ranks.progress(desc=desc, total=total, unit="prompt") as bar:
        shown = total - len(todo)
        bar.update(shown)
        for start in range(0, len(mine), batch_size):
            indices = mine[start: start + batch_size]
            record = step(indices)
            append_jsonl(journal, record)
            new.append((indices, record))
            # Rank 0 counts its batches once per rank: the shares are equal and run at the same pace.
            moved = min(len(indices) * ranks.world_size, total - shown)
            bar.update(moved)
            shown += moved
        gathered = [item for share in ranks.gather(new) for item in share]
        bar.update(total - shown)
    return gathered
