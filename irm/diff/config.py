"""The `diff` stage's config section (README "Model diffing"): to be composed into irm.config.RunConfig as `diff`, with
its range checks (`check`) called from irm.config.check_all. Imports nothing heavy."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional


@dataclass
class DiffConfig:
    """Model diffing: a crosscoder over the base and tuned activations of the chosen layers, and a diff-SAE on their
    difference (beyond the paper)."""

    expansion: int = 2  # crosscoder latents as a multiple of the activation width
    activation: Literal["batchtopk", "relu"] = "batchtopk"  # batchtopk: Minder, Dumas et al.'s fix; relu: Anthropic's
    # L1 crosscoder, which invents tuned-only latents (complete shrinkage): kept to show the artifact
    k: Optional[int] = 32  # batchtopk: latents per token on average over a batch
    l1_coefficient: float = 1.0  # relu: weight of sum_j f_j sum_m ||d_j^m|| (activations at mean norm sqrt(width))
    learning_rate: float = 1.0e-3
    batch_size: int = 256
    epochs: int = 10
    dead_window: int = 200  # optimizer steps without firing after which a latent is dead (AuxK revives it)
    aux_coefficient: float = 0.03125  # AuxK weight (sparsify, OpenAI: 1/32)
    val_fraction: float = 0.1  # held-out tail of the paired cache: Latent Scaling, classes and quality are read there
    diff_sae: bool = True  # also train the baseline: an SAE (TopK, sae-style) on tuned - base activations
    diff_sae_k: int = 32  # the diff-SAE's codes per token
    trainer: dict = field(default_factory=dict)  # extra lightning.Trainer arguments (accelerator, devices, ...)

    def check(self) -> list[str]:
        """Problems with these values, one line each ("field: what is wrong; fix"), for irm.config.check_all."""
        problems = []
        if self.expansion < 1:
            problems.append(f"diff.expansion must be >= 1, not {self.expansion}")
        if self.activation == "batchtopk" and (self.k is None or self.k < 1):
            problems.append(f"diff.k must be >= 1 for activation batchtopk, not {self.k}")
        if self.activation == "relu" and self.l1_coefficient <= 0:
            problems.append(f"diff.l1_coefficient must be > 0 for activation relu, not {self.l1_coefficient}")
        if self.learning_rate <= 0 or self.batch_size < 1 or self.epochs < 1 or self.dead_window < 1:
            problems.append("diff.learning_rate must be > 0 and diff.batch_size, epochs, dead_window >= 1")
        if not 0.0 < self.val_fraction < 1.0:
            problems.append(f"diff.val_fraction must be in (0, 1): Latent Scaling reads the held-out rows, not "
                            f"{self.val_fraction}")
        if self.aux_coefficient < 0 or self.diff_sae_k < 1:
            problems.append("diff.aux_coefficient must be >= 0 and diff.diff_sae_k >= 1")
        return problems
