"""Calibration of the feature-level findings: the dictionaries' MMCS against chance (`mmcs`), validation of the
related features against the other explained ones (`validation`), and ablation against the splice and against
matched random features (`ablation_vs_splice`, `ablation_vs_random`). Every world runs the functions a real run uses:
`irm.sae.comparison.compare_layer`, `activation_moments` and `chance_levels`; `irm.enrichment.Frequencies` and
`enrichment_comparison`; `irm.stats.paired_difference` and `difference_vs_draws`; and the findings rows' verdicts
(`irm.findings.mmcs_row`, `validation_row`, `ablation_row`).

MMCS worlds: activations in `mmcs_width` dimensions (isotropic, or a 1/k variance spectrum along random axes, with or
without a mean along the leading axis); the chance levels come from `mmcs_rows` sampled activations, as the stage
reads them from the cache, and from the dictionaries' own rows. Null: the two dictionaries are unrelated, each row
an independent draw of the activations' distribution minus a decoder bias that takes none, half or all of their
mean (a dictionary that follows the data and nothing else). Planted: the large dictionary holds noisy copies (cosine
about 0.94) of a fraction `effect` of the small one's rows.

Validation worlds: `features` explained features, `related` of them labelled related, `inputs` positions of which a
fraction QUANTILE_ABOVE has R above the threshold. Null: activity independent of R, with the related features far
busier than the others everywhere (raw frequencies would call them related), or far rarer (noisy enrichments); and
a circular-labels world, where features fire on reward-lexicon tokens, R is high on them, and the labels come from
the offline lexicon rule (the row must not call that a finding). Planted: where R is high, the related features fire
(1 + effect) times as often as elsewhere.

Ablation worlds: `prompts` paired rewards under the splice, the ablated set and `random_draws` random sets. Each
condition moves every prompt's reward by its own effect (random sets: drawn from one distribution, sd ALPHA_SD) plus
per-prompt sampling noise (sd PROMPT_SD); the prompts' own rewards are shared (the stage's common random numbers).
Null: the labelled set is one more draw of the random sets (normal, or skewed: each of a set's `ablated_features`
features hurts by an exponential amount, a long tail); for the splice comparison, ablating does nothing (normal or
heavy-tailed sampling noise). Planted: the labelled set lowers the reward by `effect` beyond that.
"""

from __future__ import annotations

import numpy as np

from irm.calibration.core import Family, Sizes

DEFAULTS = {"mmcs_width": 48, "mmcs_rows": 2000, "chance_draws": 99,
            "validation_features": 60, "validation_related": 8, "validation_inputs": 2000,
            "validation_permutations": 999,
            "ablation_prompts": 64, "random_draws": 8, "ablated_features": 4}
MEAN_SHIFT = 2.0  # the activations' mean, in units of their total standard deviation
COPY_NOISE = 0.05  # per-coordinate noise of a planted shared row on a unit row: cosine about 0.94 at d 48
QUANTILE_ABOVE = 0.1  # fraction of validation inputs where R is above the threshold
ALPHA_SD, PROMPT_SD = 0.1, 0.5  # ablation: sd of a random set's effect on the reward; of a prompt's sampling noise
MODE = "reconstruction"
MMCS_UNIT = "fraction of the small dictionary's rows copied into the large one (cosine about 0.94 at width 48)"
VALIDATION_UNIT = "related features' firing-rate lift where R is high (0.5: 1.5x their base rate)"
ABLATION_UNIT = f"reward drop (random sets' effects sd {ALPHA_SD}, per-prompt noise sd {PROMPT_SD})"


def _size(sizes: Sizes, key: str) -> int:
    return int(sizes.get(key, DEFAULTS[key]))


# ---------------------------------------------------------------------------------------------------------------
# MMCS


def _activation_law(rng: np.random.Generator, d: int, spectrum: str, mean_shift: float):
    """(mean [d], factor [d, d]): activations are mean + factor @ z, z standard normal."""
    basis = np.linalg.qr(rng.normal(size=(d, d)))[0]
    sd = 1.0 / np.sqrt(np.arange(1, d + 1)) if spectrum == "1/k" else np.ones(d)
    return mean_shift * np.sqrt((sd ** 2).sum()) * basis[:, 0], basis * sd


