"""Calibration of the run-level findings: RLHF raised the reward (`irm.stats.tuned_minus_base` ->
`irm.findings.reward_row`) and the chosen layers stand out (`irm.findings.layer_row`, `layer_outlier_test`).

Reward worlds: per-prompt rewards of the base model and the tuned model on the same prompts, with a prompt effect
shared by both (the pairing) and skewed, heavy-tailed noise (a lexicon reward is a clipped sum of word values).
Null: the tuned model's rewards have the base model's distribution; planted: shifted by `effect` reward units.

Layer worlds: per-layer divergences (sums of per-tensor norms, as irm.stages.divergence computes them) where every layer
differs by a random factor (3% log-normal; or uniform within +-5%; or log-normal with each tensor's own 1% noise);
planted: the top k layers' true divergence `effect` x larger.
"""

from __future__ import annotations

import numpy as np

from irm.calibration.core import Family, Sizes

DEFAULTS = {"prompts": 128, "layers": 30, "top_k": 3}
N_TENSORS = 9  # per block: attention q/k/v/o, MLP up/gate/down, two norms


def _size(sizes: Sizes, key: str) -> int:
    return int(sizes.get(key, DEFAULTS[key]))


def reward_world(effect: float, noise: str):
    def draw(rng: np.random.Generator, sizes: Sizes):
        from irm.findings import paired_reward, reward_row
        from irm.stats import tuned_minus_base

        n = _size(sizes, "prompts")
        prompt = rng.normal(size=n)
        if noise == "skewed":
            def sample():
                return np.clip(rng.exponential(1.0, n) - 1.0 + 0.3 * rng.normal(size=n), -3, 10)
        else:
            def sample():
                return rng.standard_t(3, n)
        base, tuned = prompt + sample(), prompt + sample() + effect
        d = paired_reward({"paired": tuned_minus_base(tuned, base)})
        return reward_row(d)["verdict"], d["mean"]

    return draw


def layer_world(effect: float, factor: str):
    def draw(rng: np.random.Generator, sizes: Sizes):
        from irm.layers import rank_layers
        from irm.findings import layer_row

        n, k = _size(sizes, "layers"), _size(sizes, "top_k")
        if factor == "uniform":
            layer = 1.0 + rng.uniform(-0.05, 0.05, n)
        else:
            layer = np.exp(0.03 * rng.normal(size=n))
        special = rng.permutation(n)[:k]
        layer[special] *= 1.0 + effect
        tensor_scale = rng.uniform(0.5, 2.0, N_TENSORS)
        tensor_noise = np.exp(0.01 * rng.normal(size=(N_TENSORS, n))) if factor == "per-tensor noise" else 1.0
        values = (tensor_scale[:, None] * layer[None, :] * tensor_noise).sum(axis=0)
        _, top = rank_layers(values.tolist(), k)
        row = layer_row({"values": values.tolist(), "top_k": top})
        return row["verdict"], float(np.sort(values)[::-1][:k].mean() / np.sort(values)[::-1][k:].mean())

    return draw


def _families() -> list[Family]:
    out = []
    for noise in ("skewed", "t3"):
        out.append(Family("reward", f"no reward change, {noise} noise", 0.0, reward_world(0.0, noise),
                          "tuned - base mean reward"))
    for effect in (0.1, 0.2, 0.4):
        out.append(Family("reward", "planted reward increase", effect, reward_world(effect, "skewed"),
                          "tuned - base mean reward"))
    for factor in ("log-normal 3%", "uniform 5%", "per-tensor noise"):
        out.append(Family("layers", f"random per-layer factor ({factor})", 0.0, layer_world(0.0, factor),
                          "top-k over the others' mean divergence"))
    for effect in (0.05, 0.1, 0.2):
        out.append(Family("layers", "planted special layers", effect,
                          layer_world(effect, "log-normal 3%"), "top-k over the others' mean divergence"))
    return out


FAMILIES: list[Family] = _families()
