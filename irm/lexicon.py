"""Lexicon reconstruction and Kendall tau (paper 5.1, H, I): R applied to the SAE codes of every single-token
lexicon word in the same corpus contexts (none of them a training triple's context: triples.json `contexts`),
averaged per word, rescaled onto the lexicon's [-4, 4], and compared with the true lexicon by Kendall tau (scipy, on
the two value vectors) over all words, negative words only, words seen in the triples and held-out words (whole
lemma families no triple used): only the last measures generalisation. With `devices: N`, N processes
each apply R to their share of the (word, context) items and only those scalars are gathered (R is linear).
"""

from __future__ import annotations

import csv
import io
import random
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from irm.artifacts import read_json, write_json, write_text
from irm.config import RunConfig
from irm.errors import UserError
from irm.stages import relpath

LEXICON_CSV = relpath("lexicon")
KENDALL_JSON = relpath("kendall")
BOUND = 4.0  # the VADER lexicon's range is [-4, 4]
SUBSETS = ("all", "negative", "heldout", "seen")
TAU_ON = ("raw: R's output averaged per word. The [-4, 4] rescaling is monotone, but its clipping ties the words "
          "beyond the percentiles, which would change tau")


# ---------------------------------------------------------------------------------------------------------------
# The maths


def _floats(values, name: str) -> np.ndarray:
    arr = np.asarray(values)
    if arr.dtype.kind not in "fiu":
        raise TypeError(f"{name} must be numbers, got {arr.dtype} (Kendall tau is computed on values, never words)")
    return arr.astype(np.float64)


def rescale(raw, percentiles: Sequence[float] = (10.0, 90.0)) -> tuple[np.ndarray, dict]:
    """Map the given percentiles of `raw` onto [-4, 4] (affine) and clip: the authors' normalisation."""
    raw = _floats(raw, "raw values")
    lo_p, hi_p = percentiles  # in range: irm.config.validate checks lexicon.percentiles before any stage runs
    lo, hi = (float(v) for v in np.percentile(raw, [lo_p, hi_p]))
    mapping = {"kind": f"affine: percentile {lo_p:g} -> -4, percentile {hi_p:g} -> +4, then clipped to [-4, 4]",
               "percentiles": [lo_p, hi_p], "raw_at_percentiles": [lo, hi], "bound": BOUND}
    return apply_mapping(raw, mapping), mapping


def apply_mapping(raw, mapping: dict) -> np.ndarray:
    lo, hi = mapping["raw_at_percentiles"]
    raw = _floats(raw, "raw values")
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

    x, y = _floats(true, "true values"), _floats(predicted, "predicted values")
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


def sign_agreement(true, predicted) -> Optional[float]:
    """Fraction of words whose predicted sign equals the true sign (a prediction of exactly 0 agrees with none)."""
    x, y = _floats(true, "true values"), _floats(predicted, "predicted values")
    return float(np.mean(np.sign(x) == np.sign(y))) if len(x) else None


def per_word(values, word_of_row, n_words: int) -> np.ndarray:
    """Mean of `values` over the rows of each word (rows labelled 0..n_words-1): a scalar per row, or a row of
    features per row (then a words x features matrix)."""
    values = _floats(values, "values")
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


def summarise(words: Sequence[str], true, raw, heldout: set[str], seen: set[str], percentiles: Sequence[float],
              bootstrap: int, seed: int, sample_size: int) -> tuple[list[dict], dict]:
    """Rows of lexicon.csv and the contents of kendall.json from per-word values."""
    true, raw = _floats(true, "true values"), _floats(raw, "raw values")
    reconstructed, mapping = rescale(raw, percentiles)
    masks = subset_masks(words, true, heldout, seen)
    report = {name: kendall(true[m], raw[m], bootstrap, seed) for name, m in masks.items()}
    rows = [{"word": w, "true": float(t), "reconstructed": float(r), "raw": float(v), "heldout": int(h),
             "seen": int(s)}
            for w, t, r, v, h, s in zip(words, true, reconstructed, raw, masks["heldout"], masks["seen"])]
    sample = random.Random(f"irm-lexicon-sample:{seed}").sample(rows, min(sample_size, len(rows)))
    report.update({
        "tau_on": TAU_ON,
        "sign_agreement": sign_agreement(true, raw),
        "sign_agreement_heldout": sign_agreement(true[masks["heldout"]], raw[masks["heldout"]]),
        "sign_on": "raw R output (0 is R's own neutral point; the percentile mapping moves zero)",
        "mapping": mapping,
        "n_words": len(words),
        "sample": sorted(sample, key=lambda r: r["true"]),
    })
    return rows, report


def against_vader(words: Sequence[str], raw, bootstrap: int, seed: int) -> dict:
    """Kendall tau of R's per-word output against VADER's values, over the words VADER lists: the second reference
    when the training reward is not VADER (what the base model's sentiment knowledge alone would give)."""
    from irm.reward import vader_lexicon

    vader = vader_lexicon()
    keep = np.array([w in vader for w in words], dtype=bool)
    values = np.array([vader.get(w, 0.0) for w in words])
    return {**kendall(values[keep], _floats(raw, "raw values")[keep], bootstrap, seed),
            "reference": "VADER (not the training reward: a second reference)"}