def _draw(rng: np.random.Generator, n: int, law) -> np.ndarray:
    mean, factor = law
    return mean + rng.normal(size=(n, len(mean))) @ factor.T


def mmcs_world(rng: np.random.Generator, sizes: Sizes, *, spectrum: str = "1/k", mean_shift: float = MEAN_SHIFT,
               bias: float = 0.0, shared: float = 0.0) -> str:
    """One MMCS world's verdict: two dictionaries (d and 2d rows of width d) compared by `compare_layer`, chance
    levels from `mmcs_rows` activations and the dictionaries' rows through `activation_moments` and `chance_levels`,
    the verdict by `mmcs_row`. The rows follow the activations minus a decoder bias of `bias` times their mean (0:
    the rows carry the whole mean; 1: none of it)."""
    from irm.sae.comparison import activation_moments, chance_levels, compare_layer
    from irm.findings import mmcs_row

    d, draws = _size(sizes, "mmcs_width"), _size(sizes, "chance_draws")
    law = _activation_law(rng, d, spectrum, mean_shift)
    rows_law = ((1.0 - bias) * law[0], law[1])
    small = _draw(rng, d, rows_law)
    large = _draw(rng, 2 * d, rows_law)
    k = int(round(shared * d))
    if k:
        unit = small[:k] / np.linalg.norm(small[:k], axis=1, keepdims=True)
        large[:k] = unit + COPY_NOISE * rng.normal(size=(k, d))
    rec = compare_layer(small, large, top_k=1)
    rec.update(chance_levels(small, large, activation_moments([_draw(rng, _size(sizes, "mmcs_rows"), law)]), draws,
                             seed=int(rng.integers(2 ** 31)), hungarian_draws=0))
    return mmcs_row("0", rec)["verdict"]


# ---------------------------------------------------------------------------------------------------------------
# Validation


def _validation_verdict(codes_NF: np.ndarray, above_N: np.ndarray, n_related: int, seed: int, permutations: int,
                        circular: str | None = None) -> str:
    """Count the features' activity with `Frequencies`, compare the first `n_related` (labelled related) with the
    rest by their enrichment (`compare_groups`), and judge with `validation_row`."""
    from irm.findings import validation_row
    from irm.enrichment import ENRICHMENT, Frequencies, enrichment_comparison

    n_features = codes_NF.shape[1]
    freqs = Frequencies(1, n_features)
    freqs.update(codes_NF[:, None, :], above_N)
    related, other = {0: list(range(n_related))}, {0: list(range(n_related, n_features))}
    vs = enrichment_comparison(freqs, [0], related, other, seed, permutations)
    val = {"n_related": n_related, "n_inputs": freqs.n_all, "n_inputs_above": freqs.n_above, "threshold": 3.0,
           "vs_other_explained": {ENRICHMENT: vs}, "circular": circular}
    return validation_row(val)["verdict"]


def validation_world(rng: np.random.Generator, sizes: Sizes, *, related_rate: tuple[float, float] = (0.3, 0.6),
                     other_rate: tuple[float, float] = (0.005, 0.1), lift: float = 0.0) -> str:
    """Features fire independently of R with their own base rates (related ones drawn log-uniformly from
    `related_rate`, the others from `other_rate`); where R is high the related ones fire (1 + lift) times as
    often."""
    n_f, n_r, n = (_size(sizes, f"validation_{k}") for k in ("features", "related", "inputs"))
    above = rng.random(n) < QUANTILE_ABOVE
    rate = np.exp(np.concatenate([rng.uniform(*np.log(related_rate), n_r), rng.uniform(*np.log(other_rate),
                                                                                        n_f - n_r)]))
    p_NF = np.broadcast_to(rate, (n, n_f)).copy()
    p_NF[np.ix_(above, np.arange(n_r))] = np.minimum(1.0, rate[:n_r] * (1.0 + lift))
    codes = (rng.random((n, n_f)) < p_NF).astype(np.float64)
    return _validation_verdict(codes, above, n_r, int(rng.integers(2 ** 31)), _size(sizes, "validation_permutations"))


