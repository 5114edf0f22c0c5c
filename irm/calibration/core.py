"""The calibration harness's runner (README "How far to trust a verdict"): simulated worlds pushed through the same
functions that give a real run's findings their numbers and verdicts, counted into false-positive rates (worlds
where the claim is false) and power (worlds where it is true, at several effect sizes).

A `Family` is one kind of world for one finding. Its `world(rng, sizes)` draws one world from `rng` at the sizes of
a run (words, triples, layers, prompts... each family reads the keys it needs from `sizes` with its own defaults),
computes the finding's statistic and verdict through the code a real run uses (never a re-implementation), and
returns the verdict (one of `irm.findings.VERDICTS`). Families are declared in the modules of `irm.calibration`
(one per group of findings) and listed in their `FAMILIES`.

Counting: in a null world (`effect == 0`) any verdict other than "not distinguishable" / "not tested" is a false
positive (a claim wrongly supported, or wrongly contradicted); in a planted world (`effect > 0`) power is the
fraction "supported". Intervals are Clopper-Pearson (exact binomial, `scipy.stats.binomtest`).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable, Iterable, Mapping, Optional, Sequence

import numpy as np

Sizes = Mapping[str, int]
FP_LIMIT = 0.05  # every finding's false-positive rate is held at or below this in every null family ...
FP_UPPER_LIMIT = 0.07  # ... with the upper end of its 95% interval at or below this (issue 22)
TARGET_POWER = 0.8  # the minimal detectable effect is the smallest effect found with this power


@dataclasses.dataclass(frozen=True)
class Family:
    """One family of simulated worlds for one finding.

    finding: the findings row it calibrates (a short key, e.g. "delta_tau", "layers", "mmcs", "validation",
        "ablation_vs_random"; the same key the findings row carries as `calibration`);
    name: the kind of world (e.g. "separate dictionaries", "sentiment-irrelevant linear map");
    effect: 0 for a null world (the claim is false); > 0 the planted effect, in `unit`;
    world: (rng, sizes) -> verdict, or (verdict, the finding's number in that world), one world drawn and judged
        by the real code path (the numbers' mean is the family's measured effect, in the finding's own units);
    unit: what `effect` measures (e.g. "tau", "relative layer shift");
    cost: "fast" (part of the default-suite check) or "slow" (only in the full run)."""

    finding: str
    name: str
    effect: float
    world: Callable[[np.random.Generator, Sizes], str]
    unit: str = ""
    cost: str = "fast"

    @property
    def null(self) -> bool:
        return self.effect == 0


def clopper_pearson(k: int, n: int) -> list[float]:
    """Exact 95% interval of a binomial proportion k / n."""
    from scipy.stats import binomtest

    if n == 0:
        return [0.0, 1.0]
    ci = binomtest(k, n).proportion_ci(confidence_level=0.95, method="exact")
    return [float(ci.low), float(ci.high)]


def run_family(family: Family, n_worlds: int, sizes: Sizes, seed: int = 0) -> dict:
    """Draw `n_worlds` worlds of `family` (world i from its own seeded generator, so any subset reproduces) and count
    the verdicts. Returns {finding, family, effect, unit, null, n, verdicts: {verdict: count}, rate, ci95, seconds}:
    `rate` is the false-positive rate of a null family and the power of a planted one."""
    from irm.findings import CONTRADICTED, SUPPORTED

    counts: dict[str, int] = {}
    numbers: list[float] = []
    start = time.perf_counter()
    base = np.random.SeedSequence([seed, _stable_hash(family.finding), _stable_hash(family.name),
                                   int(family.effect * 1e6)])
    for child in base.spawn(n_worlds):
        verdict = family.world(np.random.default_rng(child), sizes)
        if isinstance(verdict, tuple):
            verdict, number = verdict
            if number is not None and np.isfinite(number):
                numbers.append(float(number))
        counts[verdict] = counts.get(verdict, 0) + 1
    hits = counts.get(SUPPORTED, 0) + (counts.get(CONTRADICTED, 0) if family.null else 0)
    return {"finding": family.finding, "family": family.name, "effect": family.effect, "unit": family.unit,
            "null": family.null, "n": n_worlds, "verdicts": counts, "rate": hits / n_worlds,
            "ci95": clopper_pearson(hits, n_worlds), "seconds": time.perf_counter() - start,
            "measured_effect": float(np.mean(numbers)) if numbers else None}


def run(families: Iterable[Family], n_worlds: int | Callable[[Family], int], sizes: Sizes, seed: int = 0,
        progress: Optional[Callable[[Family], None]] = None) -> list[dict]:
    """Every family's result (`run_family`); `n_worlds` a number or a function of the family. BLAS on one thread:
    worlds are many small solves and products (`irm.runtime.one_blas_thread`)."""
    from irm.runtime import one_blas_thread

    out = []
    with one_blas_thread():
        for family in families:
            if progress is not None:
                progress(family)
            n = n_worlds(family) if callable(n_worlds) else n_worlds
            out.append(run_family(family, n, sizes, seed))
    return out


def failures(results: Sequence[dict]) -> list[dict]:
    """The null families that break the limits: a false-positive rate above FP_LIMIT beyond its Monte Carlo error
    (the lower end of its 95% interval above 5%), or one that could be above FP_UPPER_LIMIT (the upper end above
    7%). An exact 5% test reads above 5% in about half of all harness runs (the reward row's sign-flip test: 1,001
    of 20,000 worlds where exactness allows 998 expected), so the point estimate alone cannot be the limit; the
    upper end's 7% is what bounds how far above 5% a family could be."""
    return [r for r in results if r["null"] and (r["ci95"][0] > FP_LIMIT or r["ci95"][1] > FP_UPPER_LIMIT)]


def minimal_detectable_effect(results: Sequence[dict], finding: str, power: float = TARGET_POWER,
                              measured: bool = False) -> Optional[float]:
    """The smallest effect of `finding` detected with at least `power`, linearly interpolated between the planted
    effect sizes that bracket it (per family the power curve, then the largest over families: the effect every
    planted family detects); None when no planted effect reached `power`. With `measured`, effects are the
    families' measured effects (the finding's own number, e.g. delta_tau) instead of the planted parameter."""
    per_family: dict[str, list[tuple[float, float]]] = {}
    for r in results:
        if r["finding"] == finding and not r["null"]:
            effect = r.get("measured_effect") if measured else r["effect"]
            if effect is None:
                continue
            per_family.setdefault(r["family"], []).append((effect, r["rate"]))
    mdes = []
    for curve in per_family.values():
        curve.sort()
        found = None
        prev_e, prev_p = 0.0, 0.0
        for e, p in curve:
            if p >= power:
                found = e if p == prev_p else prev_e + (power - prev_p) * (e - prev_e) / (p - prev_p)
                found = max(min(found, e), prev_e)
                break
            prev_e, prev_p = e, p
        if found is None:
            return None
        mdes.append(found)
    return max(mdes) if mdes else None


def _stable_hash(text: str) -> int:
    """A seed from a string that, unlike `hash`, is the same in every process."""
    import zlib

    return zlib.crc32(text.encode())
