"""Model diffing (SPEC "Model diffing"): a crosscoder over the base and the tuned model's activations at the same
tokens, Latent Scaling and the tuned-specific / base-specific / shared reading of its latents, and the diff-SAE
baseline on tuned - base activations."""

from irm.diff.model import BASE, TUNED, Crosscoder
from irm.diff.scaling import LatentScaling, classify, read_crosscoder, relative_norm_difference

__all__ = ["BASE", "TUNED", "Crosscoder", "LatentScaling", "classify", "read_crosscoder",
           "relative_norm_difference"]
