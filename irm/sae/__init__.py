"""Sparse autoencoders (paper 4.2, appendix D): the model, its LightningModule, and exported SAEs on disk."""

from irm.sae.export import layer_dir, load_sae, sae_dir, save_sae
from irm.sae.model import SparseAutoencoder

__all__ = ["ExportSAEs", "SAEModule", "SparseAutoencoder", "layer_dir", "load_sae", "sae_dir", "save_sae"]


def __getattr__(name: str):
    # The Lightning parts import Lightning (seconds); stages that only load exported SAEs should not pay for it.
    if name in ("SAEModule", "ExportSAEs", "FeatureActivity"):
        from irm.sae import callbacks, module, revival

        return getattr({"SAEModule": module, "ExportSAEs": callbacks, "FeatureActivity": revival}[name], name)
    raise AttributeError(f"module 'irm.sae' has no attribute {name!r}")
