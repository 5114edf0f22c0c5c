"""`python -m irm ablate` (paper 5.2, table 5): mean reward of the tuned model's completions before and after
zero-ablating, inside each chosen layer's SAE, the features the explainer labelled "related to the reward", with the
controls the paper lacks: the SAE splice with nothing ablated, and as many randomly chosen features ablated.

Features are zeroed in the SAE's code space, never as dimensions of the reconstruction (the authors' mistake). Two
splice modes: `reconstruction` replaces the site output by the SAE's reconstruction (the paper's), `error` keeps
the SAE's error term so only the ablated features' decoder contribution is removed (nothing ablated = the model).
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np

from irm.artifacts import RunDir, append_jsonl, fingerprint, read_jsonl, write_json
from irm.config import RunConfig
from irm.errors import UserError
from irm.runtime import progress, resolve_device, seed_all
from irm.stats import mean_ci

MODES = ("reconstruction", "error")
DICTIONARY = 1  # the explainer labels features of the 1x dictionary (irm.explain.related_features)


def check_modes(modes: list[str]) -> None:
    if not modes or any(m not in MODES for m in modes):
        raise UserError(f"ablate.modes {list(modes)} must be a non-empty subset of {list(MODES)}")


def intervention(sae, features: list[int], mode: str) -> Callable:
    """The function `irm.models.splice` applies to a layer's site output: encode with `sae`, zero `features` in the
    codes, and return the reconstruction (`reconstruction`) or the output minus the zeroed features' decoder
    contribution (`error`)."""
    import torch

    check_modes([mode])
    sae_dtype = next(sae.parameters()).dtype
    index = torch.as_tensor(features, dtype=torch.long)

    def fn(out_BSD):
        codes_BSF = sae.encode(out_BSD.to(sae_dtype))
        kept_BSF = codes_BSF.index_fill(-1, index.to(codes_BSF.device), 0.0)
        if mode == "reconstruction":
            return sae.decode(kept_BSF).to(out_BSD.dtype)
        # Both decodes run the same arithmetic, so with nothing zeroed the difference is exactly 0 and the model
        # is reproduced bit for bit; with features zeroed it is their decoder contribution (decode is affine).
        removed_BSD = sae.decode(codes_BSF) - sae.decode(kept_BSF)
        return out_BSD - removed_BSD.to(out_BSD.dtype)

    return fn


def draw_random_features(
    features: dict[int, list[int]], widths: dict[int, int], draws: int, seed: int
) -> list[dict[int, list[int]]]:
    """`draws` control sets: per layer, as many features as `features[layer]`, drawn without replacement from the
    layer's other features (never a labelled one). Draw d depends only on (seed, d), so adding draws keeps the old."""
    out = []
    for d in range(draws):
        rng = np.random.default_rng([seed, d])
        drawn = {}
        for layer in sorted(features):
            labelled = set(features[layer])
            others = np.array([i for i in range(widths[layer]) if i not in labelled], dtype=np.int64)
            if len(labelled) > len(others):
                raise UserError(
                    f"layer {layer}: {len(labelled)} of {widths[layer]} features are labelled related, too few are "
                    f"left for a random control of the same size; label fewer features (explain.max_features)"
                )
            drawn[layer] = sorted(int(i) for i in rng.choice(others, size=len(labelled), replace=False))
        out.append(drawn)
    return out


