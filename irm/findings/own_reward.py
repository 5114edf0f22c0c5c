"""Your own reward (issue 23): tau against VADER as a second reference, and the planted-words test (did the words a
planted reward signs against VADER move toward it, tuned vs base?)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from irm.findings.rows import Row, finding, interval, load, num, p_text, row_builder
from irm.findings.verdicts import NOT_TESTED, verdict_from_interval, verdict_from_two_sided

PLANTED_RULE = ("per word, the move tuned - base of its implicit value (each model's R output on the lexicon's scale, "
                "control_words.csv) minus the move a least-squares line through every word's (base value, move) "
                "predicts (so a general shrinkage or drift of the tuned chain cancels), signed toward the planted "
                "value for a planted word and away from VADER's sign for the others (the way a flip would move "
                "them); statistic: mean over the planted words minus mean over the others. p: permutation of which "
                "words are planted (scipy.stats.permutation_test, two-sided); interval: bootstrap over words "
                "(scipy.stats.bootstrap, percentile)")


def planted_shift(base, tuned, vader, planted, n_resamples: int = 999, seed: int = 0) -> dict:
    """The per-set test of a planted reward (PLANTED_RULE), from arrays over the same words: `base` and `tuned` each
    model's implicit value of every word, `vader` VADER's value (0 where it has none), `planted` the planted value
    of a planted word and NaN for every other word. Returns {shift, shift_sd (shift over the sd of the other words'
    scores), ci95, p, n_planted, n_other, rule}; shift > 0:
    the planted words moved toward their planted values more than the other words moved away from VADER."""
    from scipy.stats import bootstrap, permutation_test

    base, tuned, vader, planted = (np.asarray(v, dtype=np.float64) for v in (base, tuned, vader, planted))
    move = tuned - base
    slope, intercept = np.polyfit(base, move, 1)
    residual = move - (intercept + slope * base)
    is_planted = np.isfinite(planted)
    direction = np.where(is_planted, np.sign(np.nan_to_num(planted)), -np.sign(vader))
    keep = is_planted | (direction != 0)
    score = direction * residual
    a, b = score[keep & is_planted], score[keep & ~is_planted]
    out = {"shift": None, "shift_sd": None, "ci95": None, "p": None, "n_planted": int(len(a)), "n_other": int(len(b)),
           "rule": PLANTED_RULE}
    if len(a) < 2 or len(b) < 2:
        return out

    def diff(x, y, axis=-1):
        return np.mean(x, axis=axis) - np.mean(y, axis=axis)

    out["shift"] = float(diff(a, b))
    out["shift_sd"] = float(out["shift"] / np.std(b, ddof=1))  # in sds of a word's move: irm.calibration.planted's unit
    rng = np.random.default_rng(seed)
    out["p"] = float(permutation_test((a, b), diff, permutation_type="independent", alternative="two-sided",
                                      n_resamples=n_resamples, vectorized=True, random_state=rng).pvalue)
    ci = bootstrap((a, b), diff, n_resamples=n_resamples, vectorized=True, method="percentile", random_state=rng,
                   confidence_level=0.95).confidence_interval
    if np.isfinite(ci.low) and np.isfinite(ci.high):
        out["ci95"] = [float(ci.low), float(ci.high)]
    return out


PLANTED_CLAIM = "the planted words' implicit values moved toward the planted reward, relative to the other words"


def planted_row(result: dict, planted_words: Sequence[str]) -> Row:
    """The findings row of `planted_shift`'s result; its verdict from the permutation p and the shift's sign."""
    if result["shift"] is None:
        return finding(claim=PLANTED_CLAIM, number="none", control="none", verdict=NOT_TESTED,
                       detail=f"{result['n_planted']} planted and {result['n_other']} other words read by the control "
                              "stage: too few for the test", calibration="planted")
    return finding(
        claim=PLANTED_CLAIM,
        number=f"shift {num(result['shift'], signed=True)} {interval(result['ci95'])}",
        control="the other words' moves (shift 0), tuned vs base on the same words",
        verdict=verdict_from_two_sided(result["p"], result["shift"]),
        detail=f"{p_text(result['p'])}; {num(result['shift_sd'], 2)} sds of a word's move; "
               f"{result['n_planted']} planted words ({', '.join(sorted(planted_words))}), "
               f"{result['n_other']} others; {result['rule']}",
        calibration="planted", p_value=result["p"])


@row_builder
def planted_words_moved(root: Path) -> Optional[Row]:
    """Issue 23: when the training lexicon gives some words another sign than VADER (a planted reward, configs/
    planted.yaml), did those words' implicit values move toward it, tuned vs base (control_words.csv)? None when
    the control stage has not run or no word is planted."""
    from irm.reward import planted_words, vader_lexicon

    rows = load(root, "control_words")
    if not rows:
        return None
    planted = planted_words({r["word"]: float(r["true"]) for r in rows})
    if not planted:
        return None
    vader = vader_lexicon()
    words = [r["word"] for r in rows]
    result = planted_shift([float(r["base"]) for r in rows], [float(r["tuned"]) for r in rows],
                           [vader.get(w, 0.0) for w in words], [planted.get(w, np.nan) for w in words])
    return planted_row(result, list(planted))


@row_builder
def tau_against_vader(root: Path) -> Optional[Row]:
    """Issue 23: when the training reward is not VADER, the tuned model's reconstructed lexicon against VADER too,
    labelled as the second reference it is (kendall.json `vs_vader`); None for a VADER reward."""
    k = load(root, "kendall")
    if not k or "vs_vader" not in k:
        return None
    v = k["vs_vader"]
    return finding(
        claim="tau against VADER (a second reference, not the training reward)",
        number=f"tau {num(v.get('tau'))} {interval(v.get('ci95'))}",
        control="tau 0 (no agreement with VADER)",
        verdict=verdict_from_interval(v.get("ci95"), control=0.0),
        detail=f"{v.get('n')} words VADER lists; {p_text(v.get('p'))}; the training reward's reference: "
               f"{k.get('reference')}",
        p_value=v.get("p"), ci=v.get("ci95"))
