"""Findings first (SPEC "Controls"): each claim of the paper, its number, its control, and a verdict that follows
from an interval or a p-value, never from hard-coded wording.

`build_findings(run_dir)` returns `summary.json["findings"]`: rows {claim, number, control, verdict, detail}, one per
claim whose artifacts exist, in the order of `ROW_BUILDERS`. To add a claim, write one function `(root: Path) ->
dict | list[dict] | None` that reads its stage's artifact (None when the artifact is missing: the claim was not
measured), builds the row with `finding(...)` and a verdict from one of the verdict functions below, and decorate it
with `@row_builder` (or append it to `ROW_BUILDERS`).

The three verdicts, for a claim "the effect is above the control's value", at one convention for the whole table:
two-sided level ALPHA = 0.05, i.e. 2.5% in each direction (a 95% interval, or a one-sided p-value against ALPHA / 2):
- "supported": the 95% interval lies wholly above the control's value (or p < alpha / 2 in the claimed direction);
- "contradicted": it lies wholly below (or p < alpha / 2 in the opposite direction);
- "not distinguishable from the control": anything else, including an interval that touches the control's value.
Across the table the rows' two-sided p-values (`p_value`) are Holm-corrected (`holm`): a row whose corrected p is
not below ALPHA is "not distinguishable" whatever its own interval says, so the chance that any row of a run is a
false positive stays at ALPHA. A row without a p-value keeps its own verdict and says it is outside the correction.
A claim whose stage ran but had nothing to measure (no feature labelled related, so nothing to validate or ablate; an
undefined held-out tau) gets the row "not tested", with the reason: a claim that silently drops out of the table
reads as no problem.

Every row names its calibration key (`irm.calibration`): `build_findings` adds the false-positive rate measured in
the harness's null worlds (the largest over the finding's null families) and, for a "not distinguishable" row, the
smallest effect this run could have detected with 80% power, from the run's calibration.json when it has one.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np

SUPPORTED = "supported"
NOT_DISTINGUISHABLE = "not distinguishable from the control"
CONTRADICTED = "contradicted"
NOT_TESTED = "not tested"
VERDICTS = (SUPPORTED, NOT_DISTINGUISHABLE, CONTRADICTED, NOT_TESTED)
ALPHA = 0.05  # two-sided level of every verdict: 95% intervals, one-sided p-values against ALPHA / 2
FIELDS = ("claim", "number", "control", "verdict", "detail", "calibration", "p_value", "interval_mde")
# What build_findings adds to every row: the Holm-corrected p and the calibration harness's numbers.
ADDED = ("p_holm", "false_positive_rate", "false_positive_ci95", "minimal_detectable_effect", "effect_unit",
         "mde_source", "certified_false_positive_rate", "certified_false_positive_ci95", "certified_worlds")
Z_POWER = 1.959964 + 0.841621  # two-sided 5% plus 80% power, in standard errors
CERTIFIED = Path(__file__).parent / "calibration" / "certified.json"  # the full harness's results (irm.calibration)


@lru_cache(maxsize=1)
def read_certified() -> dict:
    """Per finding, the full harness's summary (`irm.calibration.stage.summarise`: the worst null family's
    false-positive rate, its 95% interval, name and number of worlds); {} when the file is absent."""
    import json

    if not CERTIFIED.exists():
        return {}
    return json.loads(CERTIFIED.read_text()).get("findings") or {}


def interval_mde(ci: Optional[Sequence[float]]) -> Optional[float]:
    """The smallest effect a 95% interval of this width detects with 80% power (two-sided 5%): (z_0.975 + z_0.8)
    standard errors, the standard error read off the interval as its width over 2 x 1.96. None without an
    interval."""
    if not ci or any(v is None or not np.isfinite(v) for v in ci):
        return None
    return Z_POWER * (float(ci[1]) - float(ci[0])) / (2 * 1.959964)

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
    lower tail of a permutation null): supported when the upper one is below `alpha` / 2, contradicted when the
    lower one is, else not distinguishable (the table's one convention: two-sided level `alpha`)."""
    if p_greater is not None and p_greater < alpha / 2:
        return SUPPORTED
    if p_less is not None and p_less < alpha / 2:
        return CONTRADICTED
    return NOT_DISTINGUISHABLE


def two_sided(p_greater: Optional[float], p_less: Optional[float]) -> Optional[float]:
    """The two-sided p-value of two one-sided ones (twice the smaller, at most 1)."""
    ps = [p for p in (p_greater, p_less) if p is not None]
    return min(1.0, 2 * min(ps)) if ps else None


def holm(p_values: Sequence[Optional[float]]) -> list[Optional[float]]:
    """Holm's step-down adjustment of the p-values that are not None (scipy.stats.false_discovery_control has no Holm;
    statsmodels' multipletests would be a dependency for five lines)."""
    idx = [i for i, p in enumerate(p_values) if p is not None]
    m = len(idx)
    out: list[Optional[float]] = [None] * len(p_values)
    running = 0.0
    for rank, i in enumerate(sorted(idx, key=lambda j: p_values[j])):
        running = max(running, min(1.0, (m - rank) * float(p_values[i])))
        out[i] = running
    return out


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


