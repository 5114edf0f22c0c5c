"""TRL 1.12's PPOTrainer, configured from `RLHFConfig` (paper 4.1), with the changes that resuming and the paper's
settings need and that leave TRL's training loop untouched (the two without a public TRL hook go through
irm.rlhf.trl_internals)."""

from __future__ import annotations

import contextlib
import os
import statistics
import warnings
from typing import Iterator

# trl==1.12.0 is pinned (PPOTrainer was removed in 1.13): its "experimental API" warning, and the deprecation
# warnings its PPO code triggers in transformers 5 (see `_quiet`), say nothing a user can act on.
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

import torch  # noqa: E402
from torch.utils.data import DataLoader, Sampler  # noqa: E402
from transformers.trainer_callback import PrinterCallback  # noqa: E402
from trl.experimental.ppo import PPOConfig, PPOTrainer  # noqa: E402

from irm.config import RLHFConfig  # noqa: E402
from irm.errors import UserError  # noqa: E402
from irm.rlhf.adapter import ReferenceTrunk, SharedTrunkCritic  # noqa: E402
from irm.rlhf.trl_internals import (  # noqa: E402
    expose_policy_through_wrapper, replace_prompt_loader, rollouts_sampled_by)
from irm.sampling import SamplingRule, generate, rule  # noqa: E402


def rollout_rule(rlhf: RLHFConfig) -> SamplingRule:
    """PPO's sampling rule: the run's rule (irm.sampling.rule) at `response_length` tokens. Ending at end-of-text as
    the paper's TRL sampled: the reward reads the completion up to there, the PPO loss ignores what follows."""
    return rule(rlhf, rlhf.response_length)


@contextlib.contextmanager
def _quiet():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*gradient_checkpointing.* is deprecated", category=FutureWarning)
        yield


class PromptOrder(Sampler[int]):
    """Prompt indices, endless: a fresh permutation per pass over the prompts, each seeded by (seed, pass), starting
    `start` prompts in. Batch s of a run is then a function of the seed and s alone, so a resumed run draws exactly
    the prompts the uninterrupted run would have drawn. Under data parallelism every rank walks the same global
    stream, cut into global batches of `local_batch * world_size` prompts, and yields only its own slice of each:
    the ranks together draw the global batch a single process would, and `start` counts global prompts."""

    def __init__(self, n_prompts: int, seed: int, rank: int = 0, world_size: int = 1, local_batch: int = 1):
        self.n_prompts = n_prompts
        self.seed = seed
        self.rank, self.world_size, self.local_batch = rank, world_size, local_batch
        self.start = 0

    def _global(self) -> Iterator[int]:
        epoch, offset = divmod(self.start, self.n_prompts)
        while True:
            order = torch.randperm(self.n_prompts, generator=torch.Generator().manual_seed(self.seed + epoch))
            yield from order[offset:].tolist()
            epoch, offset = epoch + 1, 0

    def __iter__(self) -> Iterator[int]:
        stream = self._global()
        if self.world_size == 1:
            yield from stream
            return
        mine = slice(self.rank * self.local_batch, (self.rank + 1) * self.local_batch)
        while True:
            yield from [next(stream) for _ in range(self.local_batch * self.world_size)][mine]


def _input_ids(args: tuple, kwargs: dict):
    """The input ids of a model call as a forward hook sees it (keyword or first positional), or None."""
    return kwargs["input_ids"] if "input_ids" in kwargs else (args[0] if args else None)


