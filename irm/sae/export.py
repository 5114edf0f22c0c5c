"""Trained SAEs on disk: `<run_dir>/sae/layer-NN/x<expansion>/` with `cfg.json` + `sae_weights.safetensors`, in
SAELens's layout (weights W_enc, b_enc, W_dec, b_dec; cfg keys d_in, d_sae, hook_name, ...) so SAELens's
`SAE.load_from_disk` can read them; our own settings sit under the `irm` key."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

from irm.errors import UserError

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
SPARSITY_FILE = "sparsity.safetensors"  # log10 feature density, as SAELens writes it and Neuronpedia reads it
WEIGHT_KEYS = ("W_enc", "b_enc", "W_dec", "b_dec")
# TransformerLens hook names (what SAELens's `hook_name` means) of our activation sites.
SAE_LENS_FORMAT = "6.0.0"  # the SAELens cfg.json format written (its `sae_lens_version` key)
HOOK_NAMES = {"mlp_out": "blocks.{layer}.hook_mlp_out", "mlp_hidden": "blocks.{layer}.mlp.hook_post"}


def layer_dir(run_dir: str | os.PathLike, layer: int) -> Path:
    """`<run_dir>/sae/layer-NN`: a layer's exported SAEs and its Lightning checkpoints."""
    from irm.stages import artifact

    return artifact(run_dir, "sae") / f"layer-{int(layer):02d}"


def sae_dir(run_dir: str | os.PathLike, layer: int, expansion: int) -> Path:
    """`<run_dir>/sae/layer-NN/x<expansion>`: the exported SAE whose width is `expansion` x the layer's width."""
    return layer_dir(run_dir, layer) / f"x{int(expansion)}"


