"""`python -m irm evaluate-reward`: paper table 7. The mean reward of N completions (default 1000, 30 new tokens)
sampled from the base and the tuned model for 30-token prefixes of held-out texts, with 95% t-intervals and the
paired tuned-minus-base difference. Completions follow the run's one sampling rule (irm.sampling: as PPO sampled
them, ending at end-of-text), prompt i drawn with the same seed for both models. Each finished batch is journalled,
so a killed run never redoes one.

`reward_eval.json` (read by the report and the findings table):
- `base`, `tuned`: {"mean", "ci95": [low, high], "n"} of each model's rewards (t-interval);
- `paired`: tuned - base on the same prompts: {"mean_diff", "ci": 95% t-interval [low, high], "bootstrap_ci": 95%
  BCa bootstrap interval, "p_value": two-sided paired t-test (scipy.stats.ttest_rel), "n": number of pairs};
- `difference`: the same as {"mean", "ci95", "p_value", "n"} (older name, kept for readers of it);
- `sampling`: the rule (max_new_tokens, stop_at_eos, temperature, top_k, top_p); `new_tokens`, `prefix_tokens`,
  `n_prefixes` (distinct prefixes), `split`, `reward`, `examples`."""

from __future__ import annotations

import dataclasses
import math
import sys
from pathlib import Path
from typing import Callable, Optional

from irm.artifacts import fingerprint, read_jsonl, write_json, write_text
from irm.config import RunConfig
from irm.errors import UserError
from irm.parallel import Ranks
from irm.runtime import start
from irm.sampling import SamplingRule, journalled_batches, sample_prompts
from irm.sampling import rule as sampling_rule
from irm.stats import mean_ci, tuned_minus_base
from irm.stages import is_done, mark_done, open_run_dir, stage_fingerprint
from irm.stages import relpath

STAGE = "evaluate-reward"
OUTPUT = relpath("reward_eval")
N_EXAMPLES = 3  # completions of each model quoted in the JSON, for a reader to see what the numbers mean
SAMPLER = "per-prompt-gumbel-1"  # journals of an older sampler are not reused