def finding(claim: str, number: str, control: str, verdict: str, detail: str, calibration: Optional[str] = None,
            p_value: Optional[float] = None, ci: Optional[Sequence[float]] = None) -> Row:
    """One row. `calibration` names the finding's families in the calibration harness (`irm.calibration`), whose
    measured false-positive rate and power the row carries; `p_value` is the row's two-sided p-value (the Holm
    correction across the table reads it; None: the row stays outside the correction); `ci`, the 95% interval
    of an interval verdict, gives the minimal detectable effect at this run's own noise (`interval_mde`)."""
    if verdict not in VERDICTS:
        raise ValueError(f"verdict must be one of {VERDICTS}, got {verdict!r}")
    return {"claim": claim, "number": number, "control": control, "verdict": verdict, "detail": detail,
            "calibration": calibration, "p_value": None if p_value is None else float(p_value),
            "interval_mde": interval_mde(ci)}


def ce_gaps(m: dict) -> Optional[tuple[float, float]]:
    """The two loss differences behind an SAE's CE loss recovered (sae/metrics.json): (L_SAE - L_clean, L_zero -
    L_clean) in nats per token, or None when they were not measured. A ratio over a gap of a few hundredths of a nat
    is read with them."""
    clean, zero, spliced = m.get("ce_clean"), m.get("ce_zero_ablated"), m.get("ce_spliced")
    if clean is None or zero is None or spliced is None:
        return None
    return spliced - clean, zero - clean


def _not_tested(claim: str, why: str, calibration: Optional[str] = None) -> Row:
    return finding(claim=claim, number="none", control="none", verdict=NOT_TESTED, detail=why,
                   calibration=calibration)


def row_builder(fn: RowBuilder) -> RowBuilder:
    """Register `fn` as a claim of the findings table (in definition order)."""
    ROW_BUILDERS.append(fn)
    return fn


def build_findings(root: Union[str, Path], builders: Optional[Sequence[RowBuilder]] = None,
                   calibration: Optional[dict] = None, certified: Optional[dict] = None) -> list[Row]:
    """Every registered claim whose artifacts are in `root`, as rows (FIELDS, then ADDED): Holm-corrected across
    the table (`correct`) and with the calibration harness's numbers (`calibrated`; from `calibration`, else the
    run's calibration.json when the calibrate stage ran; `certified`, else the full harness's committed table,
    `read_certified`)."""
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
    if calibration is None:
        calibration = _load(root, "calibration")
    if certified is None:
        certified = read_certified()
    return calibrated(correct(rows), calibration, certified)


def correct(rows: list[Row], alpha: float = ALPHA) -> list[Row]:
    """The rows with `p_holm` (Holm across the rows that have a two-sided p-value) and the verdict it allows: a
    supported or contradicted row whose corrected p is not below `alpha` becomes not distinguishable, saying so."""
    adjusted = holm([r.get("p_value") if r["verdict"] != NOT_TESTED else None for r in rows])
    m = sum(p is not None for p in adjusted)
    out = []
    for r, p in zip(rows, adjusted):
        r = {**r, "p_holm": p}
        if p is None and r["verdict"] != NOT_TESTED:
            r["detail"] += "; outside the Holm correction (no p-value)"
        elif p is not None and r["verdict"] in (SUPPORTED, CONTRADICTED) and not p < alpha:
            r["detail"] += (f"; {r['verdict']} on its own (p = {r['p_value']:.3g}), not after Holm's correction "
                            f"over the table's {m} tested rows (p = {p:.3g})")
            r["verdict"] = NOT_DISTINGUISHABLE
        out.append(r)
    return out


def calibrated(rows: list[Row], calibration: Optional[dict], certified: Optional[dict] = None) -> list[Row]:
    """The rows with their finding's measured false-positive rate (the largest over its null families, with its
    95% interval, from a calibration record: calibration.json {"findings": {key: {false_positive_rate,
    false_positive_ci95, minimal_detectable_effect, effect_unit}}}), the full harness's certified rate beside it
    (`certified`: {key: {false_positive_rate, false_positive_ci95, worlds}}, hundreds of worlds or more at the
    harness's sizes, where the run's own calibrate stage runs a few at the run's sizes) and, when not
    distinguishable, the minimal detectable effect at 80% power: from the row's own interval when it has one (this
    run's noise, `interval_mde`), else from the harness's planted worlds at this run's sizes, else (a finding whose
    worlds only the full harness runs, such as model diffing's) from its planted worlds at the harness's sizes
    (`mde_source` says which). None where none exists."""
    per_finding = (calibration or {}).get("findings") or {}
    out = []
    for r in rows:
        cert = (certified or {}).get(r.get("calibration") or "") or {}
        cal = per_finding.get(r.get("calibration") or "") or {}
        mde, source = None, None
        if r["verdict"] == NOT_DISTINGUISHABLE:
            if r.get("interval_mde") is not None:
                mde, source = r["interval_mde"], "this run's 95% interval: 2.8 standard errors"
            elif cal.get("minimal_detectable_effect") is not None:
                mde = cal["minimal_detectable_effect"]
                source = "calibration harness, planted worlds at this run's sizes"
            elif cert.get("minimal_detectable_effect") is not None:  # a finding only the full harness simulates
                mde, cal = cert["minimal_detectable_effect"], {**cal, "effect_unit": cert.get("effect_unit")}
                source = "calibration harness, planted worlds at the harness's sizes"
        out.append({**r, "false_positive_rate": cal.get("false_positive_rate"),
                    "false_positive_ci95": cal.get("false_positive_ci95"), "minimal_detectable_effect": mde,
                    "effect_unit": cal.get("effect_unit") if source and source.startswith("calibration") else None,
                    "mde_source": source, "certified_false_positive_rate": cert.get("false_positive_rate"),
                    "certified_false_positive_ci95": cert.get("false_positive_ci95"),
                    "certified_worlds": cert.get("worlds")})
    return out


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
    """evaluate-reward's paired tuned - base difference as {mean, ci95, p_value, p_signflip, n}, from its `paired`
    entry (mean_diff, ci, p_value, p_signflip) or the older `difference` entry (mean, ci95, p_value); None when
    there is neither. `p_signflip` is None in a run from before the sign-flip test."""
    d = (ev or {}).get("paired") or (ev or {}).get("difference")
    if not d:
        return None
    return {"mean": d.get("mean_diff", d.get("mean")), "ci95": d.get("ci95", d.get("ci")),
            "p_value": d.get("p_value", d.get("p")), "p_signflip": d.get("p_signflip"), "n": d.get("n")}