def circular_world(rng: np.random.Generator, sizes: Sizes) -> str:
    """Tokens of a vocabulary of which 30% are reward-lexicon words with values in [-4, 4]; R is the token's
    lexicon value plus noise; each feature fires on two tokens; the offline rule's label (lexicon tokens carry at
    least half of the feature's activation) picks the related features, as explain.backend offline does. Related
    features then fire where R is high by construction; the row must say so, not call it a finding."""
    from irm.explain.backends import LEXICON_SHARE, OfflineBackend
    from irm.enrichment import circularity

    n_f, n = _size(sizes, "validation_features"), _size(sizes, "validation_inputs")
    vocab = 100
    lexicon = rng.random(vocab) < 0.3
    value = np.where(lexicon, rng.uniform(-4, 4, vocab), 0.0)
    tokens = rng.integers(0, vocab, n)
    r = value[tokens] + 0.3 * rng.normal(size=n)
    fires_on = np.stack([np.isin(np.arange(vocab), rng.choice(vocab, 2, replace=False)) for _ in range(n_f)])
    codes = fires_on[:, tokens].T.astype(np.float64)  # inputs x features
    share = (codes * lexicon[tokens][:, None]).sum(axis=0) / np.maximum(codes.sum(axis=0), 1)
    related = share >= LEXICON_SHARE
    order = np.argsort(~related, kind="stable")  # related first, as _validation_verdict reads them
    if not related.any() or related.all():
        return _validation_verdict(codes[:, order], r > 3.0, 0, 0, 1, circularity([OfflineBackend.label_method]))
    return _validation_verdict(codes[:, order], r > 3.0, int(related.sum()), int(rng.integers(2 ** 31)),
                               _size(sizes, "validation_permutations"), circularity([OfflineBackend.label_method]))


# ---------------------------------------------------------------------------------------------------------------
# Ablation


def _ablation_verdict(key: str, ablated: np.ndarray, control) -> str:
    """The row `ablation_row` builds from the paired difference the stage computes for `key`."""
    from irm.findings import ablation_row
    from irm.stats import difference_vs_draws, paired_difference

    d = paired_difference(ablated, control) if key == "ablated_minus_splice" else difference_vs_draws(ablated, control)
    abl = {"n_features": 4, "n_prompts": len(ablated), "random_draws": None if np.ndim(control) == 1 else len(control),
           "modes": {MODE: {key: d}}}
    return ablation_row(abl, MODE, key)["verdict"]


def _set_effects(rng: np.random.Generator, n: int, k: int, skewed: bool) -> np.ndarray:
    """Effects of `n` sets of `k` features on the reward, sd ALPHA_SD: normal, or skewed, each feature's effect
    minus an exponential (most features do little, a few hurt a lot), summed over the set's k features."""
    if skewed:
        return -rng.exponential(ALPHA_SD / np.sqrt(k), (n, k)).sum(axis=1)
    return rng.normal(0.0, ALPHA_SD, n)


def ablation_random_world(rng: np.random.Generator, sizes: Sizes, *, skewed: bool = False, drop: float = 0.0) -> str:
    """Ablated vs matched random sets: the labelled set's effect is one more draw of the random sets' (minus
    `drop`), each condition with its own per-prompt noise around the prompts' shared rewards."""
    n_p, n_d = _size(sizes, "ablation_prompts"), _size(sizes, "random_draws")
    base = rng.normal(0.0, 1.0, n_p)
    effects = _set_effects(rng, n_d + 1, _size(sizes, "ablated_features"), skewed)
    ablated = base + effects[0] - drop + rng.normal(0.0, PROMPT_SD, n_p)
    draws = base + effects[1:, None] + rng.normal(0.0, PROMPT_SD, (n_d, n_p))
    return _ablation_verdict("ablated_minus_random", ablated, draws)


