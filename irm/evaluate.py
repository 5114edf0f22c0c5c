"""`python -m irm evaluate-reward`: paper table 7. The mean reward of N completions (default 1000, 30 new tokens)
sampled from the base and the tuned model for 30-token prefixes of held-out texts, with 95% t-intervals and the
paired tuned-minus-base difference. Each finished batch is journalled, so a killed run never redoes one."""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Callable

from irm.artifacts import append_jsonl, read_jsonl, write_json, write_text
from irm.config import EvaluateConfig, RunConfig
from irm.errors import UserError
from irm.runtime import progress, resolve_device, seed_all
from irm.stats import mean_ci
from irm.stages import is_done, mark_done, open_run_dir, stage_fingerprint

STAGE = "evaluate-reward"
OUTPUT = "reward_eval.json"
N_EXAMPLES = 3  # completions of each model quoted in the JSON, for a reader to see what the numbers mean


def batch_seed(seed: int, batch: int) -> int:
    """The sampling seed of one batch: the same for base and tuned (a paired comparison: both models see the same
    prefixes and the same random draws) and independent of which batches already ran (resuming)."""
    return seed * 1_000_003 + batch


def sample_rewards(model, tokenizer, prompts: list[list[int]], reward_fn: Callable, ecfg: EvaluateConfig, seed: int,
                   journal: Path, fp: str, desc: str) -> list[dict]:
    """Sample up to `ecfg.new_tokens` tokens after every prompt (top_k 0, top_p 1, temperature 1: the policy's own
    distribution, as in PPO), score prefix+completion with `reward_fn`; one journal record per batch of
    `ecfg.batch_size`. Returns the records of every batch in order."""
    import torch

    records = read_jsonl(journal)
    done = {r["batch"]: r for r in records if r.get("fingerprint") == fp}
    if len(done) != len(records):  # a journal from another config or model: start it over
        write_text(journal, "")
    n_batches = math.ceil(len(prompts) / ecfg.batch_size)
    # A completion ends at the end-of-text token or after new_tokens tokens, as in PPO training.
    generation = dict(do_sample=True, top_k=0, top_p=1.0, temperature=1.0, max_new_tokens=ecfg.new_tokens,
                      eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    device = next(model.parameters()).device
    model.eval()
    with progress(desc=desc, total=n_batches, unit="batch") as bar:
        bar.update(sum(b < n_batches for b in done))
        for b in range(n_batches):
            if b in done:
                continue
            chunk = prompts[b * ecfg.batch_size:(b + 1) * ecfg.batch_size]
            batch = tokenizer.pad({"input_ids": chunk}, padding=True, return_tensors="pt").to(device)
            torch.manual_seed(batch_seed(seed, b))
            with torch.inference_mode():
                out = model.generate(**batch, **generation)
            new = out[:, batch["input_ids"].shape[1]:]
            texts = tokenizer.batch_decode(out, skip_special_tokens=True)
            record = {"batch": b, "fingerprint": fp, "rewards": [float(r) for r in reward_fn(texts)],
                      "completions": tokenizer.batch_decode(new, skip_special_tokens=True)}
            append_jsonl(journal, record)
            done[b] = record
            bar.update(1)
    return [done[b] for b in range(n_batches)]


def run(cfg: RunConfig) -> None:
    ecfg = cfg.evaluate
    out = Path(cfg.run_dir)
    if is_done(cfg, STAGE):
        print(f"irm evaluate-reward: up to date: {out / OUTPUT}; nothing to do", file=sys.stderr)
        return
    if ecfg.n < 2 or ecfg.batch_size < 1 or ecfg.new_tokens < 1:
        raise UserError(f"evaluate.n={ecfg.n}, batch_size={ecfg.batch_size}, new_tokens={ecfg.new_tokens}: need n >= 2 "
                        "(for an interval), batch_size >= 1 and new_tokens >= 1 (paper table 7: 1000, -, 30)")
    import numpy as np
    from scipy import stats

    from irm.data import load_texts, prefixes
    from irm.models import load_model, load_tuned
    from irm.reward import build_reward

    open_run_dir(cfg)
    device = resolve_device(cfg.device)
    seed_all(cfg.seed)
    fp = stage_fingerprint(cfg, STAGE)
    reward_fn = build_reward(cfg.reward, device=device)

    # The tuned model first: a run without one fails before any sampling. One model in memory at a time; both
    # share the base tokenizer (the rlhf stage saved it with the policy).
    tuned, tokenizer = load_tuned(cfg, device=device)
    pool = prefixes(load_texts(cfg.corpus, cfg.corpus.eval_split, seed=cfg.seed), tokenizer, ecfg.prefix_tokens)
    if not pool:
        raise UserError(f"no text of corpus split {cfg.corpus.eval_split!r} has {ecfg.prefix_tokens} tokens; lower "
                        "evaluate.prefix_tokens or use a corpus with longer texts")
    # Fewer prefixes than completions: prefixes repeat, each repeat with its own sampled completion.
    prompts = [pool[i % len(pool)] for i in range(ecfg.n)]

    def sample(model, label: str) -> list[dict]:
        return sample_rewards(model, tokenizer, prompts, reward_fn, ecfg, cfg.seed,
                              out / "evaluate" / f"{label}.jsonl", fp, desc=f"{label} completions")

    records = {"tuned": sample(tuned, "tuned")}
    del tuned  # one model in memory at a time
    records["base"] = sample(load_model(cfg.model, seed=cfg.seed, device=device)[0], "base")
    rewards = {label: np.concatenate([r["rewards"] for r in recs]) for label, recs in records.items()}
    completions = {label: [c for r in recs for c in r["completions"]] for label, recs in records.items()}
    difference = mean_ci(rewards["tuned"] - rewards["base"])
    difference["p_value"] = float(stats.ttest_rel(rewards["tuned"], rewards["base"]).pvalue)
    result = {
        "base": mean_ci(rewards["base"]),
        "tuned": mean_ci(rewards["tuned"]),
        "difference": difference,  # paired: same prefixes, same random seeds
        "new_tokens": ecfg.new_tokens,
        "prefix_tokens": ecfg.prefix_tokens,
        "n_prefixes": min(len(pool), ecfg.n),
        "split": cfg.corpus.eval_split,
        "reward": cfg.reward.kind,
        "examples": [
            {"prefix": tokenizer.decode(prompts[i], skip_special_tokens=True),
             "base": completions["base"][i], "base_reward": float(rewards["base"][i]),
             "tuned": completions["tuned"][i], "tuned_reward": float(rewards["tuned"][i])}
            for i in range(min(N_EXAMPLES, ecfg.n))
        ],
    }
    write_json(out / OUTPUT, result)
    mark_done(cfg, STAGE, [OUTPUT])
    b, t = result["base"], result["tuned"]
    print(f"irm evaluate-reward: mean reward of {ecfg.n} completions ({ecfg.new_tokens} new tokens): base "
          f"{b['mean']:.3f} [{b['ci95'][0]:.3f}, {b['ci95'][1]:.3f}], tuned {t['mean']:.3f} "
          f"[{t['ci95'][0]:.3f}, {t['ci95'][1]:.3f}]; written to {out / OUTPUT}", file=sys.stderr)