REWARD_CLAIM = "RLHF raised the reward (paper table 7)"


def reward_row(d: dict, claim: str = REWARD_CLAIM, quantity: str = "mean reward") -> Row:
    """The reward row from the paired tuned - base difference ({mean, ci95, p_value, p_signflip, n}:
    `paired_reward`). Its verdict is the exact sign-flip test's (two-sided 5%, the sign of the mean); an older
    run without it is judged by the t-interval, and the detail says which."""
    flip = d.get("p_signflip")
    if flip is None:
        verdict, p, how = (verdict_from_interval(d.get("ci95")), d["p_value"],
                           "verdict from the 95% t-interval of the paired difference (a run from before the "
                           "sign-flip test: `evaluate-reward --force` adds it)")
    else:
        from irm.stats import SIGN_FLIPS

        verdict, p = verdict_from_two_sided(flip, d.get("mean")), flip
        floor = f" (its floor: {SIGN_FLIPS:,} random flips)" if flip <= 1 / (1 + SIGN_FLIPS) else ""
        how = f"verdict from the exact sign-flip test, p = {flip:.2g}{floor}; interval and t-test p beside it"
    return finding(
        claim=claim,
        number=f"tuned - base {quantity} {num(d.get('mean'), signed=True)}, 95% CI {interval(d.get('ci95'))}, "
               f"t-test {p_text(d['p_value'])}",
        control="the base model on the same held-out prefixes and sampling seeds (paired)",
        verdict=verdict,
        detail=f"n = {d.get('n')} paired completions; {how}",
        calibration="reward", p_value=p, ci=d.get("ci95"),
    )


@row_builder
def reward_raised(root: Path) -> Optional[Row]:
    """RLHF raised the reward: the paired tuned - base difference of evaluate-reward (same prefixes, same seeds)."""
    d = paired_reward(_load(root, "reward_eval"))
    return reward_row(d) if d else None


@row_builder
def planted_words_learned(root: Path) -> Optional[Row]:
    """Issue 23: with a planted reward, did PPO learn the planted words themselves, or the words the planted reward
    still shares with VADER? The paired tuned - base difference of the planted words' part of the reward
    (evaluate-reward's `planted_part`), the other words' part in the detail. None without planted words."""
    part = (_load(root, "reward_eval") or {}).get("planted_part")
    if not part:
        return None
    row = reward_row(paired_reward({"paired": part["planted_words"]}),
                     claim="PPO raised the planted words' part of the reward (planted reward)",
                     quantity="planted words' part of the reward")
    other = part["other_words"]
    row["detail"] += (f"; {part['n_planted_words']} planted words; the other words' part moved "
                      f"{num(other['mean_diff'], signed=True)} {interval(other['ci'])}; parts not clipped, "
                      "completions only")
    return row


def layer_outlier_test(values: Sequence[float], k: int, n_sim: int = 4000, seed: int = 0) -> dict:
    """Do the k most divergent layers stand out from the others by more than the top k of layers that differ at
    random? Statistic: the gap between the mean log divergence of the top k and that of the others, in standard
    deviations of the others' logs. Null: every layer's log divergence drawn independently from one normal
    distribution (a random per-layer factor, no special layers): the statistic does not depend on that
    distribution's mean and spread, so its null is simulated exactly from standard normals, the top k re-selected
    in every draw. (Permuting each parameter tensor's norm across layers, the earlier null, tests only that the
    tensors of a layer move together: with a 3% random factor per layer it said "supported" in 40 of 40 worlds.)"""
    values = np.asarray(values, dtype=np.float64)
    n = len(values)
    if not 1 <= k <= n - 3 or (values <= 0).any():
        return {"statistic": None, "ratio": None, "p": None, "n_sim": 0,
                "null": "none: needs at least 3 layers besides the top k, every divergence positive"}

    def stat(v_SN: np.ndarray) -> np.ndarray:
        s = -np.sort(-v_SN, axis=-1)
        rest = s[..., k:]
        return (s[..., :k].mean(axis=-1) - rest.mean(axis=-1)) / rest.std(axis=-1, ddof=1)

    logs = np.log(values)
    observed = float(stat(logs[None])[0])
    null = stat(np.random.default_rng(seed).standard_normal((n_sim, n)))
    top = np.sort(values)[::-1]
    return {"statistic": observed, "ratio": float(top[:k].mean() / top[k:].mean()),
            "p": permutation_p(observed, null), "n_sim": n_sim,
            "null": "each layer's log divergence independent and normal (layers differing by a random factor, none "
                    "special), top k re-selected in every draw"}


