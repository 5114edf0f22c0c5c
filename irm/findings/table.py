"""The table as `summary.json["findings"]`: every registered claim's row, Holm-corrected across the table and with the
calibration harness's false-positive rates and minimal detectable effects beside it."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Optional, Sequence, Union

from irm.findings.rows import FIELDS, ROW_BUILDERS, Row, RowBuilder, load
from irm.findings.verdicts import ALPHA, CONTRADICTED, NOT_DISTINGUISHABLE, NOT_TESTED, SUPPORTED, VERDICTS, holm

# What build_findings adds to every row: the Holm-corrected p and the calibration harness's numbers.
ADDED = ("p_holm", "false_positive_rate", "false_positive_ci95", "minimal_detectable_effect", "effect_unit",
         "mde_source", "certified_false_positive_rate", "certified_false_positive_ci95", "certified_worlds")
CERTIFIED = Path(__file__).parents[1] / "calibration" / "certified.json"  # the full harness's results (irm.calibration)


@lru_cache(maxsize=1)
def read_certified() -> dict:
    """Per finding, the full harness's summary (`irm.stages.calibrate.summarise`: the worst null family's
    false-positive rate, its 95% interval, name and number of worlds); {} when the file is absent."""
    import json

    if not CERTIFIED.exists():
        return {}
    return json.loads(CERTIFIED.read_text()).get("findings") or {}


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
        calibration = load(root, "calibration")
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
