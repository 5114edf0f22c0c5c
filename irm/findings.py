"""Findings first (SPEC "Controls"): each claim of the paper, its number, its control, and a verdict that follows
from an interval or a p-value, never from hard-coded wording.

`build_findings(run_dir)` returns `summary.json["findings"]`: rows {claim, number, control, verdict, detail}, one per
claim whose artifacts exist, in the order of `ROW_BUILDERS`. To add a claim, write one function `(root: Path) ->
dict | list[dict] | None` that reads its stage's artifact (None when the artifact is missing: the claim was not
measured), builds the row with `finding(...)` and a verdict from one of the verdict functions below, and decorate it
with `@row_builder` (or append it to `ROW_BUILDERS`).

The three verdicts, for a claim "the effect is above the control's value":
- "supported": the 95% interval lies wholly above the control's value (or p < alpha in the claimed direction);
- "contradicted": it lies wholly below (or p < alpha in the opposite direction);
- "not distinguishable from the control": anything else, including an interval that touches the control's value.
A claim whose stage ran but had nothing to measure (no feature labelled related, so nothing to validate or ablate)
gets the row "not tested", with the reason: a claim that silently drops out of the table reads as no problem.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np

SUPPORTED = "supported"
NOT_DISTINGUISHABLE = "not distinguishable from the control"
CONTRADICTED = "contradicted"
NOT_TESTED = "not tested"
VERDICTS = (SUPPORTED, NOT_DISTINGUISHABLE, CONTRADICTED, NOT_TESTED)
ALPHA = 0.05  # the level of every p-value verdict (two one-sided tests, or a two-sided test read with its sign)
FIELDS = ("claim", "number", "control", "verdict", "detail", "calibration")

Row = dict[str, str]
RowBuilder = Callable[[Path], Union[Row, list, None]]
ROW_BUILDERS: list[RowBuilder] = []


# ---------------------------------------------------------------------------------------------------------------
# Verdicts


def verdict_from_interval(ci: Optional[Sequence[float]], control: float = 0.0) -> str:
    """The verdict on "the effect is above `control`" from its 95% interval [lo, hi]. No interval (too few data)
    cannot tell the effect from the control."""
    if ci is None or any(v is None or not np.isfinite(v) for v in ci):
        return NOT_DISTINGUISHABLE
    lo, hi = float(ci[0]), float(ci[1])
    if lo > hi:
        raise ValueError(f"an interval runs from low to high, got [{lo}, {hi}]")
    if lo > control:
        return SUPPORTED
    if hi < control:
        return CONTRADICTED
    return NOT_DISTINGUISHABLE


def verdict_from_p(p_greater: Optional[float], p_less: Optional[float], alpha: float = ALPHA) -> str:
    """The verdict on "the effect is above the control" from the two one-sided p-values of a test (e.g. the upper and
    lower tail of a permutation null): supported when the upper one is below `alpha`, contradicted when the lower
    one is, else not distinguishable."""
    if p_greater is not None and p_greater < alpha:
        return SUPPORTED
    if p_less is not None and p_less < alpha:
        return CONTRADICTED
    return NOT_DISTINGUISHABLE


def verdict_from_two_sided(p: Optional[float], effect: Optional[float], alpha: float = ALPHA) -> str:
    """The verdict on "the effect is above the control" from a two-sided p-value and the effect's sign (effect =
    estimate minus the control's value)."""
    if p is None or effect is None or not p < alpha or effect == 0:
        return NOT_DISTINGUISHABLE
    return SUPPORTED if effect > 0 else CONTRADICTED


def permutation_p(observed: float, null: Sequence[float], alternative: str = "greater") -> float:
    """Permutation p-value with the observed statistic counted among the null draws, (1 + #{null >= observed}) /
    (1 + n) for `greater` (`less`: <=), so it is never 0 and is exact under exchangeability. NaN draws (a refit whose
    statistic is undefined) are dropped."""
    null = np.asarray(null, dtype=np.float64)
    null = null[np.isfinite(null)]
    if alternative == "greater":
        hits = int((null >= observed).sum())
    elif alternative == "less":
        hits = int((null <= observed).sum())
    else:
        raise ValueError(f"alternative must be 'greater' or 'less', got {alternative!r}")
    return (1 + hits) / (1 + len(null))


# ---------------------------------------------------------------------------------------------------------------
# Rows


def finding(claim: str, number: str, control: str, verdict: str, detail: str, calibration: Optional[str] = None) -> Row:
    """One row. `calibration` names the finding's families in the calibration harness (`irm.calibration`), whose
    measured false-positive rate and power the row carries."""
    if verdict not in VERDICTS:
        raise ValueError(f"verdict must be one of {VERDICTS}, got {verdict!r}")
    return {"claim": claim, "number": number, "control": control, "verdict": verdict, "detail": detail,
            "calibration": calibration}


