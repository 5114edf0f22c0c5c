"""Stage 2 (paper 4.2, appendix G, figure 4): how far each transformer block moved during RLHF.

A block's divergence is the sum, over its parameter tensors (weights and biases, attention and LayerNorm included),
of the Frobenius norm of theta_base - theta_RLHF. Blocks are ranked by it; the top k are the layers the cache, SAE
and later stages work on (`irm.layers.chosen_layers`).
"""

from __future__ import annotations

from typing import Optional

from irm.errors import UserError
from irm.layers import rank_layers
from irm.stages import relpath

OUTPUT_JSON = relpath("divergence")
OUTPUT_PNG = relpath("divergence_plot")


def _block_parameters(model, i: int) -> dict:
    """Block i's parameters keyed by their name relative to the block (`attention.dense.weight`), so blocks of two
    models line up by name whatever their class prefixes."""
    from irm.models import block_prefix

    prefix = block_prefix(model, i)
    return {name[len(prefix):]: p for name, p in model.named_parameters() if name.startswith(prefix)}


def layer_divergence(base, tuned, per_tensor: Optional[dict] = None) -> list[float]:
    """One value per block, in block order: sum over the block's parameters of ||base - tuned||_F. When a dict is
    given as `per_tensor` it is filled with each parameter's norms, {name relative to the block: [one per block]}
    (irm.findings' layer test permutes them across layers).

    Raises UserError when the two models do not have the same blocks, parameter names and shapes."""
    import torch

    from irm.models import n_layers

    kind_base, kind_tuned = base.config.model_type, tuned.config.model_type
    n_base, n_tuned = n_layers(base), n_layers(tuned)
    if kind_base != kind_tuned or n_base != n_tuned:
        raise UserError(
            f"base ({kind_base}, {n_base} blocks) and tuned ({kind_tuned}, {n_tuned} blocks) models differ in "
            "architecture; the tuned policy must be fine-tuned from model.name"
        )
    values = []
    with torch.no_grad():
        for i in range(n_base):
            params_base, params_tuned = _block_parameters(base, i), _block_parameters(tuned, i)
            if params_base.keys() != params_tuned.keys():
                diff = sorted(params_base.keys() ^ params_tuned.keys())
                raise UserError(
                    f"block {i}: base and tuned have different parameters ({', '.join(diff[:4])}); "
                    "the tuned policy must be fine-tuned from model.name"
                )
            total = 0.0
            for name, p in params_base.items():
                q = params_tuned[name]
                if p.shape != q.shape:
                    raise UserError(
                        f"block {i}: parameter {name} has shape {tuple(p.shape)} in base and {tuple(q.shape)} in "
                        "tuned; the tuned policy must be fine-tuned from model.name"
                    )
                # float64: bf16/fp16 differences of nearby weights would round away in their own precision.
                norm = float((p.detach().to(torch.float64) - q.detach().to(p.device, torch.float64)).norm())
                total += norm
                if per_tensor is not None:
                    per_tensor.setdefault(name, []).append(norm)
            values.append(total)
    return values


def plot_divergence(values: list[float], top_k: list[int], path, title: str) -> None:
    """Figure 4: one bar per block, the top-k highlighted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from irm.artifacts import atomic_path

    chosen = set(top_k)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.3 * len(values) + 2.0), 3.4))
    try:
        ax.bar(range(len(values)), values, color=["tab:red" if i in chosen else "tab:gray" for i in range(len(values))])
        ax.set_xlabel("layer (transformer block)")
        ax.set_ylabel(r"$\sum_p \|\theta^{base}_p - \theta^{RLHF}_p\|_F$")
        ax.set_title(title, fontsize=10)
        ax.set_xticks(range(len(values)))
        ax.legend(handles=[plt.Rectangle((0, 0), 1, 1, color="tab:red")], labels=[f"top {len(top_k)}"])
        fig.tight_layout()
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=120)
    finally:
        plt.close(fig)


def run(cfg) -> None:
    """Load base and tuned models, write divergence.json and divergence.png, record the stage as complete."""
    from irm.artifacts import RunDir, write_json
    from irm.models import load_model, load_tuned
    from irm.runtime import start
    from irm.stages import mark_done

    device = start(cfg.seed, cfg.device)
    base, _ = load_model(cfg.model, cfg.seed, device=device)
    tuned, _ = load_tuned(cfg, device=device)
    per_tensor: dict = {}
    values = layer_divergence(base, tuned, per_tensor)
    order, top_k = rank_layers(values, cfg.divergence.top_k)

    run_dir = RunDir(cfg.run_dir)
    json_path, png_path = run_dir.path(OUTPUT_JSON), run_dir.path(OUTPUT_PNG)
    write_json(json_path, {
        "values": values,
        "order": order,
        "top_k": top_k,
        "k": cfg.divergence.top_k,
        "model": cfg.model.name,
        "measure": "per block: sum over parameter tensors of the Frobenius norm of (base - tuned)",
        "per_tensor": per_tensor,
    })
    plot_divergence(values, top_k, png_path, title=f"{cfg.model.name}: per-layer divergence after RLHF")
    mark_done(cfg, "divergence", [json_path, png_path])
