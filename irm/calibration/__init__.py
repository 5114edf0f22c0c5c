"""Calibration harness (issue 22, README "How far to trust a verdict"): every finding's false-positive rate in simulated
worlds where its claim is false and its power where it is true, through the functions a real run uses.

`irm.calibration.core` runs families of worlds; each module in `GROUPS` declares the families of some findings in
its `FAMILIES` list. `families()` gathers them all. The full harness's committed results (certified.json, written by
`python benchmarks/calibration.py --json irm/calibration/certified.json`: hundreds to thousands of worlds per family
at the harness's default sizes) are read by `irm.findings.read_certified`, and every report quotes them beside the few
worlds its own `calibrate` stage runs at the run's sizes.
"""

from __future__ import annotations

import importlib

from irm.calibration.core import Family, failures, minimal_detectable_effect, run, run_family

GROUPS: tuple[str, ...] = ("planted", "chain", "run_level", "features", "diff")  # modules under irm.calibration with FAMILIES

# Statistics the harness measured and found too easy to carry a verdict: reports show them as descriptions with their
# measured false-positive rate, never in the findings table.
DESCRIPTIVE: dict[str, str] = {
    "diff_lean": "crosscoder latents mix the same true features, so their leans are correlated, and a permutation "
                 "of latents, which treats them as independent, is too easy",
}


def families(cost: str | None = None) -> list[Family]:
    """Every declared family (only those of `cost` "fast"/"slow" when given), in GROUPS order."""
    out: list[Family] = []
    for name in GROUPS:
        out.extend(importlib.import_module(f"irm.calibration.{name}").FAMILIES)
    return [f for f in out if cost is None or f.cost == cost]


__all__ = ["DESCRIPTIVE", "Family", "families", "failures", "minimal_detectable_effect", "run", "run_family",
           "GROUPS"]
