"""Model diffing (README "Model diffing"): a crosscoder over the base and the tuned model's activations at the same
tokens, Latent Scaling and the tuned-specific / base-specific / shared reading of its latents, and the diff-SAE
baseline on tuned - base activations. Nothing is imported here: `irm.diff.config` (read by irm.config) stays free of
torch, and the Lightning parts cost seconds to import."""

import importlib

_EXPORTS = {"Crosscoder": "irm.diff.model", "BASE": "irm.diff.model", "TUNED": "irm.diff.model",
            "LatentScaling": "irm.diff.scaling", "classify": "irm.diff.scaling", "read_crosscoder": "irm.diff.scaling",
            "relative_norm_difference": "irm.diff.scaling", "CrosscoderModule": "irm.diff.module",
            "PairedDataModule": "irm.diff.data", "DiffConfig": "irm.diff.config"}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'irm.diff' has no attribute {name!r}")
