"""Calibration harness (issue 22, SPEC "Controls: calibration"): every finding's false-positive rate in simulated
worlds where its claim is false and its power where it is true, through the functions a real run uses.

`irm.calibration.core` runs families of worlds; each module in `GROUPS` declares the families of some findings in
its `FAMILIES` list. `families()` gathers them all.
"""

from __future__ import annotations

import importlib

from irm.calibration.core import Family, failures, minimal_detectable_effect, run, run_family

GROUPS: tuple[str, ...] = ("planted", "chain", "run_level", "features")  # modules under irm.calibration with FAMILIES


def families(cost: str | None = None) -> list[Family]:
    """Every declared family (only those of `cost` "fast"/"slow" when given), in GROUPS order."""
    out: list[Family] = []
    for name in GROUPS:
        out.extend(importlib.import_module(f"irm.calibration.{name}").FAMILIES)
    return [f for f in out if cost is None or f.cost == cost]


__all__ = ["Family", "families", "failures", "minimal_detectable_effect", "run", "run_family", "GROUPS"]