def layer_row(div: dict) -> Row:
    """The layer claim's row from divergence.json's contents ({values, top_k})."""
    values, top = div["values"], div["top_k"]
    claim = (f"the {len(top)} chosen layers ({', '.join(map(str, top))}) moved more than layers differing at random "
             "would put on top (paper 4.2)")
    test = layer_outlier_test(values, len(top))
    if test["p"] is None:
        return _not_tested(claim, f"{len(values)} layers, top {len(top)}: {test['null']}", "layers")
    p = test["p"]
    return finding(
        claim=claim,
        number=f"their mean divergence is {num(test['ratio'])} x the others'; gap {num(test['statistic'], 2)} SD of "
               f"the others' log divergence, {p_text(p)}",
        control=f"the top {len(top)} of layers that differ at random: {test['null']}",
        # one direction only: the top k cannot fall below the rest, so "supported" or "not distinguishable"
        verdict=verdict_from_p(p, None),
        detail=f"{len(values)} layers, {test['n_sim']} null draws; spread of all layers "
               f"{num(100 * (max(values) - min(values)) / (sum(values) / len(values)), 1)}% of their mean. Tested: "
               "that these layers stand out from this run's other layers, not that another PPO seed or prompt set "
               "would pick them again (that needs a replicate run)",
        calibration="layers", p_value=min(1.0, 2 * p),
    )


@row_builder
def layers_moved(root: Path) -> Optional[Row]:
    """The chosen layers moved more than layers that differ at random (divergence.json)."""
    div = _load(root, "divergence")
    if not div or not div.get("values") or not div.get("top_k"):
        return None
    return layer_row(div)


SAE_FIT_RATIO = 2.0  # the control's premise is flagged when the SAEs' NMSE on M_base exceeds this x M_RLHF's (+0.1)


def tau_against_null(claim: str, what: str, k: dict, perm: dict, note: str, calibration: str) -> Row:
    """A claim that R's Kendall tau beats R refit on sign-shuffled targets (control.json's permutation null)."""
    return finding(
        claim=claim,
        number=f"Kendall tau {num(k['tau'])} over {k['n']} {what}",
        control=f"R refit on sign-shuffled targets, the same words ({perm['n']} refits: null tau 95% range "
                f"{interval(perm.get('q95'))})",
        verdict=verdict_from_p(perm["p_greater"], perm["p_less"]),
        detail=f"permutation {p_text(perm['p_greater'])} (one-sided, against {ALPHA / 2:g}); {note}",
        calibration=calibration, p_value=permutation_two_sided(k["tau"], perm),
    )


def permutation_two_sided(observed: Optional[float], perm: dict) -> Optional[float]:
    """The two-sided p of a permutation null for the Holm correction. Beyond every draw, the permutation p is only
    its floor 1 / (n + 1) (0.005 for 200 refits: Holm over ten rows could never pass it), so there the normal tail
    of the null (its mean and sd) stands in, never above the permutation p."""
    from scipy.stats import norm

    p = two_sided(perm.get("p_greater"), perm.get("p_less"))
    floor = 2.0 / (1 + perm.get("n", 0)) if perm.get("n") else None
    if p is None or floor is None or p > floor or not perm.get("sd") or perm.get("mean") is None:
        return p
    return min(p, float(2 * norm.sf(abs(observed - perm["mean"]) / perm["sd"])))


def delta_row(claim: str, number: str, control: str, d: dict, detail: str, calibration: str) -> Row:
    """A claim read from one of control.json's bootstrap comparisons ({delta, ci95, p_value, ...})."""
    return finding(claim=claim, number=number, control=control, verdict=verdict_from_interval(d.get("ci95")),
                   detail=detail, calibration=calibration, p_value=d.get("p_value"), ci=d.get("ci95"))


RESAMPLED = "bootstrap of triples (R refitted), contexts and words"


def lexicon_rows(c: dict) -> list:
    """The tuned model's tau against the permutation null, and what the SAE adds over the raw activations, from
    control.json's contents."""
    t = c["tuned"]
    claim_raw = "the SAE features carry the reward better than the raw MLP activations they encode"
    subset = "unseen" if "unseen" in t["tau"] else "all"
    k, perm = t["tau"][subset], t["permutation"][subset]
    claim = "the tuned model's implicit reward reconstructs the lexicon (paper 5.1)"
    if k.get("tau") is None or perm.get("p_greater") is None:
        rows = [_not_tested(claim, f"Kendall tau on the {k.get('n', 0)} words no triple used is undefined",
                            "lexicon_tau")]
    else:
        rows = [tau_against_null(
            claim, "words no triple used" if subset == "unseen" else "words", k, perm,
            f"tau over all {t['tau']['all']['n']} words {num(t['tau']['all']['tau'])}, but on the words the triples "
            "used R can read back the sign it was trained on, so the verdict reads the others; the same closed-form "
            "ridge chain as the base-model control", "lexicon_tau")]
    sae_gain = c.get("sae_vs_raw", {}).get("tuned", {}).get("all")
    if sae_gain and sae_gain.get("delta") is not None:
        rows.append(delta_row(
            claim_raw,
            f"tau(SAE codes) - tau(raw) = {num(sae_gain['delta'], signed=True)}, 95% CI {interval(sae_gain['ci95'])}",
            f"R fitted on the raw activations at the same tokens (tau {num(t['raw_tau']['all']['tau'])})",
            sae_gain, f"paired {RESAMPLED}, both chains refitted on every draw; tuned model", "sae_vs_raw"))
    elif "raw_tau" in t:
        rows.append(_not_tested(claim_raw, "tau of the codes or of the raw activations is undefined (a constant "
                                           "prediction)", "sae_vs_raw"))
    return rows


