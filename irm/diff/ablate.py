"""Do the tuned-specific latents carry the reward? (README "Model diffing", issue 27.) Their directions are ablated in
the tuned model while it completes the ablate stage's prompts, against random sets of shared latents matched on
firing frequency, paired on prompts, as the ablate stage compares labelled SAE features with random ones.

The ablation is directional: at each layer the activations lose their projection on the span of the ablated latents'
tuned decoder rows (in raw activation units), x - Q Q^T x with Q an orthonormal basis of that span. A crosscoder's
codes need the base model's activations too, which generation does not have; a tuned-specific latent is one whose
direction the base model lacks, so removing the direction removes the latent (and anything else along it, which
the matched shared latents' directions remove as much of in the control). The statistic and interval are
`irm.stats.difference_vs_draws` (t prediction interval over draws), calibrated as "ablation_vs_random"."""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch


def projection_out(directions_KD: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """x -> x - Q Q^T x for Q an orthonormal basis of the rows of `directions_KD` (what `irm.models.splice` applies
    to a layer's site output)."""
    q_DK, _ = torch.linalg.qr(directions_KD.double().t())

    def fn(x_BSD: torch.Tensor) -> torch.Tensor:
        q = q_DK.to(x_BSD.device, x_BSD.dtype)
        return x_BSD - (x_BSD @ q) @ q.t()

    return fn


def matched_draws(specific: dict[int, list[int]], fired: dict[int, np.ndarray], shared: dict[int, np.ndarray],
                  draws: int, pool: int, seed: int) -> list[dict[int, list[int]]]:
    """`draws` random sets of shared latents, per layer as many as it has tuned-specific ones, each drawn among the
    `pool` shared latents nearest in firing count to one tuned-specific latent (without repeats within a set)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(draws):
        chosen: dict[int, list[int]] = {}
        for layer, ix in specific.items():
            candidates = np.flatnonzero(shared[layer])
            taken: list[int] = []
            for j in ix:
                free = np.setdiff1d(candidates, taken)
                if not len(free):
                    break
                near = free[np.argsort(np.abs(fired[layer][free] - fired[layer][j]), kind="stable")[:pool]]
                taken.append(int(rng.choice(near)))
            chosen[layer] = taken
        out.append(chosen)
    return out


def ablate_specific(cfg, device, a, sampling, directions: dict[int, torch.Tensor], specific: dict[int, list[int]],
                    fired: dict[int, np.ndarray], shared: dict[int, np.ndarray]) -> dict:
    """The reward of the tuned model's completions of the ablate stage's prompts (`a`, the AblateConfig: n_prompts,
    prefix_tokens, new_tokens, batch_size, random_draws, match_pool; `sampling`, the run's sampling rule at
    a.new_tokens) with the tuned-specific latents' directions ablated, against matched shared latents'
    (`difference_vs_draws`) and against the unablated model (`paired_difference`). `directions`: per layer the
    crosscoder's tuned decoder rows [F, D] (normalised units: only their directions count)."""
    from irm.stats import difference_vs_draws, paired_difference
    from irm.data import load_texts, prefixes
    from irm.models import load_tuned, splice
    from irm.reward import build_reward
    from irm.runtime import progress
    from irm.sampling import sample_prompts
    from irm.stats import mean_ci

    model, tokenizer = load_tuned(cfg, device)
    prompts = prefixes(load_texts(cfg.corpus, cfg.corpus.eval_split, seed=cfg.seed), tokenizer,
                       a.prefix_tokens)[: a.n_prompts]
    reward = build_reward(cfg.reward, device)

    def rewards(ablated: dict[int, list[int]] | None, desc: str) -> np.ndarray:
        fns = {layer: projection_out(directions[layer][ix]) for layer, ix in (ablated or {}).items() if ix}
        out = []
        for start in progress(range(0, len(prompts), a.batch_size), desc=f"diff ablate {desc}"):
            indices = list(range(start, min(len(prompts), start + a.batch_size)))
            with splice(model, fns, site=cfg.cache.site):
                texts = sample_prompts(model, tokenizer, prompts, indices, sampling, cfg.seed).texts
            out.extend(reward(texts))
        return np.asarray(out, dtype=np.float64)

    sets = matched_draws(specific, fired, shared, a.random_draws, a.match_pool, cfg.seed)
    before = rewards(None, "model")
    ablated = rewards(specific, "tuned-specific")
    draws = np.stack([rewards(s, f"matched shared {d + 1}/{len(sets)}") for d, s in enumerate(sets)])
    return {"n_prompts": len(prompts), "new_tokens": a.new_tokens, "latents": {str(k): v for k, v in specific.items()},
            "before": mean_ci(before), "ablated": mean_ci(ablated),
            "ablated_minus_before": paired_difference(ablated, before),
            "ablated_minus_matched": difference_vs_draws(ablated, draws),
            "matched_sets": [{str(k): v for k, v in s.items()} for s in sets],
            "method": "directional: each layer's activations minus their projection on the ablated latents' tuned "
                      "decoder rows; control: shared latents matched on firing count"}
