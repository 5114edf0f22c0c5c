"""Reading R out over the lexicon's words (paper 5.1, H): which words and contexts, per-word means, the mapping onto
the lexicon's [-4, 4] and back, Kendall tau and the word subsets it is reported on. The lexicon and control stages
read their lexicons with it, validate-features its threshold, the calibration harness its simulated worlds."""

from __future__ import annotations

import random
from typing import Optional, Sequence

import numpy as np

from irm.errors import UserError


BOUND = 4.0  # the VADER lexicon's range is [-4, 4]
SUBSETS = ("all", "negative", "heldout", "seen")


def floats(values, name: str) -> np.ndarray:
    arr = np.asarray(values)
    if arr.dtype.kind not in "fiu":
        raise TypeError(f"{name} must be numbers, got {arr.dtype} (Kendall tau is computed on values, never words)")
    return arr.astype(np.float64)


def rescale(raw, percentiles: Sequence[float] = (10.0, 90.0)) -> tuple[np.ndarray, dict]:
    """Map the given percentiles of `raw` onto [-4, 4] (affine) and clip: the authors' normalisation."""
    raw = floats(raw, "raw values")
    lo_p, hi_p = percentiles  # in range: irm.config.check_all checks lexicon.percentiles before any stage runs
    lo, hi = (float(v) for v in np.percentile(raw, [lo_p, hi_p]))
    mapping = {"kind": f"affine: percentile {lo_p:g} -> -4, percentile {hi_p:g} -> +4, then clipped to [-4, 4]",
               "percentiles": [lo_p, hi_p], "raw_at_percentiles": [lo, hi], "bound": BOUND}
    return apply_mapping(raw, mapping), mapping


def apply_mapping(raw, mapping: dict) -> np.ndarray:
    lo, hi = mapping["raw_at_percentiles"]
    raw = floats(raw, "raw values")
    if hi <= lo:  # R is constant on these words: every word maps to the centre
        return np.zeros_like(raw)
    return np.clip(-BOUND + 2 * BOUND * (raw - lo) / (hi - lo), -BOUND, BOUND)


def raw_threshold(threshold: float, mapping: dict) -> float:
    """The raw R output that `apply_mapping` sends to `threshold` (inside (-4, 4))."""
    lo, hi = mapping["raw_at_percentiles"]
    return lo + (threshold + BOUND) / (2 * BOUND) * (hi - lo)


def kendall(true, predicted, bootstrap: int = 0, seed: int = 0) -> dict:
    """scipy's Kendall tau-b and p-value of two float vectors, with a percentile bootstrap 95% interval
    (scipy.stats.bootstrap, words resampled in pairs, seeded). tau is None when it is undefined (fewer than 2 words
    or a constant)."""
    from scipy.stats import kendalltau

    x, y = floats(true, "true values"), floats(predicted, "predicted values")
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"Kendall tau needs two vectors of the same length, got {x.shape} and {y.shape}")
    out = {"n": int(len(x)), "tau": None, "p": None, "ci95": None, "bootstrap": int(bootstrap)}
    if len(x) < 2 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return out
    res = kendalltau(x, y)
    out["tau"], out["p"] = float(res.statistic), float(res.pvalue)
    if bootstrap > 0:
        from scipy.stats import bootstrap as scipy_bootstrap

        with np.errstate(invalid="ignore"):
            res = scipy_bootstrap((x, y), lambda a, b: kendalltau(a, b).statistic, paired=True, vectorized=False,
                                  n_resamples=bootstrap, method="percentile", random_state=np.random.default_rng(seed))
        ci = res.confidence_interval
        # a resample with a constant side has no tau: scipy's interval is then NaN, and none is reported
        if np.isfinite(ci.low) and np.isfinite(ci.high):
            out["ci95"] = [float(ci.low), float(ci.high)]
    return out