def _from_control(root: Path, key: str, build: Callable[[dict], Any]) -> Any:
    """`build(control.json)` when the control ran and wrote `key`, else None (no row: the control has not run)."""
    c = _load(root, "control")
    return build(c) if c and key in c else None


@row_builder
def lexicon_reconstructed(root: Path) -> Optional[list]:
    """The implicit reward reconstructs the lexicon: tau of the tuned model's R against R refit on sign-shuffled
    targets; and what the SAE adds over the raw activations."""
    return _from_control(root, "tuned", lexicon_rows)


def delta_tau_row(c: dict) -> Row:
    """delta_tau = tau_tuned - tau_base from control.json's contents."""
    claim = "RLHF moved the implicit reward toward the training reward (tau_tuned > tau_base)"
    d = c["delta_tau"]["all"]
    if d.get("delta") is None:
        return _not_tested(claim, "tau_tuned or tau_base is undefined (a constant prediction)", "delta_tau")
    moves = c.get("per_word", {})
    fit = (c.get("sae_fit") or {}).get("nmse_at_sentiment_tokens") or {}
    caution = ""
    base_nmse, tuned_nmse = fit.get("base"), fit.get("tuned")
    if base_nmse is not None and tuned_nmse is not None and base_nmse > SAE_FIT_RATIO * tuned_nmse + 0.1:
        caution = (f"; CAUTION: the tuned SAEs reconstruct M_base far worse than M_RLHF (NMSE {num(fit['base'])} vs "
                   f"{num(fit['tuned'])}): RLHF moved the activations so far that one dictionary does not serve both "
                   "models, and this control compares through a dictionary that does not fit M_base")
    return delta_row(
        claim,
        f"delta_tau = {num(d['delta'], signed=True)}, 95% CI {interval(d['ci95'])} (tau_tuned "
        f"{num(c['tuned']['tau']['all']['tau'])}, tau_base {num(c['base']['tau']['all']['tau'])})",
        f"the same triples, contexts and chain on the base model ({c.get('sae_choice', 'tuned SAEs')})", d,
        f"paired {RESAMPLED}: {d['n']} words, {d.get('n_triples', 'n/a')} triples, {d.get('n_contexts', 'n/a')} "
        f"contexts; words that moved by more than {num(moves.get('threshold'))}: "
        f"{moves.get('n_moved_toward', 'n/a')} toward the reward, {moves.get('n_moved_away', 'n/a')} away" + caution,
        "delta_tau")


@row_builder
def differs_from_base(root: Path) -> Optional[Row]:
    """RLHF moved the implicit reward toward the training reward: delta_tau = tau_tuned - tau_base."""
    return _from_control(root, "delta_tau", delta_tau_row)


def heldout_row(c: dict) -> Row:
    """Held-out generalisation from control.json's contents; "not tested" when the held-out tau is undefined."""
    claim = "the implicit reward generalises to unseen words (paper 5.1, held out)"
    t = c["tuned"]
    k, perm = t["tau"].get("heldout") or {}, t["permutation"].get("heldout") or {}
    if k.get("tau") is None or perm.get("p_greater") is None:
        return _not_tested(claim, f"Kendall tau on the {k.get('n', 0)} held-out words is undefined (fewer than 2 "
                                  "words, or R or the lexicon constant on them)", "heldout_tau")
    return tau_against_null(claim, "held-out words", k, perm,
                            "held-out words: whole lemma families kept out of every triple, read in contexts no "
                            "triple used", "heldout_tau")


@row_builder
def generalises(root: Path) -> Optional[Row]:
    """Held-out generalisation: tau on words of lemma families R never saw, in contexts no triple used."""
    return _from_control(root, "tuned", heldout_row)


def _sae_quality_text(saes: dict) -> str:
    """The SAEs' held-out quality (sae/metrics.json of one layer), one clause per dictionary."""
    return "; ".join(
        f"{name}: L0 {num(m.get('l0'), 1)} of {m.get('width')}, explained variance "
        f"{num(m.get('explained_variance'))} ({num(m.get('explained_variance_after_first'))} without first "
        f"tokens), dead {num(100 * m['dead_fraction'] if m.get('dead_fraction') is not None else None, 1)}%, "
        f"CE loss recovered {num(m.get('ce_loss_recovered'))}" + (
            f" (splice {num(ce_gaps(m)[0], signed=True)} nats, zeroing the layer "
            f"{num(ce_gaps(m)[1], signed=True)})" if ce_gaps(m) else "")
        for name, m in sorted(saes.items(), key=lambda kv: int(kv[0][1:])))


def chance_p(observed: float, draws: Sequence[float], se: float = 0.0) -> Optional[float]:
    """One-sided p of `observed` above the distribution the chance draws come from: Student's t of a new value
    against their mean and sample sd, (observed - mean) / sqrt(sd^2 (1 + 1/n) + se^2) on n - 1 degrees of freedom
    (exact for normal draws and se 0). `se`: the observed value's own standard error, added to the spread when the
    law the draws come from was fitted to the same data and can understate it. Unlike a rank among the draws it is not
    floored at 1 / (n + 1), which the table's Holm correction would need thousands of draws to get past. None with
    fewer than two draws."""
    from scipy.stats import t

    d = np.asarray(draws, dtype=np.float64)
    if len(d) < 2:
        return None
    scale = float(np.hypot(d.std(ddof=1) * np.sqrt(1.0 + 1.0 / len(d)), se))
    if scale == 0:
        return 0.0 if observed > d.mean() else 1.0
    return float(t.sf((observed - d.mean()) / scale, len(d) - 1))