def ce_gaps(m: dict) -> Optional[tuple[float, float]]:
    """The two loss differences behind an SAE's CE loss recovered (sae/metrics.json): (L_SAE - L_clean, L_zero -
    L_clean) in nats per token, or None when they were not measured. A ratio over a gap of a few hundredths of a nat
    is read with them."""
    clean, zero, spliced = m.get("ce_clean"), m.get("ce_zero_ablated"), m.get("ce_spliced")
    if clean is None or zero is None or spliced is None:
        return None
    return spliced - clean, zero - clean


def _not_tested(claim: str, why: str) -> Row:
    return finding(claim=claim, number="none", control="none", verdict=NOT_TESTED, detail=why)


def row_builder(fn: RowBuilder) -> RowBuilder:
    """Register `fn` as a claim of the findings table (in definition order)."""
    ROW_BUILDERS.append(fn)
    return fn


def build_findings(root: Union[str, Path], builders: Optional[Sequence[RowBuilder]] = None) -> list[Row]:
    """Every registered claim whose artifacts are in `root`, as rows {claim, number, control, verdict, detail}."""
    root = Path(root)
    rows: list[Row] = []
    for build in ROW_BUILDERS if builders is None else builders:
        out = build(root)
        if out is None:
            continue
        for r in out if isinstance(out, list) else [out]:
            if set(r) != set(FIELDS) or r["verdict"] not in VERDICTS:
                raise ValueError(f"{build.__name__} built a malformed findings row: {r}")
            rows.append(r)
    return rows


def _load(root: Path, key: str) -> Optional[Any]:
    """Artifact `key` of the run, None if its stage has not run (a corrupt one is refused in one line)."""
    from irm.stages import read_artifact

    return read_artifact(root, key, missing_ok=True)


def num(x: Optional[float], digits: int = 3, signed: bool = False) -> str:
    if x is None:
        return "n/a"
    x = float(x)
    if x != 0 and abs(x) < 10 ** -digits:
        return f"{x:+.2e}" if signed else f"{x:.2e}"
    return f"{x:+.{digits}f}" if signed else f"{x:.{digits}f}"


def interval(ci: Optional[Sequence[float]], digits: int = 3) -> str:
    return "no interval" if not ci else f"[{num(ci[0], digits)}, {num(ci[1], digits)}]"


def p_text(p: Optional[float]) -> str:
    if p is None:
        return "p n/a"
    return "p < 1e-300" if p == 0 else (f"p = {p:.3f}" if p >= 1e-3 else f"p = {p:.1e}")


# ---------------------------------------------------------------------------------------------------------------
# The claims


def paired_reward(ev: Optional[dict]) -> Optional[dict]:
    """evaluate-reward's paired tuned - base difference as {mean, ci95, p_value, n}, from its `paired` entry (mean_diff,
    ci, p_value) or the older `difference` entry (mean, ci95, p_value); None when there is neither."""
    d = (ev or {}).get("paired") or (ev or {}).get("difference")
    if not d:
        return None
    return {"mean": d.get("mean_diff", d.get("mean")), "ci95": d.get("ci95", d.get("ci")),
            "p_value": d.get("p_value", d.get("p")), "n": d.get("n")}


@row_builder
def reward_raised(root: Path) -> Optional[Row]:
    """RLHF raised the reward: the paired tuned - base difference of evaluate-reward (same prefixes, same seeds)."""
    d = paired_reward(_load(root, "reward_eval"))
    if not d:
        return None
    p = d["p_value"]
    return finding(
        claim="RLHF raised the reward (paper table 7)",
        number=f"tuned - base mean reward {num(d.get('mean'), signed=True)}, 95% CI {interval(d.get('ci95'))}, "
               f"{p_text(p)}",
        control="the base model on the same held-out prefixes and sampling seeds (paired)",
        verdict=verdict_from_interval(d.get("ci95")),
        detail=f"n = {d.get('n')} paired completions; verdict from the 95% interval of the paired difference",
    )


