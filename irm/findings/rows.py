"""One row of the findings table and what every row builder shares: the row's fields, the registry of builders (in
table order), the artifact reader and the number formats of the row's text."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

from irm.findings.verdicts import NOT_TESTED, VERDICTS, interval_mde

FIELDS = ("claim", "number", "control", "verdict", "detail", "calibration", "p_value", "interval_mde")
Row = dict[str, str]
RowBuilder = Callable[[Path], Union[Row, list, None]]
ROW_BUILDERS: list[RowBuilder] = []


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


def not_tested(claim: str, why: str, calibration: Optional[str] = None) -> Row:
    """A "not tested" row: the claim's stage ran but had nothing to measure, `why`."""
    return finding(claim=claim, number="none", control="none", verdict=NOT_TESTED, detail=why,
                   calibration=calibration)


def row_builder(fn: RowBuilder) -> RowBuilder:
    """Register `fn` as a claim of the findings table (in definition order; irm.findings imports the claim
    modules in the table's order)."""
    ROW_BUILDERS.append(fn)
    return fn


def load(root: Path, key: str) -> Optional[Any]:
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