def mmcs_row(layer: str, rec: dict, saes: Optional[dict] = None) -> Row:
    """One layer's MMCS row from its mmcs.json record (and its SAEs' sae/metrics.json entry): the max MMCS ranked
    against the MMCS of random dictionaries with the two dictionaries' own row mean and covariance
    (`irm.sae.comparison.chance_levels`), a one-sided t p-value (`chance_p`). Isotropic chance is too easy a null
    (issue 22) and an mmcs.json that has only it is "not tested"."""
    small, large = (rec.get("dictionaries") or {}).get("small", "small"), (rec.get("dictionaries") or {}).get(
        "large", "large")
    claim = f"layer {layer}: the {small} and {large} dictionaries share features (MMCS, eq. 2)"
    chance = (rec.get("chance") or {}).get("max")
    if not chance or not chance.get("draws"):
        return _not_tested(claim, "mmcs.json has no chance level for this layer; rerun `python -m irm dictionaries`",
                           "mmcs")
    if rec.get("chance_source") != "dictionary rows":
        return _not_tested(claim, f"MMCS {num(rec['max'])} was compared with isotropic random dictionaries only, a "
                                  "null far easier than rows with the dictionaries' own mean and anisotropy; rerun "
                                  "`python -m irm dictionaries`", "mmcs")
    if rec.get("max_se") is None:
        return _not_tested(claim, "mmcs.json predates the MMCS standard error the verdict needs (max_se); rerun "
                                  "`python -m irm dictionaries --force`", "mmcs")
    draws = chance["draws"]
    # The chance law is fitted to these dictionaries' own rows, and its draws can vary less than the MMCS of rows
    # really drawn from the law behind them (0.46-0.6x at width 48 with a strong shared mean, measured in
    # irm.calibration.features' worlds, 11-12% false positives): the MMCS's own standard error over the small
    # dictionary's features is added to the spread.
    p = chance_p(rec["max"], draws, rec["max_se"])
    iso = ((rec.get("chance_isotropic") or {}).get("max") or {}).get("mean")
    acts = ((rec.get("chance_activations") or {}).get("max") or {}).get("mean")
    init = rec.get("init") or {}
    sae_text = _sae_quality_text(saes or {})
    return finding(
        claim=claim,
        number=f"MMCS {num(rec['max'])} {interval(rec.get('max_ci95'))}",
        control=f"random dictionaries of the same shapes with these dictionaries' own row mean and covariance: "
                f"{num(chance['mean'])} ± {num(chance['std'])} ({len(draws)} draws; rows drawn like the "
                f"activations {num(acts)}, isotropic {num(iso)})",
        verdict=verdict_from_p(p, None),
        detail=f"MMCS - chance = {num(rec['max'] - chance['mean'], signed=True)}; t against the chance draws' "
               f"spread and the MMCS's own standard error ({num(rec['max_se'])}) {p_text(p)} (one-sided; above "
               f"{sum(d < rec['max'] for d in draws)} of {len(draws)} draws); "
               "SAEs at "
               f"initialisation {num(init.get('max'))}; "
               + (f"the same features' reference (a second {small} of another seed): MMCS "
                  f"{num(rec['seed_pair']['max'])}; " if rec.get("seed_pair") else "")
               + "firing features "
               f"{(rec.get('firing') or {}).get('small', 'n/a')} / {(rec.get('firing') or {}).get('large', 'n/a')}"
               + (f"; SAE quality on held-out data: {sae_text}" if sae_text else ""),
        calibration="mmcs",
        p_value=two_sided(p, None),
    )


@row_builder
def dictionaries_share_features(root: Path) -> Optional[list]:
    """Each layer's two dictionaries share features (paper eq. 2): `mmcs_row` per layer of mmcs.json, with the SAEs'
    quality (sae/metrics.json): an MMCS above chance between dense or dead dictionaries means little."""
    mmcs = _load(root, "mmcs")
    if not mmcs or not mmcs.get("layers"):
        return None
    quality = (_load(root, "sae_metrics") or {}).get("layers") or {}
    return [mmcs_row(layer, rec, quality.get(layer))
            for layer, rec in sorted(mmcs["layers"].items(), key=lambda kv: int(kv[0]))] or None


VALIDATION_CLAIM = ("the features labelled related to the reward fire where R predicts a large delta (paper 4.4, "
                    "table 6)")


