"""The MLP sites of a causal LM (paper 4.2): the architecture registry that says where each family keeps its blocks
and MLPs, layer access through it, and the `capture`/`splice` hooks that read or replace a site's activations."""

from __future__ import annotations

import contextlib
import operator
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional, Union

from irm.errors import UserError

if TYPE_CHECKING:
    import torch
    from torch import nn


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


class StopForward(Exception):
    """Raised by the hook of `stop_after` once block `layer` has run: nothing after it is needed."""


def _raise_stop(_module, _args, _out):
    raise StopForward


@contextlib.contextmanager
def stop_after(model: "nn.Module", layer: int) -> Iterator[Callable]:
    """Within the block, forward passes end after block `layer`: the later blocks, the final norm and the output
    head (a fifth of a small model's work: SmolLM2-135M's head is 28M of its 134M weights) are not run. Yields
    `run(**inputs)`, which calls `model(**inputs)` for the side effects of `capture`/`splice` hooks at blocks up to
    `layer` and returns nothing."""
    _check_layer(model, layer)

    def run(**inputs) -> None:
        try:
            model(**inputs)
        except StopForward:
            pass

    handle = blocks(model)[_layer_index(layer)].register_forward_hook(_raise_stop)
    try:
        yield run
    finally:
        handle.remove()


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
