"""Activation cache of the chosen layers (paper 4.2): the writer stage (`irm.stages.cache`, `python -m irm
cache`), the reader (`ActivationCache`) and the Lightning DataModule that streams it into SAE training."""

from irm.activations.store import ActivationCache, ShardWriter, cache_layer_dir

__all__ = ["ActivationCache", "ActivationDataModule", "ShardWriter", "cache_layer_dir"]


def __getattr__(name: str):
    # The DataModule needs Lightning (seconds to import); readers of the cache alone should not pay for it.
    if name == "ActivationDataModule":
        from irm.activations.datamodule import ActivationDataModule

        return ActivationDataModule
    raise AttributeError(f"module 'irm.activations' has no attribute {name!r}")