def layer_gap_test(values: Sequence[float], k: int, per_tensor: Optional[dict] = None, n_perm: int = 2000,
                   seed: int = 0) -> dict:
    """Do the k most divergent layers stand out from the rest by more than chance picks? Statistic: mean divergence
    of the top k over the mean of the others. The top k are the largest by construction, so the null re-selects them
    in every draw: with per-tensor norms ({tensor name: [one per layer]}), each tensor's norms are permuted across
    layers independently (H0: no layer moved more than another, tensor by tensor); without them, the layers'
    values are resampled with replacement (H0: all layers' values come from one distribution)."""
    values = np.asarray(values, dtype=np.float64)
    n = len(values)
    if not 1 <= k < n:
        return {"ratio": None, "p": None, "n_perm": 0, "null": "none: needs 1 <= k < layers"}

    def ratio(v: np.ndarray) -> float:
        s = np.sort(v)[::-1]
        rest = s[k:].mean()
        return float(s[:k].mean() / rest) if rest > 0 else float("inf")

    observed = ratio(values)
    rng = np.random.default_rng(seed)
    if per_tensor:
        t = np.asarray([per_tensor[name] for name in sorted(per_tensor)], dtype=np.float64)  # tensors x layers
        null = [ratio(np.stack([rng.permutation(row) for row in t]).sum(axis=0)) for _ in range(n_perm)]
        how = "each tensor's norm permuted across layers, top k re-selected in every draw"
    else:
        null = [ratio(rng.choice(values, size=n, replace=True)) for _ in range(n_perm)]
        how = "layers' values resampled with replacement, top k re-selected in every draw (no per-tensor norms)"
    return {"ratio": observed, "p": permutation_p(observed, null), "n_perm": n_perm, "null": how}


@row_builder
def layers_moved(root: Path) -> Optional[Row]:
    """The chosen layers moved more than the others (divergence.json)."""
    div = _load(root, "divergence")
    if not div or not div.get("values") or not div.get("top_k"):
        return None
    values, top = div["values"], div["top_k"]
    test = layer_gap_test(values, len(top), div.get("per_tensor"))
    p = test["p"]
    return finding(
        claim=f"the {len(top)} chosen layers ({', '.join(map(str, top))}) moved more than the others (paper 4.2)",
        number=f"their mean divergence is {num(test['ratio'])} x the others', {p_text(p)}",
        control=f"chance top-{len(top)} picks: {test['null']}",
        # one-sided: a ratio below the null's cannot happen for the top k, so only "supported" or "not distinguishable"
        verdict=verdict_from_p(p, None),
        detail=f"{len(values)} layers, {test['n_perm']} null draws; spread of all layers "
               f"{num(100 * (max(values) - min(values)) / (sum(values) / len(values)), 1)}% of their mean",
    )


SAE_FIT_RATIO = 2.0  # the control's premise is flagged when the SAEs' NMSE on M_base exceeds this x M_RLHF's (+0.1)


def tau_against_null(claim: str, what: str, k: dict, perm: dict, note: str) -> Row:
    """A claim that R's Kendall tau beats R refit on sign-shuffled targets (control.json's permutation null)."""
    return finding(
        claim=claim,
        number=f"Kendall tau {num(k['tau'])} over {k['n']} {what}",
        control=f"R refit on sign-shuffled targets, the same words ({perm['n']} refits: null tau 95% range "
                f"{interval(perm.get('q95'))})",
        verdict=verdict_from_p(perm["p_greater"], perm["p_less"]),
        detail=f"permutation {p_text(perm['p_greater'])} (one-sided); {note}",
    )


@row_builder
def lexicon_reconstructed(root: Path) -> Optional[list]:
    """The implicit reward reconstructs the lexicon: tau of the tuned model's R against R refit on sign-shuffled
    targets; and what the SAE adds over the raw activations."""
    c = _load(root, "control")
    if not c or "tuned" not in c:
        return None
    t = c["tuned"]
    rows = [tau_against_null("the tuned model's implicit reward reconstructs the lexicon (paper 5.1)", "words",
                             t["tau"]["all"], t["permutation"]["all"],
                             "the same closed-form ridge chain as the base-model control")]
    sae_gain = c.get("sae_vs_raw", {}).get("tuned", {}).get("all")
    if sae_gain:
        rows.append(finding(
            claim="the SAE features carry the reward better than the raw MLP activations they encode",
            number=f"tau(SAE codes) - tau(raw) = {num(sae_gain['delta'], signed=True)}, 95% CI "
                   f"{interval(sae_gain['ci95'])}",
            control=f"R fitted on the raw activations at the same tokens (tau {num(t['raw_tau']['all']['tau'])})",
            verdict=verdict_from_interval(sae_gain["ci95"]),
            detail="paired bootstrap over words (scipy.stats.bootstrap, percentile); tuned model",
        ))
    return rows


