"""Feature explanations and reward labels (paper 4.4, E.1): top-activating records (records), prompts, the explainer
backends (backends), detection and fuzzing scores (scoring), the SAEDashboard/Neuronpedia export (neuronpedia) and
`python -m irm explain` (stage)."""

from __future__ import annotations

import os
from pathlib import Path

from irm.artifacts import read_jsonl
from irm.errors import UserError
from irm.explain.backends import make_backend
from irm.stages import relpath

EXPLANATIONS = relpath("explanations")

__all__ = ["EXPLANATIONS", "explained_features", "make_backend", "related_features"]


def explained_features(run_dir: str | os.PathLike, label: int) -> dict[int, list[int]]:
    """Layer -> indices of small-dictionary (x1) features whose explanation got `label` (1: "related to the
    reward", 0: explained and judged unrelated); every explained layer is present, with an empty list when none
    was. Features without a usable explanation or label (label None) are in neither list."""
    path = Path(run_dir) / EXPLANATIONS
    if not path.exists():
        raise UserError(f"missing {path}: run `python -m irm explain` first")
    out: dict[int, set[int]] = {}
    for line in read_jsonl(path):
        if line.get("role") == "small":
            hits = out.setdefault(int(line["layer"]), set())
            if line.get("label") == label:
                hits.add(int(line["index"]))
    return {layer: sorted(ix) for layer, ix in sorted(out.items())}


def related_features(run_dir: str | os.PathLike) -> dict[int, list[int]]:
    """Layer -> indices of small-dictionary (x1) features the explainer labelled 1, "related to the reward"."""
    return explained_features(run_dir, 1)
