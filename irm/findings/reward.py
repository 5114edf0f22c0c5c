"""The reward claims (paper table 7): RLHF raised the reward, and with a planted reward, the planted words' part of it;
paired tuned - base differences of evaluate-reward."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from irm.findings.rows import Row, finding, interval, load, num, p_text, row_builder
from irm.findings.verdicts import verdict_from_interval, verdict_from_two_sided


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
    d = paired_reward(load(root, "reward_eval"))
    return reward_row(d) if d else None


@row_builder
def planted_words_learned(root: Path) -> Optional[Row]:
    """Issue 23: with a planted reward, did PPO learn the planted words themselves, or the words the planted reward
    still shares with VADER? The paired tuned - base difference of the planted words' part of the reward
    (evaluate-reward's `planted_part`), the other words' part in the detail. None without planted words."""
    part = (load(root, "reward_eval") or {}).get("planted_part")
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