@row_builder
def differs_from_base(root: Path) -> Optional[Row]:
    """RLHF moved the implicit reward toward the training reward: delta_tau = tau_tuned - tau_base."""
    c = _load(root, "control")
    if not c or "delta_tau" not in c:
        return None
    d = c["delta_tau"]["all"]
    moves = c.get("per_word", {})
    fit = (c.get("sae_fit") or {}).get("nmse_at_sentiment_tokens") or {}
    caution = ""
    base_nmse, tuned_nmse = fit.get("base"), fit.get("tuned")
    if base_nmse is not None and tuned_nmse is not None and base_nmse > SAE_FIT_RATIO * tuned_nmse + 0.1:
        caution = (f"; CAUTION: the tuned SAEs reconstruct M_base far worse than M_RLHF (NMSE {num(fit['base'])} vs "
                   f"{num(fit['tuned'])}): RLHF moved the activations so far that one dictionary does not serve both "
                   "models, and this control compares through a dictionary that does not fit M_base")
    return finding(
        claim="RLHF moved the implicit reward toward the training reward (tau_tuned > tau_base)",
        number=f"delta_tau = {num(d['delta'], signed=True)}, 95% CI {interval(d['ci95'])} (tau_tuned "
               f"{num(c['tuned']['tau']['all']['tau'])}, tau_base {num(c['base']['tau']['all']['tau'])})",
        control=f"the same triples, contexts and chain on the base model ({c.get('sae_choice', 'tuned SAEs')})",
        verdict=verdict_from_interval(d["ci95"]),
        detail=f"paired bootstrap over {d['n']} words; words that moved by more than {num(moves.get('threshold'))}: "
               f"{moves.get('n_moved_toward', 'n/a')} toward the reward, {moves.get('n_moved_away', 'n/a')} away"
               + caution,
    )


@row_builder
def generalises(root: Path) -> Optional[Row]:
    """Held-out generalisation: tau on words of lemma families R never saw, in contexts no triple used."""
    c = _load(root, "control")
    if not c or "tuned" not in c or "heldout" not in c["tuned"]["permutation"]:
        return None
    t = c["tuned"]
    k, perm = t["tau"]["heldout"], t["permutation"]["heldout"]
    if k.get("tau") is None:
        return None
    return tau_against_null("the implicit reward generalises to unseen words (paper 5.1, held out)", "held-out words",
                            k, perm, "held-out words: whole lemma families kept out of every triple, read in "
                                     "contexts no triple used")


@row_builder
def dictionaries_share_features(root: Path) -> Optional[list]:
    """Each layer's two dictionaries share features (paper eq. 2): the max MMCS, with its bootstrap interval over the
    small dictionary's features, against the MMCS of random dictionaries of the same shapes (mmcs.json). The detail
    carries the SAEs' quality (sae/metrics.json): an MMCS above chance between dense or dead dictionaries means
    little."""
    mmcs = _load(root, "mmcs")
    if not mmcs or not mmcs.get("layers"):
        return None
    quality = (_load(root, "sae_metrics") or {}).get("layers") or {}
    rows = []
    for layer, rec in sorted(mmcs["layers"].items(), key=lambda kv: int(kv[0])):
        chance = (rec.get("chance") or {}).get("max")
        if not chance:
            continue
        saes = quality.get(layer) or {}
        sae_text = "; ".join(
            f"{name}: L0 {num(m.get('l0'), 1)} of {m.get('width')}, explained variance "
            f"{num(m.get('explained_variance'))} ({num(m.get('explained_variance_after_first'))} without first "
            f"tokens), dead {num(100 * m['dead_fraction'] if m.get('dead_fraction') is not None else None, 1)}%, "
            f"CE loss recovered {num(m.get('ce_loss_recovered'))}" + (
                f" (splice {num(ce_gaps(m)[0], signed=True)} nats, zeroing the layer "
                f"{num(ce_gaps(m)[1], signed=True)})" if ce_gaps(m) else "")
            for name, m in sorted(saes.items(), key=lambda kv: int(kv[0][1:])))
        init = rec.get("init") or {}
        rows.append(finding(
            claim=f"layer {layer}: the {rec.get('dictionaries', {}).get('small', 'small')} and "
                  f"{rec.get('dictionaries', {}).get('large', 'large')} dictionaries share features (MMCS, eq. 2)",
            number=f"MMCS {num(rec['max'])} {interval(rec.get('max_ci95'))}",
            control=f"random dictionaries of the same shapes: {num(chance['mean'])} ± {num(chance['std'])} "
                    f"({len(chance.get('draws', []))} draws)",
            verdict=verdict_from_interval(rec.get("max_ci95"), control=chance["mean"]),
            detail=f"MMCS - chance = {num(rec['max'] - chance['mean'], signed=True)}; SAEs at initialisation "
                   f"{num(init.get('max'))}; firing features {(rec.get('firing') or {}).get('small', 'n/a')} / "
                   f"{(rec.get('firing') or {}).get('large', 'n/a')}"
                   + (f"; SAE quality on held-out data: {sae_text}" if sae_text else ""),
        ))
    return rows or None