def validation_row(val: dict) -> Row:
    """Table 6 from validation.json: the related features' enrichment over their own base rate (P(active | R >
    threshold) / P(active), per feature, as a z-score) against the other explained features', by a label permutation
    of the difference of means (`irm.enrichment.enrichment_comparison`), one-sided like the claim. Labels from the
    offline lexicon rule make the test circular: the numbers are shown and the verdict is "not tested"."""
    from irm.enrichment import ENRICHMENT

    if val.get("n_related") == 0:
        return _not_tested(VALIDATION_CLAIM, "no explained feature was labelled related to the reward "
                                             "(explanations.jsonl)", "validation")
    vs = (val.get("vs_other_explained") or {}).get(ENRICHMENT)
    if not vs:
        return _not_tested(VALIDATION_CLAIM, "validation.json has no per-feature enrichment (written before issue "
                                             "22); rerun `python -m irm validate-features`", "validation")
    if vs.get("p_value") is None:
        why = (f"R puts no input above {val.get('threshold')}" if not val.get("n_inputs_above") else
               f"{vs['n_related']} related and {vs['n_other']} other explained features fired: nothing to compare")
        return _not_tested(VALIDATION_CLAIM, why, "validation")
    raw = (val.get("vs_other_explained") or {}).get("inputs above threshold") or {}
    circular = val.get("circular")
    p_greater, p_less = vs["p_value"], vs.get("p_value_less")
    return finding(
        claim=VALIDATION_CLAIM + (" [circular labels]" if circular else ""),
        number=f"enrichment over base rate {num(vs.get('related_enrichment'), 2)} (z {num(vs['related_frequency'], 2)};"
               f" mean over {vs['n_related']} related features); raw activation frequency "
               f"{num(raw.get('related_frequency'))}",
        control=f"the {vs['n_other']} other explained features of the same layers: enrichment "
                f"{num(vs.get('other_enrichment'), 2)} (z {num(vs['other_frequency'], 2)}), raw frequency "
                f"{num(raw.get('other_frequency'))}",
        # one-sided, like the claim (a significantly lower enrichment is its reverse, in the detail)
        verdict=NOT_TESTED if circular else verdict_from_p(p_greater, None),
        detail=(f"{circular}; " if circular else "")
               + f"label permutation of the enrichment z-scores: {p_text(p_greater)} (related more enriched), "
               f"{p_text(p_less)} "
               f"(less{': the claim reversed' if verdict_from_p(None, p_less) == CONTRADICTED else ''}); "
               f"{vs.get('n_undefined', 0)} explained features never fired (no base rate); "
               f"{val.get('n_inputs_above')} of {val.get('n_inputs')} positions above R > {val.get('threshold')}",
        calibration="validation",
        p_value=None if circular else two_sided(p_greater, None),
    )


@row_builder
def related_features_fire_where_r_is_high(root: Path) -> Optional[Row]:
    """Table 6 (validation.json), through `validation_row`."""
    val = _load(root, "validation")
    return None if val is None else validation_row(val)


ABLATION_CLAIM = "ablating the {n} labelled feature{s} lowers the reward ({mode} splice; paper 5.2, table 5)"


def ablation_row(abl: dict, mode: str, key: str, claim: Optional[str] = None,
                 control: Optional[str] = None) -> Optional[Row]:
    """One paired difference of ablation.json (`key`: ablated_minus_splice, paired t over prompts; or
    ablated_minus_random, the t prediction interval over random draws), or None when it was not measured. The
    claim is a drop, so the verdict reads the negated interval against 0, one-sided: "supported" or "not
    distinguishable". `claim` and `control` replace table 5's wording (model diffing's ablation reads the same)."""
    d = (abl.get("modes") or {}).get(mode, {}).get(key)
    if not d:
        return None
    n = abl.get("n_features", 0)
    claim = claim or ABLATION_CLAIM.format(n=n, s="s" if n != 1 else "", mode=mode)
    calibration = "ablation_vs_splice" if key == "ablated_minus_splice" else "ablation_vs_random"
    control = control or ("the SAE splice with nothing ablated" if key == "ablated_minus_splice" else
                          f"{abl.get('random_draws')} draws of as many random features matched on firing frequency "
                          "and mean contribution (mean code x decoder norm)")
    ci = d.get("ci95")
    if ci is None and key == "ablated_minus_random":
        return _not_tested(claim + " vs random features", f"{d.get('interval')}; set ablate.random_draws >= 2",
                           calibration)
    if ci is not None and ci[0] == ci[1]:
        return _not_tested(claim + ("" if key == "ablated_minus_splice" else " vs random features"),
                           f"the paired differences have no spread (reward difference {num(d['mean'], signed=True)} "
                           f"on every one of {abl.get('n_prompts')} prompts): the rewards do not vary between the "
                           "conditions (a reward at its clip, or a policy that answers every prompt alike), so no "
                           "effect of ablating can show", calibration)
    # One-sided, like the claim: a rise is the claim's reverse, reported in the detail, not a verdict on it (in a
    # world without an effect the two tails together would err at the table's whole 5%).
    verdict = verdict_from_interval(None if ci is None else [-ci[1], -ci[0]], control=0.0)
    rose = verdict == CONTRADICTED
    return finding(
        claim=claim,
        number=f"reward difference {num(d['mean'], signed=True)} {interval(ci)}",
        control=control,
        verdict=NOT_DISTINGUISHABLE if rose else verdict,
        detail="; ".join(part for part in (
            "the reward rose (the interval lies above 0): the claim's reverse" if rose else None,
            f"paired on {abl.get('n_prompts')} prompts", d.get("interval"),
            p_text(d["p_value"]) if d.get("p_value") is not None else None,
            f"between-draw sd {num(d['between_draw_std'])}" if d.get("between_draw_std") is not None
            else None) if part),
        calibration=calibration,
        p_value=d.get("p_value"),
        ci=ci,
    )


