"""The feature claims: each layer's two dictionaries share features (paper eq. 2, MMCS against chance), the features
labelled related fire where R is high (table 6) and ablating them lowers the reward (table 5)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from irm.findings.rows import Row, finding, interval, load, not_tested, num, p_text, row_builder
from irm.findings.verdicts import CONTRADICTED, NOT_DISTINGUISHABLE, NOT_TESTED, two_sided, verdict_from_interval, \
    verdict_from_p


def ce_gaps(m: dict) -> Optional[tuple[float, float]]:
    """The two loss differences behind an SAE's CE loss recovered (sae/metrics.json): (L_SAE - L_clean, L_zero -
    L_clean) in nats per token, or None when they were not measured. A ratio over a gap of a few hundredths of a nat
    is read with them."""
    clean, zero, spliced = m.get("ce_clean"), m.get("ce_zero_ablated"), m.get("ce_spliced")
    if clean is None or zero is None or spliced is None:
        return None
    return spliced - clean, zero - clean


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
        return not_tested(claim, "mmcs.json has no chance level for this layer; rerun `python -m irm dictionaries`",
                           "mmcs")
    if rec.get("chance_source") != "dictionary rows":
        return not_tested(claim, f"MMCS {num(rec['max'])} was compared with isotropic random dictionaries only, a "
                                  "null far easier than rows with the dictionaries' own mean and anisotropy; rerun "
                                  "`python -m irm dictionaries`", "mmcs")
    if rec.get("max_se") is None:
        return not_tested(claim, "mmcs.json predates the MMCS standard error the verdict needs (max_se); rerun "
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
    mmcs = load(root, "mmcs")
    if not mmcs or not mmcs.get("layers"):
        return None
    quality = (load(root, "sae_metrics") or {}).get("layers") or {}
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
        return not_tested(VALIDATION_CLAIM, "no explained feature was labelled related to the reward "
                                             "(explanations.jsonl)", "validation")
    vs = (val.get("vs_other_explained") or {}).get(ENRICHMENT)
    if not vs:
        return not_tested(VALIDATION_CLAIM, "validation.json has no per-feature enrichment (written before issue "
                                             "22); rerun `python -m irm validate-features`", "validation")
    if vs.get("p_value") is None:
        why = (f"R puts no input above {val.get('threshold')}" if not val.get("n_inputs_above") else
               f"{vs['n_related']} related and {vs['n_other']} other explained features fired: nothing to compare")
        return not_tested(VALIDATION_CLAIM, why, "validation")
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
    val = load(root, "validation")
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
        return not_tested(claim + " vs random features", f"{d.get('interval')}; set ablate.random_draws >= 2",
                           calibration)
    if ci is not None and ci[0] == ci[1]:
        return not_tested(claim + ("" if key == "ablated_minus_splice" else " vs random features"),
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
    abl = load(root, "ablation")
    if abl is not None and abl.get("n_features") == 0:
        return [not_tested("ablating the labelled features lowers the reward (paper 5.2, table 5)",
                            "no feature of the small dictionaries was labelled related to the reward, so none was "
                            "ablated (explanations.jsonl)", "ablation_vs_splice")]
    if not abl:
        return None
    rows = [ablation_row(abl, mode, key) for mode in abl.get("modes", {})
            for key in ("ablated_minus_splice", "ablated_minus_random")]
    return [r for r in rows if r is not None] or None
