"""Validation of R against the explainer's labels (paper 4.4, table 6): over unseen inputs, how often the features
labelled "related to the reward" are active where R predicts a large delta, versus the average feature.

An input is one token position of an eval-split text (every position but each text's first, whose activations are
atypical: it has no context and serves as the attention sink). Its A_concat is the 1x-SAE codes of every chosen
layer there, read with all SAEs spliced in as in the deltas stage. R's output is put on the reconstructed lexicon's
scale with the lexicon stage's mapping (kendall.json), so the threshold (paper: 3) is in VADER units.

The paper compares the related features with "the average feature", dead ones included: any explained feature
(the explainer only sees features that fire) beats that. The control here is the *other explained* features of the
same layers (explained and labelled 0). A feature that fires on most tokens fires often where R is high too, so raw
frequencies favour busy features; the verdict's statistic is each feature's *enrichment* over its own base rate,
P(active | R > threshold) / P(active), 1 for a feature that ignores R whatever its rate (issue 22), taken as a
z-score under "the feature ignores R" (hypergeometric: the ratio of a rare feature swings far more than a busy
one's, and a group of rare features would pass for enriched). The groups' z-scores, on one scale whatever the
feature, are compared by a label permutation test of their difference of means; mean enrichment ratios and raw
frequencies (compared by Welch's t) are kept beside it.

Circularity: the offline explainer (explain.backend offline) labels a feature related when reward-lexicon tokens
carry most of its activation, and R's targets are that lexicon's values, so related features fire on the words R
scores high by construction. validation.json records the label method and `circular` (the reason, or None); the
findings row then reports the numbers with verdict "not tested" and says why.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np

from irm.artifacts import read_json, write_json
from irm.config import RunConfig
from irm.errors import UserError
from irm.stages import relpath

VALIDATION_JSON = relpath("validation")
N_PERMUTATIONS = 9999  # Monte Carlo label permutations; scipy enumerates every partition when there are fewer
INPUTS = ("every token position of each eval-split text except its first, truncated to cache.max_length tokens; "
          "x = concatenated 1x-SAE codes of the chosen layers at that position")


class Frequencies:
    """Streaming counts of active features (code > 0), over all inputs and over those R selects."""

    def __init__(self, n_layers: int, width: int):
        self.active_all = np.zeros((n_layers, width), dtype=np.int64)
        self.active_above = np.zeros((n_layers, width), dtype=np.int64)
        self.n_all = 0
        self.n_above = 0

    def update(self, codes_NLF: np.ndarray, above_N: np.ndarray) -> None:
        active = codes_NLF > 0
        self.active_all += active.sum(axis=0)
        self.active_above += active[above_N].sum(axis=0)
        self.n_all += len(codes_NLF)
        self.n_above += int(above_N.sum())

    def summary(self, layers: list[int], related: dict[int, list[int]]) -> dict:
        """Mean activation frequency of the related features and of all features, among the selected inputs and
        (as a base rate) among all inputs; None where there is nothing to average."""

        def freq(active: np.ndarray, n: int, mask: Optional[np.ndarray] = None) -> Optional[float]:
            if n == 0 or (mask is not None and not mask.any()):
                return None
            per_feature = active / n
            return float(per_feature[mask].mean() if mask is not None else per_feature.mean())

        mask = np.zeros_like(self.active_all, dtype=bool)
        for li, layer in enumerate(layers):
            mask[li, related.get(layer, [])] = True
        per_layer = {}
        for li, layer in enumerate(layers):
            per_layer[str(layer)] = {
                "n_related": int(mask[li].sum()),
                "related_frequency": freq(self.active_above[li], self.n_above, mask[li]),
                "average_frequency": freq(self.active_above[li], self.n_above),
            }
        return {
            "related_frequency": freq(self.active_above, self.n_above, mask),
            "average_frequency": freq(self.active_above, self.n_above),
            "related_frequency_all_inputs": freq(self.active_all, self.n_all, mask),
            "average_frequency_all_inputs": freq(self.active_all, self.n_all),
            "per_layer": per_layer,
        }

    def enrichment(self, layers: list[int], features: dict[int, list[int]]) -> np.ndarray:
        """Each of `features`' P(active | R above) / P(active) (`enrichment`), NaN for one that never fires (and for
        every one when R selects no input)."""
        total = self.per_feature(layers, features, above=False)
        if self.n_above == 0:
            return np.full(total.shape, np.nan)
        return enrichment(self.per_feature(layers, features, above=True), total)

    def enrichment_z(self, layers: list[int], features: dict[int, list[int]]) -> np.ndarray:
        """Each of `features`' enrichment as a z-score (`enrichment_z`), NaN where it is undefined."""
        counts = [(self.active_above[li, i], self.active_all[li, i]) for li, layer in enumerate(layers)
                  for i in features.get(layer, [])]
        above, total = (np.array(c, dtype=np.float64).reshape(-1) for c in zip(*counts)) if counts else (
            np.zeros(0), np.zeros(0))
        return enrichment_z(above, total, self.n_above, self.n_all)

    def per_feature(self, layers: list[int], features: dict[int, list[int]], above: bool = True) -> np.ndarray:
        """Activation frequency of each of `features` (layer -> indices, in `layers` order), over the inputs R
        selects (`above`) or over all inputs; empty when there is no input to count."""
        active, n = (self.active_above, self.n_above) if above else (self.active_all, self.n_all)
        if n == 0:
            return np.zeros(0)
        return np.array([active[li, i] / n for li, layer in enumerate(layers) for i in features.get(layer, [])],
                        dtype=np.float64)


