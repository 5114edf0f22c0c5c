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
from irm.readout import (SUBSETS, floats, heldout_and_seen, kendall, lexicon_words, per_word, rescale,
                         subset_masks, unseen_contexts, word_items)
from irm.stages import artifact, relpath

LEXICON_CSV = relpath("lexicon")
KENDALL_JSON = relpath("kendall")
TAU_ON = ("raw: R's output averaged per word. The [-4, 4] rescaling is monotone, but its clipping ties the words "
          "beyond the percentiles, which would change tau")


# ---------------------------------------------------------------------------------------------------------------
# The maths


def sign_agreement(true, predicted) -> Optional[float]:
    """Fraction of words whose predicted sign equals the true sign (a prediction of exactly 0 agrees with none)."""
    x, y = floats(true, "true values"), floats(predicted, "predicted values")
    return float(np.mean(np.sign(x) == np.sign(y))) if len(x) else None


def summarise(words: Sequence[str], true, raw, heldout: set[str], seen: set[str], percentiles: Sequence[float],
              bootstrap: int, seed: int, sample_size: int) -> tuple[list[dict], dict]:
    """Rows of lexicon.csv and the contents of kendall.json from per-word values."""
    true, raw = floats(true, "true values"), floats(raw, "raw values")
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
    return {**kendall(values[keep], floats(raw, "raw values")[keep], bootstrap, seed),
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


def run(cfg: RunConfig) -> Optional[dict]:
    from irm.parallel import launch

    return launch(cfg, _lexicon)  # the lexicon section's ranges: irm.config.check_all, before any stage runs


def _lexicon(ranks, cfg: RunConfig) -> Optional[dict]:
    """One process's part of the stage: R's output on its contiguous share of the items, gathered in item order;
    rank 0 averages per word, computes Kendall tau and writes the outputs."""
    from irm.sae.splice import load_saes, n_codes
    from irm.models import load_tuned
    from irm.parallel import split_list
    from irm.sae.splice import codes_at  # every context run once, the words against its key/value cache
    from irm.readers import load_irm
    from irm.reward import is_vader, reference_lexicon, reference_name
    from irm.runtime import start
    from irm.stages import mark_done

    lc = cfg.lexicon
    device = start(cfg.seed, ranks=ranks)
    root = Path(cfg.run_dir)
    weight, bias, layers = load_irm(root)
    info = read_json(artifact(root, "triples_summary"))
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