class ResumablePPOTrainer(PPOTrainer):
    """PPOTrainer whose prompts come from a `PromptOrder` (TRL shuffles from the global RNG, which a resumed run
    cannot replay without redrawing every earlier batch) and whose optimizer clips the joint policy + value gradient
    to `args.max_grad_norm` before every step (TRL 1.12's PPO loop never clips; the paper clips at 1). The mean
    pre-clipping gradient norm of each PPO step is logged as `grad_norm`."""

    def __init__(self, *args, prompt_order: PromptOrder, rule: SamplingRule, **kwargs):
        self._grad_norms: list[float] = []
        if rule.top_k or rule.top_p < 1 or not rule.stop_at_eos:
            raise ValueError(f"PPO samples the uncut distribution and stops at end-of-text, not {rule}")
        self.rule = rule
        with _quiet():
            super().__init__(*args, **kwargs)
        expose_policy_through_wrapper(self)  # LoRA PPO under DDP: TRL reads self.model.policy
        # TRL prints every log dict (disable_tqdm) or draws its own bar; the stage shows one bar with reward and KL.
        self.remove_callback(PrinterCallback)
        # Own generator: starting the loader's iterator must not draw from the global RNG, which a resumed run
        # restores exactly and then needs for sampling completions.
        replace_prompt_loader(self, DataLoader(self.train_dataset, batch_size=self.local_dataloader_batch_size,
                                               sampler=prompt_order, collate_fn=self.data_collator,
                                               generator=torch.Generator()))
        self._reference_pass = False
        self._trunk: ReferenceTrunk | None = None
        self._hooks: list = []  # removed when training ends: the policy object outlives the trainer
        if isinstance(self.value_model, SharedTrunkCritic):
            self._share_reference_trunk(self.value_model.trunk)
        self._context_length: int | None = None
        for lm in (self._causal_lm(self.policy_model), self.ref_model):  # under LoRA, no reference copy
            if lm is not None:
                self._keep_response_logits(lm)

    def _causal_lm(self, model):
        model = self.accelerator.unwrap_model(model)
        return model.get_base_model() if self.is_peft_model and model is self.policy_model else model

    def _keep_response_logits(self, lm) -> None:
        """TRL's reference and training passes read the logits of the response positions only (from the last
        prompt token on), yet the output head ran over the prompt too: for 16 new tokens after prompts of up to 30,
        two thirds of the head's work (a fifth of a small model's: SmolLM2-135M's head is 28M of its 134M weights)
        were thrown away. These hooks give a pass over whole rollouts (longer than the step's prompts) HF's
        `logits_to_keep`, so the head runs on the positions read, and pad the logits back to full length with zeros
        where nothing reads them. Generation (prompt-long or one-token passes) is left alone."""

        width: list[int] = []  # the whole pass's length while a kept pass runs

        def keep(_module, args, kwargs):
            ids = _input_ids(args, kwargs)
            if self._context_length is None or ids is None or ids.shape[1] <= self._context_length:
                return None
            width.append(ids.shape[1])
            return args, {**kwargs, "logits_to_keep": ids.shape[1] - self._context_length + 1}

        def pad(_module, _args, out):
            if not width:
                return None
            logits = out.logits
            front = logits.new_zeros(logits.shape[0], width.pop() - logits.shape[1], logits.shape[2])
            out.logits = torch.cat((front, logits), dim=1)
            return out

        self._hooks += [lm.register_forward_pre_hook(keep, with_kwargs=True), lm.register_forward_hook(pad)]

    def _share_reference_trunk(self, trunk: ReferenceTrunk) -> None:
        """Bind a head-only critic's trunk to the reference model's body: a hook hands it the body's last hidden
        states from each reference pass (the policy with its adapters off under LoRA, else the reference copy), and
        a row it has not seen is computed by that body."""
        if self.is_peft_model:
            lm = self._causal_lm(self.policy_model)
            reference = self.accelerator.unwrap_model(self.policy_model).disable_adapter
        else:
            lm, reference = self.ref_model, contextlib.nullcontext
        body = getattr(lm, lm.base_model_prefix)

        def compute(input_ids, attention_mask, position_ids):
            with reference():
                return body(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                            use_cache=False).last_hidden_state

        def record(_module, args, kwargs, out):
            if self._reference_pass or not self.is_peft_model:  # the policy's own passes run the same body
                ids, mask = _input_ids(args, kwargs), kwargs.get("attention_mask")
                if ids is not None and mask is not None:
                    trunk.remember(ids, mask, out.last_hidden_state)

        trunk.compute = compute
        self._hooks.append(body.register_forward_hook(record, with_kwargs=True))
        self._trunk = trunk

    @contextlib.contextmanager
    def null_ref_context(self):
        """TRL's reference pass (the policy with its adapters off), marked so that the critic's trunk keeps it."""
        with super().null_ref_context():
            self._reference_pass = True
            try:
                yield
            finally:
                self._reference_pass = False

    def train(self):
        """TRL's loop, its rollouts sampled by `irm.sampling.generate` under `self.rule` (the one sampling rule of
        tables 5 and 7) instead of TRL's own GenerationConfig (which holds the same values: TRL's temperature, top_k
        0, top_p 1, response_length; stop at `stop_token` eos)."""
        try:
            with rollouts_sampled_by(self._batch_generation):
                return super().train()
        finally:
            for hook in self._hooks:
                hook.remove()

    @torch.no_grad()
    def _batch_generation(self, model, queries, local_rollout_forward_batch_size, pad_token_id, _trl_config):
        """TRL's batch_generation (same arguments and results: query+response ids, right-padded to one width, and
        the tempered logits of every sampled step), sampling through the one rule."""
        from trl.trainer.utils import pad

        if self._trunk is not None:  # a new step: the previous step's reference passes are not needed again
            self._trunk.forget()
        self._context_length = queries.shape[1]  # TRL's context_length: the step's rollouts are longer
        sequences, logits = [], []
        for i in range(0, queries.shape[0], local_rollout_forward_batch_size):
            query = queries[i:i + local_rollout_forward_batch_size]
            mask = query != pad_token_id
            out, scores = generate(model, torch.masked_fill(query, ~mask, 0), mask.long(), self.rule,
                                   self.processing_class, output_scores=True)
            sequences.append(torch.cat((query, out[:, query.shape[1]:]), 1))
            logits.append(scores)
        sequences = pad(sequences, padding_value=pad_token_id, padding_side="right")
        logits = pad(logits, padding_value=0, padding_side="right")
        n = queries.shape[0]
        return sequences.view(-1, sequences.shape[-1])[:n], logits.view(-1, *logits.shape[2:])[:n]

    def create_optimizer(self, model=None):
        optimizer = super().create_optimizer(model)
        optimizer.register_step_pre_hook(self._clip_gradients)
        return optimizer

    def _clip_gradients(self, optimizer, _args, _kwargs) -> None:
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        max_norm = self.args.max_grad_norm if self.args.max_grad_norm and self.args.max_grad_norm > 0 else float("inf")
        self._grad_norms.append(float(torch.nn.utils.clip_grad_norm_(params, max_norm)))

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self._grad_norms:
            logs["grad_norm"] = statistics.fmean(self._grad_norms)
            self._grad_norms.clear()
        super().log(logs, start_time)