def enrichment(above_F: np.ndarray, all_F: np.ndarray) -> np.ndarray:
    """Per feature, its activation frequency among the inputs R selects over its frequency among all inputs: how
    much more often than its own base rate it fires where R is high (NaN where it never fires, or nothing was
    counted)."""
    above_F, all_F = np.asarray(above_F, dtype=np.float64), np.asarray(all_F, dtype=np.float64)
    out = np.full(above_F.shape, np.nan)
    np.divide(above_F, all_F, out=out, where=all_F > 0)
    return out


def enrichment_z(active_above_F: np.ndarray, active_all_F: np.ndarray, n_above: int, n_all: int) -> np.ndarray:
    """Per feature, its count of active inputs among those R selects as a z-score under "the feature ignores R":
    given that it fired on a of the n inputs, the count among the k selected ones is hypergeometric; the z-score is
    the normal quantile of its upper-tail mid-p (P(X > x) + P(X = x) / 2), about N(0, 1) whatever the base rate,
    also for a rare feature's few, lopsided counts, where (x - mean) / sd is skewed. Enrichment over the base rate on
    one scale for every base rate (a rare feature's raw ratio swings wildly, a busy one's hardly moves). NaN where it
    is undefined (a feature that never fires, or always does; no input selected, or every one)."""
    from scipy.special import ndtri_exp
    from scipy.stats import hypergeom

    a = np.asarray(active_all_F, dtype=np.int64)
    x = np.asarray(active_above_F, dtype=np.int64)
    out = np.full(a.shape, np.nan)
    defined = (a > 0) & (a < n_all) & (0 < n_above < n_all)
    if defined.any():
        law, xd = hypergeom(n_all, a[defined], n_above), x[defined]
        # In log space and from the smaller tail, so a count far out in either tail keeps a finite z-score.
        half_pmf = np.log(0.5) + law.logpmf(xd)
        log_upper = np.logaddexp(law.logsf(xd), half_pmf)  # P(X > x) + P(X = x) / 2
        log_lower = np.logaddexp(law.logcdf(xd - 1), half_pmf)  # P(X < x) + P(X = x) / 2
        out[defined] = np.where(log_upper < np.log(0.5), -ndtri_exp(log_upper), ndtri_exp(log_lower))
    return out


def _difference(a, b, axis=-1):
    return a.mean(axis=axis) - b.mean(axis=axis)