def prompt_seed(seed: int, index: int) -> int:
    """The sampling seed of prompt `index`: the same in every condition, batch, resume and (later) device shard."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1, np.uint64)[0])


def _per_prompt_sampler(seeds: list[int]):
    """A logits processor that, followed by greedy decoding, samples at temperature 1 with top_k 0 and top_p 1.

    Gumbel-max: argmax(logits + Gumbel noise) is a draw from softmax(logits). Each row gets its noise from its own
    generator, so a prompt's draw does not depend on which batch it is in, and every condition sees the same noise
    for the same prompt at the same step (common random numbers: conditions differ only by the intervention)."""
    import torch
    from transformers import LogitsProcessor

    class PerPromptSampler(LogitsProcessor):
        def __init__(self):
            self.generators = None

        def __call__(self, input_ids, scores):
            if self.generators is None:
                self.generators = [torch.Generator(device=scores.device).manual_seed(s) for s in seeds]
            u = torch.stack(
                [torch.rand(scores.shape[-1], generator=g, device=scores.device) for g in self.generators]
            )
            gumbel = -torch.log(-torch.log(u.clamp_min(torch.finfo(u.dtype).tiny)))
            return scores + gumbel.to(scores.dtype)

    return PerPromptSampler()


def generate(model, tokenizer, prompts: list[list[int]], seeds: list[int], new_tokens: int) -> list[str]:
    """Prefix + `new_tokens` sampled tokens of each prompt as text (left-padded batch; special tokens dropped)."""
    import torch
    from transformers import GenerationConfig, LogitsProcessorList

    batch = tokenizer.pad({"input_ids": prompts}, return_tensors="pt").to(model.device)
    # No end-of-text stop: completions of exactly new_tokens tokens, as PPO sampled them (stop_token None).
    plain = GenerationConfig(
        max_new_tokens=new_tokens,
        do_sample=False,  # the sampling is the Gumbel noise added by the processor
        num_beams=1,
        pad_token_id=tokenizer.pad_token_id,
    )
    # generate() fills every field left unset from model.generation_config (an eos token that would stop early, a
    # hub model's repetition penalty, ...): swap ours in so nothing but the policy's own distribution is sampled.
    saved, model.generation_config = model.generation_config, plain
    try:
        with torch.inference_mode():
            out = model.generate(**batch, logits_processor=LogitsProcessorList([_per_prompt_sampler(seeds)]))
    finally:
        model.generation_config = saved
    completions = out[:, batch["input_ids"].shape[1]:].tolist()
    return [tokenizer.decode(p + c, skip_special_tokens=True) for p, c in zip(prompts, completions)]


def condition_rewards(path, n_prompts: int, batch_size: int, score_batch: Callable, desc: str) -> np.ndarray:
    """Rewards of prompts 0..n_prompts-1 under one condition. Finished batches are appended to the JSON-lines file
    `path` ({"prompts", "rewards", "texts"}) and read back on a rerun, so a killed run never redoes a batch.
    `score_batch(indices) -> (texts, rewards)`; batches are lists of prompt indices, so they could be sharded."""
    done: dict[int, float] = {}
    for rec in read_jsonl(path):
        done.update(zip(rec["prompts"], rec["rewards"]))
    todo = [i for i in range(n_prompts) if i not in done]
    with progress(desc=desc, total=n_prompts, unit="prompt") as bar:
        bar.update(n_prompts - len(todo))
        for start in range(0, len(todo), batch_size):
            indices = todo[start : start + batch_size]
            texts, rewards = score_batch(indices)
            append_jsonl(path, {"prompts": indices, "rewards": [float(r) for r in rewards], "texts": texts})
            done.update(zip(indices, rewards))
            bar.update(len(indices))
    return np.array([done[i] for i in range(n_prompts)], dtype=np.float64)


def _paired(rewards: np.ndarray, before: np.ndarray) -> dict:
    return {**mean_ci(rewards), "diff_vs_before": mean_ci(rewards - before)}


def _random_summary(draw_rewards: np.ndarray, draws: list[dict], before: np.ndarray) -> dict:
    """draw_rewards [draws, prompts]: pooled over all samples, over per-draw means, and paired per prompt (the
    prompt's mean over draws minus its reward before)."""
    return {
        **mean_ci(draw_rewards),
        "per_draw_means": mean_ci(draw_rewards.mean(axis=1)),
        "diff_vs_before": mean_ci(draw_rewards.mean(axis=0) - before),
        "draws": [{"features": _json_features(f), **mean_ci(r)} for f, r in zip(draws, draw_rewards)],
    }


def _json_features(features: dict[int, list[int]]) -> dict[str, list[int]]:
    return {str(layer): list(ix) for layer, ix in sorted(features.items())}


def _fmt(s: dict) -> str:
    ci = s["ci95"]
    return f"{s['mean']:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")


