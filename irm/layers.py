"""Which layers the later stages work on (paper 4.2, figure 4): blocks ranked by how far RLHF moved their weights,
and the chosen layers, `cache.layers` or the divergence stage's top-k read from divergence.json."""

from __future__ import annotations

from pathlib import Path

from irm.errors import UserError
from irm.stages import relpath


def rank_layers(values: list[float], k: int) -> tuple[list[int], list[int]]:
    """(all blocks by divergence descending, the first k of them); ties keep block order."""
    if not 1 <= k <= len(values):
        raise UserError(f"divergence.top_k={k} must be between 1 and the model's {len(values)} blocks")
    order = sorted(range(len(values)), key=lambda i: (-values[i], i))
    return order, order[:k]


def chosen_layers(cfg, n_layers: int | None = None) -> list[int]:
    """The layers later stages work on, in ascending order: `cache.layers` when set, else divergence.json's top-k.

    Indices are checked against the model's block count: `n_layers` when the caller has the model, else the length
    of divergence.json's values when that file exists. UserError when no layers can be determined or one is out of
    range."""
    from irm.artifacts import read_json

    path = Path(cfg.run_dir) / relpath("divergence")
    saved = read_json(path) if path.exists() else None
    if n_layers is None and saved is not None:
        n_layers = len(saved["values"])
    if cfg.cache.layers is not None:
        layers = list(cfg.cache.layers)
        source = "cache.layers"
    elif saved is not None:
        if saved.get("k") != cfg.divergence.top_k:
            raise UserError(
                f"{path} holds the top {saved.get('k')} layers but divergence.top_k={cfg.divergence.top_k}; "
                "rerun `python -m irm divergence`"
            )
        layers = list(saved["top_k"])
        source = str(path)
    else:
        raise UserError(f"no layers chosen: set cache.layers or run `python -m irm divergence` first ({path} missing)")
    for layer in layers:
        if layer < 0 or (n_layers is not None and layer >= n_layers):
            bound = f"0..{n_layers - 1}" if n_layers is not None else "non-negative"
            raise UserError(f"layer {layer} from {source} is out of range (the model's blocks are {bound})")
    return sorted(layers)