def per_word(values, word_of_row, n_words: int) -> np.ndarray:
    """Mean of `values` over the rows of each word (rows labelled 0..n_words-1): a scalar per row, or a row of
    features per row (then a words x features matrix)."""
    values = floats(values, "values")
    counts = np.bincount(word_of_row, minlength=n_words)
    if (counts == 0).any():
        raise ValueError("every word needs at least one row")
    if values.ndim == 2:
        from scipy.sparse import csr_matrix

        rows = np.asarray(word_of_row, dtype=np.int64)
        sums = csr_matrix((np.ones(len(rows)), (rows, np.arange(len(rows)))), shape=(n_words, len(rows))) @ values
        return np.asarray(sums) / counts[:, None]
    return np.bincount(word_of_row, weights=values, minlength=n_words) / counts


def subset_masks(words: Sequence[str], true: np.ndarray, heldout: set[str], seen: set[str]) -> dict:
    """The word subsets Kendall tau is reported on (SUBSETS), as boolean masks over `words`."""
    masks = {"all": np.ones(len(words), dtype=bool), "negative": np.asarray(true) < 0,
             "heldout": np.array([w in heldout for w in words], dtype=bool),
             "seen": np.array([w in seen for w in words], dtype=bool)}
    return {name: masks[name] for name in SUBSETS}


def heldout_and_seen(info: dict) -> tuple[set[str], set[str]]:
    """From triples.json's contents: the lexicon words the triples stage held out, and those its triples used."""
    return (set(info["heldout"]["positive"]) | set(info["heldout"]["negative"]),
            set(info["used"]["positive"]) | set(info["used"]["negative"]))


def unseen_contexts(info: dict, k: int, seed: int) -> list[str]:
    """`k` of the contexts the triples stage kept from every triple (triples.json `contexts`), seeded: every word,
    seen or held out, is read in the same contexts, and none of them is a context R was trained on."""
    texts = (info.get("contexts") or {}).get("texts")
    if not texts:
        raise UserError("triples.json lists no unseen contexts (made by an older version, or triples.context_texts "
                        "is 0 or its texts have no positive word); rerun `python -m irm triples` with "
                        "triples.context_texts > 0")
    texts = sorted(set(texts))
    random.Random(f"irm-lexicon-contexts:{seed}").shuffle(texts)
    return texts[:k]


def lexicon_words(tokenizer, lexicon: dict[str, float], max_words: Optional[int], seed: int) -> tuple[list[str], dict]:
    """The lexicon words read by the stage: those one token long mid-sentence, a seeded sample of `max_words` of
    them when set (the words whose sign differs from VADER's, `irm.reward.planted_words`, fill up to half the sample,
    the rest is drawn from the other words: a planted reward's words are what the run is about, the others what
    they are compared with); and their counts (single-token words, multi-token words skipped)."""
    from irm.reward import planted_words
    from irm.words import token_counts

    counts = token_counts(tokenizer, [w for w in lexicon if not any(c.isspace() for c in w)])
    words = sorted(w for w, n in counts.items() if n == 1)
    n_single = len(words)
    if max_words is not None and max_words < len(words):
        every_planted = set(planted_words(lexicon)) & set(words)
        planted = sorted(every_planted)
        if len(planted) > max_words // 2:
            planted = sorted(random.Random(f"irm-lexicon-planted:{seed}").sample(planted, max_words // 2))
        rest = sorted(set(words) - every_planted)
        words = sorted(planted + random.Random(f"irm-lexicon-words:{seed}").sample(rest, max_words - len(planted)))
    return words, {"single_token_words": n_single, "multi_token_words_skipped": len(counts) - n_single}


def word_items(tokenizer, words: Sequence[str], contexts: Sequence[str]) -> tuple[list, np.ndarray]:
    """The (token ids, word position) items of every word appended to every context, and the word index of each
    item; a word that merges with its context (not one token there) is not read in that context."""
    from irm.words import locate

    items, word_of_row = [], []
    for i, word in enumerate(words):
        for prefix in contexts:
            text = prefix + word
            ids, positions = locate(tokenizer, text, len(prefix), len(text))
            if len(positions) == 1:
                items.append((ids, positions))
                word_of_row.append(i)
    return items, np.asarray(word_of_row, dtype=np.int64)
