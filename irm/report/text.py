"""How the report writes numbers, intervals and names: one place for every cell and label of its tables."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from irm.stages import read_artifact

SHORT = 24  # characters: table cells up to this long are kept on one line in the HTML
# Readable names of validation.json's scalar entries; an entry not listed here is shown under its key.
VALIDATION_LABELS = {
    "inputs": "inputs",
    "n_texts": "eval texts",
    "n_inputs": "inputs (token positions)",
    "threshold": "threshold on R",
    "threshold_scale": "threshold scale",
    "raw_threshold": "threshold on R's raw output",
    "n_inputs_above": "inputs where R > threshold",
    "n_related": "features labelled related to the reward",
    "related": "those features (layer: indices)",
    "active": "a feature is active where",
    "related_frequency": "activation frequency of the related features, inputs above threshold",
    "average_frequency": "activation frequency of all features, inputs above threshold",
    "related_frequency_all_inputs": "activation frequency of the related features, all inputs",
    "average_frequency_all_inputs": "activation frequency of all features, all inputs",
}
KENDALL_LABELS = {"all": "all", "negative": "negative (true value < 0)", "heldout": "held out (R never saw them)",
                  "seen": "seen (in R's training triples)",
                  "vs_vader": "all, against VADER (a second reference, not the training reward)"}
ABLATION_CONDITIONS = {"splice": "SAE spliced in, nothing ablated", "ablated": "reward-related features ablated",
                       "random": "as many random features ablated"}
ABLATION_MODES = {"reconstruction": "reconstruction splice (paper)", "error": "splice keeping the SAE error"}


def load(root: Path, key: str) -> Optional[Any]:
    """Artifact `key` of the run (irm.stages.read_artifact), None if its stage has not run; a corrupt one is refused
    in one line."""
    return read_artifact(root, key, missing_ok=True)


def fmt(x: Any, digits: int = 3) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, float):
        return f"{x:.{digits}g}" if abs(x) < 1e-3 and x != 0 else f"{x:.{digits}f}"
    return str(x)


def pval(p: Optional[float]) -> str:
    """A p-value; scipy returns exactly 0 when it underflows the smallest double, which is not a p of 0."""
    if p == 0.0:
        return "< 1e-300"
    return fmt(p) if p is None or p >= 1e-3 else f"{p:.2e}"


def ci(d: Optional[dict]) -> str:
    if not d or d.get("ci95") is None:
        return "n/a"
    lo, hi = d["ci95"]
    return f"[{fmt(lo)}, {fmt(hi)}]"


def cell(x: Any) -> str:
    """A table cell as a reader wants it: numbers formatted, strings without quotes, lists and dicts as plain text."""
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, dict):
        return "; ".join(f"{k}: {cell(v)}" for k, v in x.items())
    if isinstance(x, (list, tuple)):
        return ", ".join(cell(v) for v in x)
    return fmt(x)


def features(by_layer: dict) -> str:
    """{"20": [18], "22": [422, 7]} as 'layer 20: 18; layer 22: 422, 7'."""
    return "; ".join(f"layer {layer}: {cell(idx)}" for layer, idx in by_layer.items()) or "none"


def percent(x: Optional[float]) -> str:
    return "n/a" if x is None else f"{100 * x:.3g}%"