def welch_t(a, b, axis=-1):
    """Welch's t of mean(a) - mean(b) along `axis` (vectorised for scipy's permutation_test); a difference over a
    zero spread is +-inf, no difference 0."""
    diff = a.mean(axis=axis) - b.mean(axis=axis)
    se = np.sqrt(a.var(axis=axis, ddof=1) / a.shape[axis] + b.var(axis=axis, ddof=1) / b.shape[axis])
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(diff == 0, 0.0, diff / se)


def compare_groups(related_F: np.ndarray, other_F: np.ndarray, seed: int = 0,
                   what: str = "activation frequency", n_resamples: int = N_PERMUTATIONS, welch: bool = True) -> dict:
    """Related vs other explained features' values of `what` (one per feature; NaN ones, features that never fired,
    are left out and counted in `n_undefined`): means, lift (ratio of means), difference, and the one-sided
    label-permutation p-values (H1: related features score higher; `p_value_less`: lower) of Welch's t (`welch`;
    else the difference of means, for values on one scale whatever the feature) with scipy
    (exact enumeration when the partitions number at most `n_resamples`). With one feature in a group the
    partitions are enumerated on the difference of means. None where a group is empty. The keys keep the
    frequency names (`related_frequency`: the related group's mean of `what`) for the report's table."""
    from scipy.stats import permutation_test

    related_F, other_F = np.asarray(related_F, dtype=np.float64), np.asarray(other_F, dtype=np.float64)
    undefined = int((~np.isfinite(related_F)).sum() + (~np.isfinite(other_F)).sum())
    related_F, other_F = related_F[np.isfinite(related_F)], other_F[np.isfinite(other_F)]
    out = {"statistic": what, "n_related": int(len(related_F)), "n_other": int(len(other_F)),
           "n_undefined": undefined,
           "related_frequency": float(related_F.mean()) if len(related_F) else None,
           "other_frequency": float(other_F.mean()) if len(other_F) else None,
           "lift": None, "difference": None, "p_value": None, "p_value_less": None,
           "test": "label permutation among the explained features, one-sided (p_value: related higher; "
                   "p_value_less: lower), statistic = " + ("Welch's t of the two groups' means" if welch else
                                                          "difference of the groups' means")}
    if not len(related_F) or not len(other_F):
        return out
    out["difference"] = out["related_frequency"] - out["other_frequency"]
    if out["other_frequency"] > 0:
        out["lift"] = out["related_frequency"] / out["other_frequency"]
    if min(len(related_F), len(other_F)) >= 2:
        for key, alternative in (("p_value", "greater"), ("p_value_less", "less")):
            res = permutation_test((related_F, other_F), welch_t if welch else _difference,
                                   permutation_type="independent", alternative=alternative, vectorized=True,
                                   n_resamples=n_resamples,
                                   rng=np.random.default_rng(seed))
            out[key] = float(res.pvalue)
    else:
        # scipy wants two values per group (and Welch's t a spread in each); with one feature in a group the
        # partitions are just which value it is, so enumerate them on the difference of means (ties count as
        # extreme, as scipy counts them).
        out["test"] = out["test"].replace("Welch's t of the two groups' means", "difference of the groups' means")
        pool = np.concatenate([related_F, other_F])
        total = pool.sum()
        k, n = len(related_F), len(pool)
        if k == 1:
            diffs = pool - (total - pool) / (n - 1)
        else:
            diffs = (total - pool) / (n - 1) - pool
        tol = 1e-12 * max(1.0, abs(out["difference"]))
        out["p_value"] = float(np.mean(diffs >= out["difference"] - tol))
        out["p_value_less"] = float(np.mean(diffs <= out["difference"] + tol))
    return out


ENRICHMENT = "enrichment over base rate"  # the vs_other_explained entry that carries the verdict
WELCH_ON_Z = False  # z-scores share one scale: the plain difference (Welch's t let rare related features through)
ENRICHMENT_TEXT = ("per-feature enrichment over its base rate as a z-score (enrichment_z); related_enrichment and "
                   "other_enrichment: the groups' mean P(active | R > threshold) / P(active)")