def save_sae(sae, directory: str | os.PathLike, *, layer: Optional[int] = None, site: str = "mlp_out",
             model_name: Optional[str] = None, context_size: Optional[int] = None,
             irm: Optional[dict[str, Any]] = None) -> Path:
    """Write `sae` (a SparseAutoencoder) atomically as cfg.json + sae_weights.safetensors. Tied SAEs are stored with
    an explicit W_enc = W_dec^T, which any SAELens-style reader expects; `load_sae` ties them again.

    The activation normalisation factor s (`input_scale`) is folded into the stored weights, as SAELens does when it
    saves an SAE trained with `normalize_activations: expected_average_only_in`: W_enc * s, W_dec / s, b_dec / s. The
    file therefore holds an SAE of raw activations (cfg `normalize_activations: none`), correct for any reader; s is
    kept in cfg.json (`irm.input_scale`) so `load_sae` restores the normalised-space weights (unit decoder rows, the
    tie) exactly."""
    from safetensors.torch import save_file

    from irm.artifacts import atomic_dir, write_json

    s = float(sae.input_scale)
    weights = {
        "W_enc": (sae.encoder_weight().detach().double() * s).float().cpu().contiguous(),
        "b_enc": sae.b_enc.detach().float().cpu().contiguous(),
        "W_dec": (sae.W_dec.detach().double() / s).float().cpu().contiguous(),
        "b_dec": (sae.b_dec.detach().double() / s).float().cpu().contiguous(),
    }
    topk = sae.activation == "topk"
    cfg = {
        "architecture": "topk" if topk else "standard",
        "d_in": sae.d_in,
        "d_sae": sae.d_hidden,
        "dtype": "float32",
        "device": "cpu",
        # The paper's encoder reads x itself (paper 4.2: f = ReLU(W_e x + b_e)); center_input reads x - b_dec.
        "apply_b_dec_to_input": sae.center_input,
        "normalize_activations": "none",
        "activation_fn_str": "topk" if topk else "relu",
        **({"k": sae.k, "activation_fn_kwargs": {"k": sae.k}} if topk else {}),
        "finetuning_scaling_factor": False,
        "model_name": model_name,
        "hook_name": HOOK_NAMES[site].format(layer=layer) if layer is not None and site in HOOK_NAMES else None,
        "hook_layer": layer,
        "hook_head_index": None,
        "context_size": context_size,
        "prepend_bos": False,
        "irm": {"tied": sae.tied, "layer": layer, "site": site, "activation": sae.activation, "k": sae.k,
                # The weights above act on raw activations; the SAE was trained on raw * input_scale.
                "input_scale": s, **(irm or {})},
    }
    # SAELens >= 6 reads a file that names its format version through its current path (without one it takes the
    # pre-6.0 conversion) and keeps `metadata` when it saves an SAE back: our settings ride there too (issue 16).
    cfg["sae_lens_version"] = SAE_LENS_FORMAT
    cfg["reshape_activations"] = "none"
    cfg["metadata"] = {"sae_lens_version": SAE_LENS_FORMAT, "irm": cfg["irm"],
                       **{key: cfg[key] for key in ("model_name", "hook_name", "hook_head_index", "context_size",
                                                     "prepend_bos")}}
    directory = Path(directory)
    with atomic_dir(directory) as tmp:
        save_file(weights, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        write_json(tmp / CFG_FILE, cfg)
    return directory


def loadable_model_name(name: Optional[str]) -> Optional[str]:
    """The name another tool can load the model by: the hub id the embedded GGUF model was converted from, else the
    name as given (a hub id, a local path; a tiny test model's alias stays: it exists only in irm)."""
    from irm.models import EMBEDDED_ALIAS, EMBEDDED_HUB_ID

    return EMBEDDED_HUB_ID if name == EMBEDDED_ALIAS else name


def write_sparsity(directory: str | os.PathLike, frequency) -> Path:
    """`sparsity.safetensors` beside an exported SAE: each feature's log10 firing density (`sparsity`, log10(frequency
    + 1e-10), SAELens's convention), from the held-out frequencies the sae stage measures."""
    import torch
    from safetensors.torch import save_file

    from irm.artifacts import atomic_path

    path = Path(directory) / SPARSITY_FILE
    log_density = torch.log10(torch.as_tensor(frequency, dtype=torch.float64) + 1e-10).float().contiguous()
    with atomic_path(path) as tmp:
        save_file({"sparsity": log_density}, str(tmp))
    return path


def _unsupported(cfg: dict) -> Optional[str]:
    """What of an SAELens cfg.json irm's SparseAutoencoder does not implement, or None."""
    if cfg.get("architecture", "standard") not in ("standard", "topk"):
        return f"architecture {cfg.get('architecture')!r}"
    if cfg.get("normalize_activations") not in (None, "none"):
        return f"normalize_activations {cfg.get('normalize_activations')!r}"
    if cfg.get("rescale_acts_by_decoder_norm"):
        return "rescale_acts_by_decoder_norm"
    if cfg.get("reshape_activations") not in (None, "none"):
        return f"reshape_activations {cfg.get('reshape_activations')!r}"
    return None


def read_cfg(directory: str | os.PathLike) -> dict:
    from irm.artifacts import read_json

    return read_json(Path(directory) / CFG_FILE,
                     missing=f"no exported SAE in {directory} ({CFG_FILE} missing); run `python -m irm sae` first",
                     corrupt="{path} is not valid JSON ({error}); rerun `python -m irm sae`")


def load_sae(directory: str | os.PathLike, d_in: Optional[int] = None, device=None):
    """The SparseAutoencoder exported in `directory`, in eval mode. With `d_in`, an SAE of another width (trained on
    another layer or model) is refused with a UserError instead of failing later inside a matmul."""
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from irm.sae.model import SparseAutoencoder

    directory = Path(directory)
    cfg = read_cfg(directory)
    if d_in is not None and int(cfg["d_in"]) != int(d_in):
        raise UserError(
            f"SAE {directory} was trained on {cfg['d_in']}-wide activations but this layer's are {d_in} wide; "
            "retrain it for this run (`python -m irm sae`) or point at the SAE of the right layer/model"
        )
    try:
        weights = load_file(str(directory / WEIGHTS_FILE))
    except (OSError, SafetensorError) as e:
        raise UserError(f"cannot read {directory / WEIGHTS_FILE} ({e}); rerun `python -m irm sae`") from e
    missing = [k for k in WEIGHT_KEYS if k not in weights]
    expected = {"W_enc": (cfg["d_in"], cfg["d_sae"]), "b_enc": (cfg["d_sae"],),
                "W_dec": (cfg["d_sae"], cfg["d_in"]), "b_dec": (cfg["d_in"],)}
    wrong = [k for k in WEIGHT_KEYS if k in weights and tuple(weights[k].shape) != tuple(expected[k])]
    if missing or wrong:
        raise UserError(
            f"{directory / WEIGHTS_FILE} does not match its {CFG_FILE} (missing {missing}, wrong shape {wrong}); "
            "rerun `python -m irm sae`"
        )
    own = cfg.get("irm") or (cfg.get("metadata") or {}).get("irm") or {}  # ours, or ours saved back by SAELens
    unsupported = _unsupported(cfg)
    if unsupported:
        raise UserError(f"{directory / CFG_FILE} describes an SAE irm cannot run ({unsupported}); irm reads SAELens's "
                        "standard (ReLU) and topk SAEs on raw activations")
    tied = bool(own.get("tied", False))
    topk = cfg.get("architecture") == "topk" or own.get("activation") == "topk"
    k = own.get("k") or cfg.get("k") or (cfg.get("activation_fn_kwargs") or {}).get("k")
    if topk and not k:
        raise UserError(f"{directory / CFG_FILE} describes a topk SAE without k; rerun `python -m irm sae`")
    try:
        sae = SparseAutoencoder(int(cfg["d_in"]), int(cfg["d_sae"]), tied=tied, activation="topk" if topk else "relu",
                                k=k, center_input=bool(cfg.get("apply_b_dec_to_input", False)))
    except ValueError as e:
        raise UserError(f"{directory / CFG_FILE}: {e}; rerun `python -m irm sae`") from e
    # Undo save_sae's folding of the normalisation factor: the normalised-space weights, applied to raw * s.
    s = float(own.get("input_scale", 1.0))
    state = {"W_dec": (weights["W_dec"].double() * s).float(), "b_enc": weights["b_enc"],
             "b_dec": (weights["b_dec"].double() * s).float(), "input_scale": torch.tensor(s)}
    if not tied:
        state["W_enc"] = (weights["W_enc"].double() / s).float()
    sae.load_state_dict(state)
    if device is not None:
        sae.to(device)
    return sae.eval().requires_grad_(False)
