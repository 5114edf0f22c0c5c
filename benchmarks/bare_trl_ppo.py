"""PPO as a TRL user writes it without irm, for ppo_overhead.py: TRL 1.12's own PPOTrainer, no callbacks, on the
same model, prompts, reward, PPOConfig, LoRA and critic as `python -m irm rlhf --config CONFIG`, and none of irm's additions
(full-state checkpoints, gradient clipping, seeded prompt order, TensorBoard scalars, progress bar, frozen garbage
collector unless --freeze-gc). Writes {"seconds": train() wall time, "steps": PPO steps} to --out.

The config is read with irm's parser and the model, prompts, reward and PPOConfig are built with irm's functions, so
both sides start from identical inputs and settings (TRL's own PPOConfig defaults differ: gradient checkpointing on,
a linear schedule, no stop token); none of that is timed. TRL needs the reward as an HF sequence classifier: irm's
adapter is that minimal wrapper (ENVIRONMENT.md describes what TRL calls), and both sides pay the same reward.

    python benchmarks/bare_trl_ppo.py --config configs/tiny.yaml --out bare.json [--rlhf.steps 4 ...]
"""

from __future__ import annotations

import _common  # noqa: F401, I001  (first: it sets TQDM_DISABLE, which tqdm reads when torch imports it)

import argparse
import copy
import gc
import json
import time


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--freeze-gc", action="store_true",
                   help="gc.freeze() before train(), as irm's rlhf stage does: TRL calls gc.collect() every step, "
                        "whose cost grows with the live objects (libraries, models) freezing exempts")
    args, rest = p.parse_known_args(argv)

    from irm.cli import parse_config

    cfg = parse_config("rlhf", rest)  # --config and dotted overrides, exactly as `python -m irm rlhf` reads them
    r = cfg.rlhf

    from datasets import Dataset
    from trl.experimental.ppo import PPOTrainer

    from irm.data import load_texts, make_prompts
    from irm.models import load_model
    from irm.reward import build_reward
    from irm.rlhf.adapter import RewardAdapter, lora_config, value_model_from
    from irm.rlhf.trainer import ppo_config
    from irm.runtime import resolve_device, seed_all

    seed_all(cfg.seed)
    device = resolve_device(cfg.device)
    policy, tokenizer = load_model(cfg.model, seed=cfg.seed, device=device)
    # The config's PPO as TRL offers it: LoRA through TRL's peft_config (the reference is the policy with its
    # adapters off), and a head-only critic as a TRL user builds one, a frozen copy of the body under a trainable head
    lora = lora_config(r, policy)
    reference = None if lora else copy.deepcopy(policy).requires_grad_(False).eval()
    if r.value_head_only:
        value = value_model_from(policy)
        value.requires_grad_(False)
        value.score.requires_grad_(True)
    else:
        value = value_model_from(policy, lora)
    texts = load_texts(cfg.corpus, cfg.corpus.split, seed=cfg.seed)
    prompts = make_prompts(texts, tokenizer, r.prompt_min_tokens, r.prompt_max_tokens, seed=cfg.seed)
    # The same PPOConfig irm builds (sampling, stop token, schedule, no gradient checkpointing, float32), so the two
    # sides do the same PPO and differ only in irm's trainer subclass, callbacks and stage around them.
    ppo = ppo_config(cfg.rlhf, str(cfg.run_dir), cfg.seed, use_cpu=device.type == "cpu")
    trainer = PPOTrainer(
        args=ppo,
        processing_class=tokenizer,
        model=policy,
        ref_model=reference,
        reward_model=RewardAdapter(build_reward(cfg.reward, device=device), tokenizer),
        train_dataset=Dataset.from_dict({"input_ids": prompts}),
        value_model=value,
        peft_config=lora,
    )
    t0 = time.perf_counter()
    if args.freeze_gc:
        gc.collect()
        gc.freeze()
    trainer.train()
    seconds = time.perf_counter() - t0
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump({"seconds": seconds, "steps": r.steps}, f)


if __name__ == "__main__":
    main()