def run(cfg: RunConfig) -> dict:
    """Generate under every condition, score, and write `<run_dir>/ablation.json`; returns its content."""
    from irm.data import load_texts, prefixes
    from irm.divergence import chosen_layers
    from irm.explain import related_features
    from irm.models import load_tuned, n_layers, site_width, splice
    from irm.reward import build_reward
    from irm.sae import load_sae, sae_dir
    from irm.stages import mark_done

    seed_all(cfg.seed)
    device = resolve_device(cfg.device)
    a = cfg.ablate
    rd = RunDir(cfg.run_dir)
    check_modes(a.modes)  # before the model loads and generates

    model, tokenizer = load_tuned(cfg, device)
    layers = sorted(chosen_layers(cfg, n_layers(model)))
    related = {int(layer): sorted({int(i) for i in ix}) for layer, ix in related_features(cfg.run_dir).items() if ix}
    stray = sorted(set(related) - set(layers))
    if stray:
        raise UserError(
            f"features are labelled related at layer(s) {stray}, which are not among the chosen layers {layers}; "
            f"rerun `python -m irm explain` with this config"
        )
    width = site_width(model, cfg.cache.site)
    saes = {layer: load_sae(sae_dir(cfg.run_dir, layer, DICTIONARY), d_in=width, device=device) for layer in layers}
    widths = {layer: int(sae.dictionary.shape[0]) for layer, sae in saes.items()}
    for layer, ix in related.items():
        if ix[-1] >= widths[layer]:
            raise UserError(
                f"feature {ix[-1]} is labelled at layer {layer} but its SAE has {widths[layer]} features; "
                f"rerun `python -m irm explain` after `python -m irm sae`"
            )
    features = {layer: related.get(layer, []) for layer in layers}
    n_features = sum(len(ix) for ix in features.values())
    random_sets = draw_random_features(features, widths, a.random_draws, cfg.seed)

    # The whole split, not n_prompts texts: prefixes() drops texts shorter than prefix_tokens.
    texts = load_texts(cfg.corpus, cfg.corpus.eval_split, seed=cfg.seed)
    prompts = prefixes(texts, tokenizer, a.prefix_tokens)[: a.n_prompts]
    if len(prompts) < a.n_prompts:
        raise UserError(
            f"ablate.n_prompts is {a.n_prompts} but the {cfg.corpus.eval_split!r} split gives only {len(prompts)} "
            f"prefixes of {a.prefix_tokens} tokens; lower ablate.n_prompts or ablate.prefix_tokens, or raise "
            f"corpus.n_documents"
        )
    seeds = [prompt_seed(cfg.seed, i) for i in range(len(prompts))]
    reward = build_reward(cfg.reward, device)

    # A condition's results are keyed by what they depend on, not by its name: conditions that are the same
    # intervention (e.g. "ablated" and "splice" when nothing is labelled) share one file and run once, and a
    # changed policy, SAE, corpus or sampling setting never reuses stale rewards.
    stamps = {s: (rd.stage_record(s) or {}).get("completed_at") for s in ("rlhf", "sae")}
    common = (cfg.seed, cfg.corpus, cfg.reward, cfg.cache.site, a.prefix_tokens, a.new_tokens, stamps)
    used: list = []

    def rewards_of(desc: str, mode: str | None, ablate: dict[int, list[int]] | None) -> np.ndarray:
        key = fingerprint(common, mode, None if ablate is None else _json_features(ablate))
        path = rd.path("ablate", f"{mode or 'model'}-{key}.jsonl")
        used.append(path)
        fns = {} if ablate is None else {layer: intervention(saes[layer], ablate[layer], mode) for layer in layers}

        def score_batch(indices: list[int]):
            with splice(model, fns, site=cfg.cache.site):
                out = generate(model, tokenizer, [prompts[i] for i in indices], [seeds[i] for i in indices],
                               a.new_tokens)
            return out, reward(out)

        return condition_rewards(path, len(prompts), a.batch_size, score_batch, f"ablate {desc}")

    before = rewards_of("model", None, None)
    nothing = {layer: [] for layer in layers}
    modes = {}
    for mode in a.modes:
        splice_r = rewards_of(f"{mode} splice", mode, nothing)
        ablated_r = rewards_of(f"{mode} ablated", mode, features)
        modes[mode] = {"splice": _paired(splice_r, before), "ablated": _paired(ablated_r, before)}
        if random_sets:
            draw_r = np.stack([rewards_of(f"{mode} random {d + 1}/{len(random_sets)}", mode, f)
                               for d, f in enumerate(random_sets)])
            modes[mode]["random"] = _random_summary(draw_r, random_sets, before)

    before_s = mean_ci(before)
    after_mode = "reconstruction" if "reconstruction" in modes else a.modes[0]
    after = modes[after_mode]["ablated"]
    result = {
        "n_prompts": len(prompts),
        "new_tokens": a.new_tokens,
        "prefix_tokens": a.prefix_tokens,
        "layers": layers,
        "site": cfg.cache.site,
        "features": _json_features(features),
        "n_features": n_features,
        "random_draws": len(random_sets),
        "model": before_s,
        "modes": modes,
        "before": {"mean": before_s["mean"], "ci95": before_s["ci95"]},
        "after": {"mean": after["mean"], "ci95": after["ci95"], "mode": after_mode},
    }
    if n_features == 0:
        result["note"] = "no feature is labelled related: 'ablated' and 'random' are the splice with nothing ablated"
    write_json(rd.path("ablation.json"), result)
    mark_done(cfg, "ablate", ["ablation.json", *sorted(set(used))])

    print(f"irm ablate: mean reward over {len(prompts)} prompts, 95% CI; {n_features} labelled feature(s) "
          f"at layers {sorted(related)}" + (" (none labelled: controls only)" if n_features == 0 else ""))
    print(f"  before (tuned model)        {_fmt(before_s)}")
    for mode, conds in modes.items():
        for name in ("splice", "ablated", "random"):
            if name in conds:
                c = conds[name]
                print(f"  {mode + ' ' + name:<27} {_fmt(c)}   vs before {_fmt(c['diff_vs_before'])}")
    return result
