"""Typed readers of stage artifacts that later stages read (each artifact's path declared by its Stage in
irm.stages): a stage reads an upstream result through these, never by importing the stage that wrote it."""

from __future__ import annotations

from pathlib import Path

from irm.errors import UserError
from irm.stages import artifact

VARIANTS = ("positive", "neutral", "negative")  # the texts of a triple (triples.jsonl), in the order rows use them


def read_triples(run_dir: str | Path) -> list[dict]:
    """triples.jsonl: every contrastive triple the triples stage wrote."""
    from irm.artifacts import read_jsonl

    path = artifact(run_dir, "triples")
    if not path.exists():
        raise UserError(f"no triples in {path}; run `python -m irm triples` first")
    return read_jsonl(path)