def lexicon_csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=["word", "true", "reconstructed", "raw", "heldout", "seen"],
                            lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({**row, "true": f"{row['true']:g}", "reconstructed": f"{row['reconstructed']:.6g}",
                         "raw": repr(row["raw"])})
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------------------------
# The stage


def choose_contexts(triples: list[dict], k: int, seed: int) -> list[str]:
    """`k` distinct triple prefixes (the text before the sentiment word), seeded; every word is read in the same
    contexts, so differences between words are not differences between contexts."""
    prefixes = sorted({t["prefix"] for t in triples if t["prefix"].strip()}) or [""]
    random.Random(f"irm-lexicon-contexts:{seed}").shuffle(prefixes)
    return prefixes[:k]


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
    from irm.triples import token_counts

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
    from irm.triples import locate

    items, word_of_row = [], []
    for i, word in enumerate(words):
        for prefix in contexts:
            text = prefix + word
            ids, positions = locate(tokenizer, text, len(prefix), len(text))
            if len(positions) == 1:
                items.append((ids, positions))
                word_of_row.append(i)
    return items, np.asarray(word_of_row, dtype=np.int64)


def run(cfg: RunConfig) -> Optional[dict]:
    from irm.parallel import launch

    return launch(cfg, _lexicon)  # the lexicon section's ranges: irm.config.validate, before any stage runs


def _lexicon(ranks, cfg: RunConfig) -> Optional[dict]:
    """One process's part of the stage: R's output on its contiguous share of the items, gathered in item order;
    rank 0 averages per word, computes Kendall tau and writes the outputs."""
    from irm.sae.splice import load_saes, n_codes
    from irm.models import load_tuned
    from irm.parallel import split_list
    from irm.sae.splice import codes_at  # every context run once, the words against its key/value cache
    from irm.regression import load_irm
    from irm.reward import is_vader, reference_lexicon, reference_name
    from irm.runtime import start
    from irm.stages import mark_done
    from irm.triples import TRIPLES_JSON

    lc = cfg.lexicon
    device = start(cfg.seed, ranks=ranks)
    root = Path(cfg.run_dir)
    weight, bias, layers = load_irm(root)
    info = read_json(root / TRIPLES_JSON)
    heldout, seen = heldout_and_seen(info)
    lexicon = reference_lexicon(cfg.reward)
    model, tokenizer = load_tuned(cfg, device=device)
    saes = load_saes(root, layers, model, cfg.cache.site, cfg.sae.dictionary_pair()[0])
    n_features = len(layers) * n_codes(saes)
    if n_features != weight.numel():
        raise UserError(f"R has {weight.numel()} features but the SAEs of layers {layers} give {n_features}; rerun "
                        "`python -m irm deltas` and `python -m irm regression`")

    words, word_counts = lexicon_words(tokenizer, lexicon, lc.max_words, cfg.seed)
    contexts = unseen_contexts(info, lc.contexts_per_word, cfg.seed)
    items, word_of_row = word_items(tokenizer, words, contexts)
    codes = codes_at(model, saes, split_list(items, ranks), tokenizer.pad_token_id, cfg.cache.batch_size,
                     cfg.cache.site, desc="lexicon: words in context", progress_bar=ranks.is_main)
    x = codes.flatten(1)
    r = np.concatenate(ranks.gather((x @ weight.to(x.dtype) + bias).numpy()))  # shares in rank order: item order

    report = None
    if ranks.is_main:
        kept = np.unique(word_of_row)
        remap = np.full(len(words), -1)
        remap[kept] = np.arange(len(kept))
        words = [words[i] for i in kept]
        raw = per_word(r, remap[word_of_row], len(words))
        true = np.array([lexicon[w] for w in words])
        rows, report = summarise(words, true, raw, heldout, seen, lc.percentiles, lc.bootstrap, cfg.seed,
                                 lc.sample_size)
        report["reference"] = reference_name(cfg.reward)
        if not is_vader(cfg.reward):
            report["vs_vader"] = against_vader(words, raw, lc.bootstrap, cfg.seed)
        report.update({
            "contexts": {"n": len(contexts), "how": "the same seeded contexts for every word, the word appended at "
                         "the sentiment position; none is a training triple's context (triples.json `contexts`)"},
            "words_evaluated": len(words),
            **word_counts,
            "merged_in_context_skipped": int(len(remap) - len(kept)),
            "layers": layers,
        })
        write_text(root / LEXICON_CSV, lexicon_csv(rows))
        write_json(root / KENDALL_JSON, report)
        mark_done(cfg, "lexicon", [LEXICON_CSV, KENDALL_JSON])
        print(f"lexicon: {len(words)} of {word_counts['single_token_words']} single-token lexicon words in "
              f"{len(contexts)} contexts "
              f"({report['multi_token_words_skipped']} multi-token words skipped); held out: "
              f"{report['heldout']['n']}")
        print(f"  reference: {report['reference']}")
        for name in (*SUBSETS, "vs_vader") if "vs_vader" in report else SUBSETS:
            k = report[name]
            ci = "" if k["ci95"] is None else f", 95% CI [{k['ci95'][0]:.3f}, {k['ci95'][1]:.3f}]"
            tau = "undefined" if k["tau"] is None else f"{k['tau']:.3f} (p={k['p']:.2g}{ci})"
            print(f"  Kendall tau, {name:<8} n={k['n']:<5} {tau}")
        print(f"  sign agreement {report['sign_agreement']:.3f}")
    ranks.barrier()
    return report