@row_builder
def ablation_lowers_reward(root: Path) -> Optional[list]:
    """Table 5: zero-ablating the labelled features lowers the reward, as paired differences on the same prompts
    against the splice with nothing ablated and against matched random features (ablation.json, `ablation_row`)."""
    abl = _load(root, "ablation")
    if abl is not None and abl.get("n_features") == 0:
        return [_not_tested("ablating the labelled features lowers the reward (paper 5.2, table 5)",
                            "no feature of the small dictionaries was labelled related to the reward, so none was "
                            "ablated (explanations.jsonl)", "ablation_vs_splice")]
    if not abl:
        return None
    rows = [ablation_row(abl, mode, key) for mode in abl.get("modes", {})
            for key in ("ablated_minus_splice", "ablated_minus_random")]
    return [r for r in rows if r is not None] or None


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
        calibration="planted", p_value=result["p"])


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
               f"{k.get('reference')}",
        p_value=v.get("p"), ci=v.get("ci95"))


DIFF_SPECIFIC_CLAIM = ("the tuned model holds latents the base model lacks (crosscoder with Latent Scaling; model "
                       "diffing, beyond the paper)")


@row_builder
def diff_tuned_specific(root: Path) -> Optional[Row]:
    """Issue 27: how many crosscoder latents the diff stage called tuned-specific (diff.json), against the harness's
    null worlds, where none should be. A count rule, not a test: outside the Holm correction; its false-positive
    rate is the harness's."""
    d = _load(root, "diff_summary")
    if not d:
        return None
    layers = d["layers"]
    n = sum(len(r["tuned_specific"]) for r in layers.values())
    live = sum(round(r["latents"] * (1 - r["fractions"]["dead"])) for r in layers.values())
    by_norm = sum(round(r["latents"] * r["fractions_by_norm"]["tuned-specific"]) for r in layers.values())
    per_layer = "; ".join(
        f"layer {layer}: {len(r['tuned_specific'])} specific, {100 * r['fractions']['shared']:.0f}% shared, "
        f"{100 * r['fractions']['tuned-only artifact']:.1f}% tuned-only artifacts, explained variance base "
        f"{num(r['quality']['base']['explained_variance'], 2)} tuned {num(r['quality']['tuned']['explained_variance'], 2)}"
        + (f", diff-SAE {num(r['diff_sae']['explained_variance'], 2)}" if r.get("diff_sae") else "")
        for layer, r in layers.items())
    return finding(
        claim=DIFF_SPECIFIC_CLAIM,
        number=f"{n} tuned-specific of {live} live latents ({by_norm} by decoder norms alone)",
        control="0 (the harness's null worlds: shared latents turned and rescaled by fine-tuning)",
        verdict=SUPPORTED if n else NOT_DISTINGUISHABLE,
        detail=f"{per_layer}. A count rule (at least one latent whose base decoder is at most 1/5 of its tuned one "
               "and that Latent Scaling confirms), outside the Holm correction",
        calibration="diff_specific")


@row_builder
def diff_latents_about_reward(root: Path) -> Optional[Row]:
    """Issue 27: do the tuned-specific latents fire on the reward's words (the planted words of a planted reward)
    more than the shared latents do (diff.json `enrichment`, irm.diff.enrichment)?"""
    d = _load(root, "diff_summary")
    if not d or "enrichment" not in d:
        return None
    e, what = d["enrichment"], d["marked_words"]["what"]
    claim = f"the tuned-specific latents fire on the {what} more than shared latents do (model diffing)"
    if e["difference"] is None:
        return _not_tested(claim, f"{e['tuned_specific']} tuned-specific and {e['shared']} shared latents: nothing "
                                  "to compare (see the row above)", calibration="diff_enrichment")
    return permutation_row(
        claim, e, f"share on the {what} {num(e['specific_share'])} vs {num(e['shared_share'])} "
                  f"(difference {num(e['difference'], signed=True)})",
        "the shared latents' share (labels permuted within each layer)",
        f"{e['tuned_specific']} tuned-specific and {e['shared']} shared latents; a latent's share is its code mass on "
        f"the tokens that spell one of the {d['marked_words']['n']} {what}", "diff_enrichment")


def permutation_row(claim: str, test: dict, number: str, control: str, detail: str, calibration: str) -> Row:
    """The row of a one-sided pair of permutation p-values (`test`: p_greater, p_less, permutations)."""
    p = two_sided(test["p_greater"], test["p_less"])
    return finding(claim=claim, number=number, control=control, verdict=verdict_from_p(test["p_greater"], test["p_less"]),
                   detail=f"{p_text(p)} ({test['permutations']} permutations); {detail}", calibration=calibration,
                   p_value=p)


DIFF_ABLATION_CLAIM = "ablating the tuned-specific latents' directions lowers the reward (model diffing)"


@row_builder
def diff_ablation_lowers_reward(root: Path) -> Optional[Row]:
    """Issue 27: the tuned-specific latents' directions ablated in the tuned model against as many shared latents
    matched on firing count (diff.json `ablation`, irm.diff.ablate), read by `ablation_row` as table 5's random
    control is."""
    d = _load(root, "diff_summary")
    abl = (d or {}).get("ablation")
    if abl is None:
        return None
    if "not_tested" in abl:
        return _not_tested(DIFF_ABLATION_CLAIM, abl["not_tested"], "ablation_vs_random")
    n = sum(len(ix) for ix in abl["latents"].values())
    return ablation_row({"modes": {"directional": {"ablated_minus_random": abl["ablated_minus_matched"]}},
                         "n_prompts": abl["n_prompts"], "n_features": n}, "directional", "ablated_minus_random",
                        claim=DIFF_ABLATION_CLAIM,
                        control=f"{len(abl['matched_sets'])} draws of {n} shared latents matched on firing count")
