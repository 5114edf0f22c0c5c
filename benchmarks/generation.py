"""Tokens per second of irm's sampler (irm.sampling.sample: left-padded batches, KV cache, per-prompt seeded
Gumbel-max noise, the path evaluate-reward and ablate take) against a bare `model.generate` loop (transformers'
multinomial sampling, `do_sample=True`) over the same prompts, batches and lengths, interleaved repetitions.

The prompts are evaluate-reward's: `evaluate_reward.prefix_tokens`-token prefixes of the held-out corpus split, in batches of
`evaluate_reward.batch_size`, `evaluate_reward.new_tokens` new tokens each. Both sides sample without the end-of-text stop here, so
both generate exactly batch x new_tokens tokens and a side cannot win by drawing shorter completions.

    python benchmarks/generation.py --threads 2 --json benchmarks/results/generation.json
"""

from __future__ import annotations

import _common  # noqa: F401, I001  (first: it sets TQDM_DISABLE)

import sys
import time

from _common import ROOT, base_parser, environment, median, parse_args, ratio_median, table, warm_up_cpu, write_json


def bare(model, tokenizer, batches, new_tokens: int) -> float:
    """What a user would write: pad each batch, call generate with sampling on; seconds for all batches."""
    import torch

    t0 = time.perf_counter()
    for prompts in batches:
        batch = tokenizer.pad({"input_ids": prompts}, padding=True, return_tensors="pt")
        with torch.inference_mode():
            model.generate(**batch, do_sample=True, top_k=0, top_p=1.0, temperature=1.0, max_new_tokens=new_tokens,
                           min_new_tokens=new_tokens, pad_token_id=tokenizer.pad_token_id)
    return time.perf_counter() - t0


def irm(model, tokenizer, batches, new_tokens: int) -> float:
    from irm.sampling import SamplingRule, prompt_seed, sample

    rule = SamplingRule(new_tokens, stop_at_eos=False)
    t0 = time.perf_counter()
    start = 0
    for prompts in batches:
        sample(model, tokenizer, prompts, rule, [prompt_seed(0, start + i) for i in range(len(prompts))])
        start += len(prompts)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> None:
    p = base_parser(__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "quickstart.yaml"))
    p.add_argument("--prompts", type=int, default=128, help="prompts per repetition")
    p.add_argument("--reps", type=int, default=3)
    args = parse_args(p, argv)
    from irm.cli import parse_config
    from irm.data import load_texts, prefixes
    from irm.models import load_model

    cfg = parse_config("evaluate-reward", ["--config", args.config] + (
        ["--model.name", "tiny-llama"] if args.quick else []))
    e = cfg.evaluate_reward
    n, reps = (8, 1) if args.quick else (args.prompts, args.reps)
    model, tokenizer = load_model(cfg.model, seed=cfg.seed, device="cpu")
    model.eval()
    pool = prefixes(load_texts(cfg.corpus, cfg.corpus.eval_split, seed=cfg.seed), tokenizer, e.prefix_tokens)
    prompts = [pool[i % len(pool)] for i in range(n)]
    batches = [prompts[i:i + e.batch_size] for i in range(0, n, e.batch_size)]
    tokens = n * e.new_tokens
    if not args.quick:
        warm_up_cpu()
        bare(model, tokenizer, batches[:1], 2)  # first calls: allocator, kernels
        irm(model, tokenizer, batches[:1], 2)
    seconds = {"irm": [], "bare": []}
    for rep in range(reps):
        sides = [("irm", irm), ("bare", bare)][:: 1 if rep % 2 == 0 else -1]
        for name, fn in sides:
            seconds[name].append(fn(model, tokenizer, batches, e.new_tokens))
        print(f"rep {rep + 1}/{reps}: irm {tokens / seconds['irm'][-1]:.0f}, bare {tokens / seconds['bare'][-1]:.0f} "
              "tokens/s", file=sys.stderr)
    result = {
        "model": cfg.model.name, "prompts": n, "batch_size": e.batch_size, "prefix_tokens": e.prefix_tokens,
        "new_tokens": e.new_tokens, "reps": reps,
        "irm_tokens_per_s": tokens / median(seconds["irm"]), "bare_tokens_per_s": tokens / median(seconds["bare"]),
        # tokens/s ratio irm / bare = time ratio bare / irm, per repetition (back-to-back pairs), then the median
        "irm_over_bare": ratio_median(seconds["bare"], seconds["irm"]),
    }
    write_json(args.json, {"results": [result], "settings": environment()})
    print(table(["model", "prompts", "batch", "new tokens", "irm tokens/s", "bare generate tokens/s", "irm / bare"],
                [[result["model"], n, e.batch_size, e.new_tokens, result["irm_tokens_per_s"],
                  result["bare_tokens_per_s"], result["irm_over_bare"]]]))


if __name__ == "__main__":
    main()