def ppo_config(rlhf: RLHFConfig, output_dir: str, seed: int, use_cpu: bool, world_size: int = 1) -> PPOConfig:
    """PPOConfig from our config. One PPO step = one batch of `batch_size` rollouts, then `ppo_epochs` passes over
    it in mini-batches of `mini_batch_size`, one optimizer step each (the classic TRL/paper meaning of batch and
    mini-batch: TRL 1.12 calls the rollout batch `per_device_train_batch_size` * `gradient_accumulation_steps`).
    `batch_size` and `mini_batch_size` stay global under data parallelism: each of `world_size` processes samples
    and trains on 1/world_size of them (TRL all-reduces the gradients), so a config means the same PPO at any scale.
    The ranges that do not depend on the process count are irm.config.check_all's, checked before any stage runs."""
    if rlhf.mini_batch_size % world_size:
        raise UserError(
            f"rlhf.batch_size={rlhf.batch_size} and mini_batch_size={rlhf.mini_batch_size} must be multiples of the "
            f"{world_size} processes: each process takes an equal share of every batch; change them or the process "
            "count"
        )
    if rlhf.mini_batch_size // world_size < 2:
        raise UserError(f"rlhf.mini_batch_size must be at least 2 per process ({2 * world_size} with {world_size} "
                        "processes): PPO whitens advantages within a mini-batch")
    with _quiet():
        return PPOConfig(
            output_dir=output_dir,
            seed=seed,
            use_cpu=use_cpu,
            total_episodes=rlhf.steps * rlhf.batch_size,
            per_device_train_batch_size=rlhf.batch_size // world_size,
            gradient_accumulation_steps=1,
            num_mini_batches=rlhf.batch_size // rlhf.mini_batch_size,
            local_rollout_forward_batch_size=rlhf.batch_size // world_size,
            num_ppo_epochs=rlhf.ppo_epochs,
            learning_rate=rlhf.learning_rate,
            lr_scheduler_type="constant",  # the paper's TRL (2023) PPO had no schedule; TRL 1.12 would decay linearly
            kl_coef=rlhf.kl_coef,
            max_grad_norm=rlhf.max_grad_norm,
            response_length=rlhf.response_length,
            temperature=rlhf.temperature,
            stop_token="eos",  # rollout_rule: TRL cuts the sampled response after the first end-of-text token
            bf16=rlhf.bf16,
            fp16=False,
            gradient_checkpointing=False,  # small models: memory is not the limit, recomputation would only cost time
            num_sample_generations=0,  # TRL's sample tables need an eval set and consume random numbers
            report_to="none",  # our callbacks write TensorBoard, checkpoints and the progress bar
            save_strategy="no",
            logging_steps=1,
            disable_tqdm=True,
            dataloader_num_workers=0,
        )