@row_builder
def related_features_fire_where_r_is_high(root: Path) -> Optional[Row]:
    """Table 6: the features labelled related fire more often where R predicts a large delta than the *other
    explained* features of the same layers (validation.json), by a label-permutation test in both tails."""
    val = _load(root, "validation")
    claim = "the features labelled related to the reward fire where R predicts a large delta (paper 4.4, table 6)"
    if val is not None and val.get("n_related") == 0:
        return _not_tested(claim, "no explained feature was labelled related to the reward (explanations.jsonl)")
    vs = ((val or {}).get("vs_other_explained") or {}).get("inputs above threshold")
    if not vs or vs.get("p_value") is None:
        return None
    return finding(
        claim=claim,
        number=f"activation frequency {num(vs['related_frequency'])} over {vs['n_related']} related features; "
               f"lift {num(vs.get('lift'), 2)}",
        control=f"the {vs['n_other']} other explained features of the same layers: {num(vs['other_frequency'])}",
        verdict=verdict_from_p(vs["p_value"], vs.get("p_value_less")),
        detail=f"label permutation: {p_text(vs['p_value'])} (fire more), {p_text(vs.get('p_value_less'))} (fire "
               f"less); {val.get('n_inputs_above')} of {val.get('n_inputs')} positions above R > "
               f"{val.get('threshold')}",
    )


@row_builder
def ablation_lowers_reward(root: Path) -> Optional[list]:
    """Table 5: zero-ablating the labelled features lowers the reward, as paired differences on the same prompts
    against the splice with nothing ablated and against frequency-matched random features (ablation.json). The
    claim is a drop, so the verdict reads the negated interval against 0."""
    abl = _load(root, "ablation")
    if abl is not None and abl.get("n_features") == 0:
        return [_not_tested("ablating the labelled features lowers the reward (paper 5.2, table 5)",
                            "no feature of the small dictionaries was labelled related to the reward, so none was "
                            "ablated (explanations.jsonl)")]
    if not abl:
        return None
    rows = []
    for mode, conds in abl.get("modes", {}).items():
        for key, control in (("ablated_minus_splice", "the SAE splice with nothing ablated"),
                             ("ablated_minus_random", f"{abl.get('random_draws')} draws of as many random features "
                                                      f"matched on firing frequency")):
            d = conds.get(key)
            if not d:
                continue
            ci = d.get("ci95")
            rows.append(finding(
                claim=f"ablating the {abl['n_features']} labelled feature{'s' if abl['n_features'] != 1 else ''} "
                      f"lowers the reward ({mode} splice; paper 5.2, table 5)",
                number=f"reward difference {num(d['mean'], signed=True)} {interval(ci)}",
                control=control,
                verdict=verdict_from_interval(None if ci is None else [-ci[1], -ci[0]], control=0.0),
                detail="; ".join(part for part in (
                    f"paired on {abl.get('n_prompts')} prompts", d.get("interval"),
                    p_text(d["p_value"]) if d.get("p_value") is not None else None,
                    f"between-draw sd {num(d['between_draw_std'])}" if d.get("between_draw_std") is not None
                    else None) if part),
            ))
    return rows or None


# ---------------------------------------------------------------------------------------------------------------
# Your own reward (issue 23): tau against VADER as a second reference, and the planted-words test


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
        calibration="planted")


@row_builder
def planted_words_moved(root: Path) -> Optional[Row]:
    """Issue 23: when the training lexicon gives some words another sign than VADER (a planted reward, configs/
    planted.yaml), did those words' implicit values move toward it, tuned vs base (control_words.csv)? None when
    the control stage has not run or no word is planted."""
    from irm.reward import planted_words, vader_lexicon

    rows = _load(root, "control_words")
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
    k = _load(root, "kendall")
    if not k or "vs_vader" not in k:
        return None
    v = k["vs_vader"]
    return finding(
        claim="tau against VADER (a second reference, not the training reward)",
        number=f"tau {num(v.get('tau'))} {interval(v.get('ci95'))}",
        control="tau 0 (no agreement with VADER)",
        verdict=verdict_from_interval(v.get("ci95"), control=0.0),
        detail=f"{v.get('n')} words VADER lists; {p_text(v.get('p'))}; the training reward's reference: "
               f"{k.get('reference')}")
