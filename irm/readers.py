"""Typed readers of stage artifacts that later stages read (each artifact's path declared by its Stage in
irm.stages): a stage reads an upstream result through these, never by importing the stage that wrote it."""

from __future__ import annotations

from pathlib import Path

from irm.errors import UserError
from irm.stages import artifact

VARIANTS = ("positive", "neutral", "negative")  # the texts of a triple (triples.jsonl), in the order rows use them
IRM_EXPORT = "regression.safetensors"  # R as the regression stage exports it: weight, bias, layers


def read_triples(run_dir: str | Path) -> list[dict]:
    """triples.jsonl: every contrastive triple the triples stage wrote."""
    from irm.artifacts import read_jsonl

    path = artifact(run_dir, "triples")
    if not path.exists():
        raise UserError(f"no triples in {path}; run `python -m irm triples` first")
    return read_jsonl(path)


def load_irm(run_dir: str | Path) -> tuple["torch.Tensor", float, list[int]]:
    """(weight [n_features], bias, layers) of the fitted R of a run."""
    from safetensors.torch import load_file

    path = artifact(run_dir, "regression") / IRM_EXPORT
    if not path.exists():
        raise UserError(f"no fitted regression in {path}; run `python -m irm regression` first")
    t = load_file(str(path))
    return t["weight"], float(t["bias"][0]), [int(v) for v in t["layers"]]