def ablation_splice_world(rng: np.random.Generator, sizes: Sizes, *, drop: float = 0.0,
                          heavy_tails: bool = False) -> str:
    """Ablated vs the splice on the same prompts: the ablation lowers every prompt's reward by `drop`; sampling
    noise normal, or Student t with 3 degrees of freedom (scaled to the same sd) for rewards with outliers."""
    n_p = _size(sizes, "ablation_prompts")
    base = rng.normal(0.0, 1.0, n_p)

    def noise() -> np.ndarray:
        return PROMPT_SD * (rng.standard_t(3, n_p) / np.sqrt(3.0) if heavy_tails else rng.normal(size=n_p))

    return _ablation_verdict("ablated_minus_splice", base - drop + noise(), base + noise())


# ---------------------------------------------------------------------------------------------------------------
# Families


def _families() -> list[Family]:
    """The main null family of each finding and its planted ones are "fast" (the calibrate stage runs them); the
    other null families "slow" (the full harness)."""
    from functools import partial

    out = [
        Family("mmcs", "isotropic activations, unrelated dictionaries", 0.0,
               partial(mmcs_world, spectrum="isotropic", mean_shift=0.0), MMCS_UNIT, "slow"),
        Family("mmcs", "1/k spectrum, unrelated dictionaries", 0.0, partial(mmcs_world, mean_shift=0.0),
               MMCS_UNIT, "slow"),
        Family("mmcs", "1/k spectrum and a mean, unrelated dictionaries", 0.0, mmcs_world, MMCS_UNIT),
        Family("mmcs", "1/k spectrum and a mean, unrelated dictionaries centred by their decoder bias", 0.0,
               partial(mmcs_world, bias=1.0), MMCS_UNIT),
        Family("mmcs", "1/k spectrum and a mean, unrelated dictionaries, decoder bias half the mean", 0.0,
               partial(mmcs_world, bias=0.5), MMCS_UNIT, "slow"),
    ]
    out += [Family("mmcs", "shared features (1/k spectrum and a mean)", f, partial(mmcs_world, shared=f),
                   MMCS_UNIT) for f in (0.1, 0.2, 0.4, 0.8)]
    out += [Family("mmcs", "shared features (1/k spectrum)", f, partial(mmcs_world, shared=f, mean_shift=0.0),
                   MMCS_UNIT, "slow") for f in (0.05, 0.1, 0.2)]
    out += [Family("mmcs", "shared features (1/k spectrum and a mean, centred by the decoder bias)", f,
                   partial(mmcs_world, shared=f, bias=1.0), MMCS_UNIT) for f in (0.05, 0.1, 0.2)]
    out += [
        Family("validation", "related features fire often everywhere", 0.0, validation_world, VALIDATION_UNIT),
        Family("validation", "related features rare, others busy", 0.0,
               partial(validation_world, related_rate=(0.005, 0.03), other_rate=(0.1, 0.5)), VALIDATION_UNIT,
               "slow"),
        Family("validation", "circular labels (offline lexicon rule)", 0.0, circular_world, VALIDATION_UNIT),
    ]
    out += [Family("validation", "related features enriched where R is high", lift,
                   partial(validation_world, related_rate=(0.01, 0.2), other_rate=(0.01, 0.2), lift=lift),
                   VALIDATION_UNIT) for lift in (0.25, 0.5, 1.0)]
    out += [
        Family("ablation_vs_random", "labelled set like a random draw", 0.0, ablation_random_world, ABLATION_UNIT),
        Family("ablation_vs_random", "labelled set like a random draw, skewed effects", 0.0,
               partial(ablation_random_world, skewed=True), ABLATION_UNIT, "slow"),
        Family("ablation_vs_splice", "ablation does nothing", 0.0, ablation_splice_world, ABLATION_UNIT),
        Family("ablation_vs_splice", "ablation does nothing, heavy-tailed rewards", 0.0,
               partial(ablation_splice_world, heavy_tails=True), ABLATION_UNIT, "slow"),
    ]
    out += [Family("ablation_vs_random", "labelled set lowers the reward", drop,
                   partial(ablation_random_world, drop=drop), ABLATION_UNIT) for drop in (0.1, 0.2, 0.3, 0.5)]
    out += [Family("ablation_vs_splice", "ablation lowers the reward", drop, partial(ablation_splice_world, drop=drop),
                   ABLATION_UNIT) for drop in (0.05, 0.1, 0.2)]
    return out


FAMILIES: list[Family] = _families()