def enrichment_comparison(freqs: Frequencies, layers: list[int], related: dict[int, list[int]],
                          other: dict[int, list[int]], seed: int = 0, n_resamples: int = N_PERMUTATIONS) -> dict:
    """The verdict's comparison: related vs other explained features by their enrichment z-scores
    (`compare_groups`), with each group's mean enrichment ratio beside it."""
    out = compare_groups(freqs.enrichment_z(layers, related), freqs.enrichment_z(layers, other), seed,
                         what=ENRICHMENT_TEXT, n_resamples=n_resamples, welch=WELCH_ON_Z)
    for key, group in (("related_enrichment", related), ("other_enrichment", other)):
        ratios = freqs.enrichment(layers, group)
        out[key] = float(np.nanmean(ratios)) if np.isfinite(ratios).any() else None
    return out


def label_methods(root: Path) -> list[str]:
    """How the small dictionary's features were labelled (explanations.jsonl's label_method), each method once."""
    from irm.artifacts import read_jsonl
    from irm.explain import EXPLANATIONS

    return sorted({line["label_method"] for line in read_jsonl(root / EXPLANATIONS)
                   if line.get("role") == "small" and line.get("label_method")})


def circularity(methods: list[str]) -> Optional[str]:
    """Why validating R against these labels is circular (None when it is not): the offline rule labels by the
    reward lexicon's own tokens, the words R's targets score."""
    from irm.explain.backends import OfflineBackend

    if OfflineBackend.label_method in methods:
        return ("circular: the offline rule labels a feature related when reward-lexicon tokens carry most of its "
                "activation, and R's targets are that lexicon's values, so related features fire where R is high "
                "by construction; label with an LLM (explain.backend local or openai) for a test")
    return None


def _eval_sequences(cfg: RunConfig, tokenizer) -> list:
    """Token ids of the eval-split texts; a one-token text has no position left once its first is dropped."""
    from irm.data import load_texts

    vc = cfg.validate
    texts = load_texts(cfg.corpus, cfg.corpus.eval_split, seed=cfg.seed, n=vc.n_inputs)
    sequences = [ids for ids in tokenizer(texts, truncation=True, max_length=cfg.cache.max_length)["input_ids"]
                 if len(ids) > 1]
    if not sequences:
        raise UserError(f"no eval-split text ({cfg.corpus.eval_split!r}) has two tokens or more; check the corpus")
    return sequences


def _count_frequencies(cfg: RunConfig, model, saes, sequences, pad_token_id, weight, bias, mapping, n_layers: int,
                       width: int) -> Frequencies:
    """How often each feature fires, on all positions and on those where R (lexicon scale) is above the threshold."""
    import torch

    from irm.sae.splice import iter_codes
    from irm.lexicon import apply_mapping

    vc = cfg.validate
    freqs = Frequencies(n_layers, width)
    w = weight.float()
    for batch, mask_BT, codes_BTLF in iter_codes(model, saes, sequences, pad_token_id,
                                                 cfg.cache.batch_size, cfg.cache.site, desc="validate: eval texts"):
        keep_BT = mask_BT.bool().clone()
        first = keep_BT.float().argmax(dim=1)  # left padding: each row's first real token
        keep_BT[torch.arange(len(batch)), first] = False
        codes_NLF = codes_BTLF[keep_BT]
        scaled = apply_mapping((codes_NLF.flatten(1) @ w + bias).numpy(), mapping)
        freqs.update(codes_NLF.numpy(), scaled > vc.threshold)
    return freqs


