"""The implicit-reward claims (paper 5.1) from the control's control.json: R reconstructs the lexicon against its
permutation null, generalises to held-out words, moved toward the training reward (delta_tau), and the SAE codes
carry it better than the raw activations."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional

from irm.findings.rows import Row, finding, interval, load, not_tested, num, p_text, row_builder
from irm.findings.verdicts import ALPHA, two_sided, verdict_from_interval, verdict_from_p

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
        rows = [not_tested(claim, f"Kendall tau on the {k.get('n', 0)} words no triple used is undefined",
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
        rows.append(not_tested(claim_raw, "tau of the codes or of the raw activations is undefined (a constant "
                                           "prediction)", "sae_vs_raw"))
    return rows


def _from_control(root: Path, key: str, build: Callable[[dict], Any]) -> Any:
    """`build(control.json)` when the control ran and wrote `key`, else None (no row: the control has not run)."""
    c = load(root, "control")
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
        return not_tested(claim, "tau_tuned or tau_base is undefined (a constant prediction)", "delta_tau")
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
        return not_tested(claim, f"Kendall tau on the {k.get('n', 0)} held-out words is undefined (fewer than 2 "
                                  "words, or R or the lexicon constant on them)", "heldout_tau")
    return tau_against_null(claim, "held-out words", k, perm,
                            "held-out words: whole lemma families kept out of every triple, read in contexts no "
                            "triple used", "heldout_tau")


@row_builder
def generalises(root: Path) -> Optional[Row]:
    """Held-out generalisation: tau on words of lemma families R never saw, in contexts no triple used."""
    return _from_control(root, "tuned", heldout_row)