def sample_rewards(model, tokenizer, prompts: list[list[int]], reward_fn: Callable, rule: SamplingRule, seed: int,
                   batch_size: int, journal: Path, fp: str, desc: str) -> list[dict]:
    """One completion per prompt under the run's sampling `rule` (irm.sampling: the rule PPO trained with), prompt i
    drawn with seed `prompt_seed(seed, i)` (the same for base and tuned: a paired comparison with common random
    numbers, independent of batching and resuming); prefix+completion scored by `reward_fn`; one journal record per
    batch of `batch_size`. Returns the records of every batch in order."""
    records = read_jsonl(journal)
    done = {r["batch"]: r for r in records if r.get("fingerprint") == fp}
    if len(done) != len(records):  # a journal from another config or model: start it over
        write_text(journal, "")
    n_batches = math.ceil(len(prompts) / batch_size)
    model.eval()

    def step(indices: list[int]) -> dict:
        out = sample_prompts(model, tokenizer, prompts, indices, rule, seed)
        return {"batch": indices[0] // batch_size, "fingerprint": fp,
                "rewards": [float(r) for r in reward_fn(out.texts)], "completions": out.completions}

    # Finished batches are whole batches of the grid, so the rest, cut into batch_size pieces, is the rest of the grid.
    todo = [i for i in range(len(prompts)) if i // batch_size not in done]
    for _, record in journalled_batches(Ranks(), journal, todo, len(prompts), batch_size, step, desc):
        done[record["batch"]] = record
    return [done[b] for b in range(n_batches)]


def planted_split(reward_fn, completions: dict) -> Optional[dict]:
    """For a lexicon reward that plants words (values of another sign than VADER's: `irm.reward.planted_words`),
    the paired tuned - base difference of what the planted words in the completions contribute to the reward, and of
    what the other words do (`LexiconReward.split_sums`, not clipped; the shared prefixes cancel in the pairing): did
    PPO learn the planted words, or the words the planted reward still shares with VADER? None otherwise."""
    from irm.reward import LexiconReward, planted_words

    if not isinstance(reward_fn, LexiconReward):
        return None
    planted = planted_words(reward_fn.lexicon)
    if not planted:
        return None
    parts = {label: reward_fn.split_sums(texts, planted) for label, texts in completions.items()}
    return {"n_planted_words": len(planted),
            "planted_words": tuned_minus_base(parts["tuned"][0], parts["base"][0]),
            "other_words": tuned_minus_base(parts["tuned"][1], parts["base"][1]),
            "what": "tuned - base, paired, of each completion's lexicon sum over the planted words (and over the "
                    "other words) divided by reward.scale, not clipped; completions only, so the shared prefix "
                    "does not enter"}


def run(cfg: RunConfig) -> None:
    ecfg = cfg.evaluate_reward
    out = Path(cfg.run_dir)
    if is_done(cfg, STAGE):
        print(f"irm evaluate-reward: up to date: {out / OUTPUT}; nothing to do", file=sys.stderr)
        return
    import numpy as np

    from irm.data import load_texts, prefixes
    from irm.models import load_model, load_tuned
    from irm.reward import build_reward

    open_run_dir(cfg)
    device = start(cfg.seed, cfg.device)
    rule = sampling_rule(cfg.rlhf, ecfg.new_tokens)
    fp = fingerprint(stage_fingerprint(cfg, STAGE), SAMPLER, dataclasses.asdict(rule))
    reward_fn = build_reward(cfg.reward, device=device)

    # The tuned model first: a run without one fails before any sampling. One model in memory at a time; both
    # share the base tokenizer (the rlhf stage saved it with the policy).
    tuned, tokenizer = load_tuned(cfg, device=device)
    pool = prefixes(load_texts(cfg.corpus, cfg.corpus.eval_split, seed=cfg.seed), tokenizer, ecfg.prefix_tokens)
    if not pool:
        raise UserError(f"no text of corpus split {cfg.corpus.eval_split!r} has {ecfg.prefix_tokens} tokens; lower "
                        "evaluate_reward.prefix_tokens or use a corpus with longer texts")
    # Fewer prefixes than completions: prefixes repeat, each repeat with its own sampled completion.
    prompts = [pool[i % len(pool)] for i in range(ecfg.n)]

    def draw(model, label: str) -> list[dict]:
        return sample_rewards(model, tokenizer, prompts, reward_fn, rule, cfg.seed, ecfg.batch_size,
                              out / "evaluate" / f"{label}.jsonl", fp, desc=f"{label} completions")

    records = {"tuned": draw(tuned, "tuned")}
    del tuned  # one model in memory at a time
    records["base"] = draw(load_model(cfg.model, seed=cfg.seed, device=device)[0], "base")
    rewards = {label: np.concatenate([r["rewards"] for r in recs]) for label, recs in records.items()}
    completions = {label: [c for r in recs for c in r["completions"]] for label, recs in records.items()}
    paired = tuned_minus_base(rewards["tuned"], rewards["base"])
    result = {
        "base": mean_ci(rewards["base"]),
        "tuned": mean_ci(rewards["tuned"]),
        "paired": paired,  # tuned - base: same prefixes, same random numbers
        # the same numbers under the names report.py has read since table 7 first had a difference row
        "difference": {"mean": paired["mean_diff"], "ci95": paired["ci"], "p_value": paired["p_value"],
                       "n": paired["n"]},
        "sampling": dataclasses.asdict(rule),
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
    split = planted_split(reward_fn, completions)
    if split:
        result["planted_part"] = split
    write_json(out / OUTPUT, result)
    mark_done(cfg, STAGE, [OUTPUT])
    b, t, d = result["base"], result["tuned"], paired
    print(f"irm evaluate-reward: mean reward of {ecfg.n} completions ({ecfg.new_tokens} new tokens): base "
          f"{b['mean']:.3f} [{b['ci95'][0]:.3f}, {b['ci95'][1]:.3f}], tuned {t['mean']:.3f} "
          f"[{t['ci95'][0]:.3f}, {t['ci95'][1]:.3f}]; paired tuned - base {d['mean_diff']:+.3f} "
          f"[{d['ci'][0]:+.3f}, {d['ci'][1]:+.3f}], p = {d['p_value']:.2g}; written to {out / OUTPUT}", file=sys.stderr)