def _print_result(result: dict, threshold: float, n_texts: int, n_related: int) -> None:
    def pct(v):
        return "n/a" if v is None else f"{100 * v:.1f}%"

    print(f"validate-features: {result['n_inputs_above']} of {result['n_inputs']} positions ({n_texts} texts) "
          f"above {threshold}; {n_related} related features active at {pct(result['related_frequency'])} vs "
          f"average feature {pct(result['average_frequency'])} (all positions: "
          f"{pct(result['related_frequency_all_inputs'])} vs {pct(result['average_frequency_all_inputs'])})")
    vs = result["vs_other_explained"]["inputs above threshold"]
    if vs["lift"] is not None:
        print(f"  vs the {vs['n_other']} other explained features: {pct(vs['other_frequency'])}, lift "
              f"{vs['lift']:.2f}, permutation p = {vs['p_value']:.3g}")
    e = result["vs_other_explained"][ENRICHMENT]
    if e["p_value"] is not None:
        print(f"  enrichment over each feature's base rate: related {e['related_enrichment']:.2f}, other "
              f"{e['other_enrichment']:.2f} (z {e['related_frequency']:.2f} vs {e['other_frequency']:.2f}), "
              f"permutation p = {e['p_value']:.3g}")
    if result.get("circular"):
        print(f"  {result['circular']}")
    if "note" in result:
        print(f"  note: {result['note']}")


def run(cfg: RunConfig) -> dict:
    from irm.sae.splice import load_saes
    from irm.explain import explained_features
    from irm.lexicon import KENDALL_JSON, raw_threshold
    from irm.models import load_tuned
    from irm.regression import load_irm
    from irm.runtime import start
    from irm.stages import mark_done

    vc = cfg.validate  # its ranges: irm.config.validate, before any stage runs
    device = start(cfg.seed, cfg.device)
    root = Path(cfg.run_dir)
    weight, bias, layers = load_irm(root)
    kendall_path = root / KENDALL_JSON
    if not kendall_path.exists():
        raise UserError(f"missing {kendall_path}: run `python -m irm lexicon` first (its mapping puts R on the "
                        "lexicon scale the threshold is in)")
    mapping = read_json(kendall_path)["mapping"]
    related_all, other_all = explained_features(root, 1), explained_features(root, 0)
    related = {layer: related_all.get(layer, []) for layer in layers}
    other = {layer: other_all.get(layer, []) for layer in layers}
    model, tokenizer = load_tuned(cfg, device=device)
    saes = load_saes(root, layers, model, cfg.cache.site, cfg.sae.dictionary_pair()[0])
    width = int(next(iter(saes.values())).dictionary.shape[0])

    sequences = _eval_sequences(cfg, tokenizer)
    freqs = _count_frequencies(cfg, model, saes, sequences, tokenizer.pad_token_id, weight, bias, mapping,
                               len(layers), width)

    n_related = sum(len(v) for v in related.values())
    result = {
        "inputs": INPUTS,
        "n_texts": len(sequences),
        "n_inputs": freqs.n_all,
        "threshold": vc.threshold,
        "threshold_scale": "reconstructed lexicon scale [-4, 4] (kendall.json mapping); R > threshold there",
        "raw_threshold": raw_threshold(vc.threshold, mapping),
        "n_inputs_above": freqs.n_above,
        "n_related": n_related,
        "related": {str(k): v for k, v in related.items()},
        "active": "code > 0",
        **freqs.summary(layers, related),
        "label_methods": label_methods(root),
        "vs_other_explained": {
            ENRICHMENT: enrichment_comparison(freqs, layers, related, other, cfg.seed),
            "inputs above threshold": compare_groups(freqs.per_feature(layers, related),
                                                     freqs.per_feature(layers, other), cfg.seed),
            "all inputs": compare_groups(freqs.per_feature(layers, related, above=False),
                                         freqs.per_feature(layers, other, above=False), cfg.seed),
        },
        "other": {str(k): v for k, v in other.items()},
    }
    result["circular"] = circularity(result["label_methods"])
    if n_related == 0:
        result["note"] = ("no feature of the chosen layers was labelled related to the reward by the explain stage: "
                          "there is nothing to compare with the average feature")
    elif freqs.n_above == 0:
        result["note"] = f"R puts no input above {vc.threshold} on the lexicon scale: no frequency to report"
    write_json(root / VALIDATION_JSON, result)
    mark_done(cfg, "validate-features", [VALIDATION_JSON])

    _print_result(result, vc.threshold, len(sequences), n_related)
    return result
