"""The report's figures: each `draw_*` returns a function that draws one figure on a matplotlib Figure, and
`figure` saves it as a PNG under the run's plots/ folder."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Callable

from irm.config import RunConfig
from irm.loggers import tensorboard_dir
from irm.report.text import ABLATION_CONDITIONS, ABLATION_MODES

DPI = 110  # a 8.7-inch figure fills the page's 60rem (960 px) column at this resolution
WIDE = 8.7  # inches: figures with several panels or an outside legend
NARROW = 5.0  # inches: single-panel figures that sit beside a table
# Training metrics of the SAEs plotted by the report (TensorBoard tag suffix, panel title, log axis).
SAE_METRICS = (("mse", "MSE per activation dimension", True),
               ("nmse", "normalised MSE (squared error / variance)", True),
               ("l0", "L0: active features per input", False))
ABLATION_COLOURS = {"splice": "tab:blue", "ablated": "tab:red", "random": "tab:orange"}


def figure(path: Path, draw: Callable, size: tuple[float, float] = (NARROW, 3.6)) -> Path:
    """Draw a figure with `draw(fig)` and save it as a PNG at `path`; legends outside the axes are kept."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from irm.artifacts import atomic_path

    fig = plt.figure(figsize=size, dpi=DPI, layout="constrained")
    draw(fig)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path


def sae_curves(cfg: RunConfig) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """Training and validation curves of every SAE read back from its TensorBoard event files:
    {logger version (`layer-NN`): {tag (`train/x1/mse`): [(step, value)]}}, for the metrics of SAE_METRICS."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    root = tensorboard_dir(cfg.log_dir, cfg.run_dir, "sae")
    wanted = {m for m, _, _ in SAE_METRICS}
    curves: dict[str, dict[str, list[tuple[int, float]]]] = {}
    # One accumulator per logger directory: it reads every event file there (a resumed fit adds one).
    for logs in sorted({e.parent for e in root.rglob("events.out.tfevents.*")}) if root.exists() else []:
        acc = EventAccumulator(str(logs), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags().get("scalars", []):
            parts = tag.split("/")
            if len(parts) == 3 and parts[0] in ("train", "val") and parts[2] in wanted:
                points = sorted((e.step, e.value) for e in acc.Scalars(tag))
                curves.setdefault(str(logs.relative_to(root)), {})[tag] = points
    return curves


def layer_name(version: str) -> str:
    """`layer-20` (the SAE stage's logger version) as 'layer 20'."""
    m = re.fullmatch(r"layer-0*(\d+)", version)
    return f"layer {m.group(1)}" if m else version


def draw_sae_curves(curves: dict[str, dict[str, list[tuple[int, float]]]]) -> Callable:
    """One panel per metric; colour = layer, line style = dictionary size, dots = validation at each epoch's end."""
    from matplotlib.lines import Line2D

    dictionaries = sorted({tag.split("/")[1] for tags in curves.values() for tag in tags},
                          key=lambda d: int(d[1:]) if d[1:].isdigit() else 0)
    styles = dict(zip(dictionaries, ("-", "--", ":", "-.")))

    def draw(fig) -> None:
        axes = fig.subplots(1, len(SAE_METRICS), sharex=True)
        for ax, (metric, title, log) in zip(axes, SAE_METRICS):
            for i, (version, tags) in enumerate(curves.items()):
                colour = f"C{i % 10}"
                for d in dictionaries:
                    train, val = tags.get(f"train/{d}/{metric}", []), tags.get(f"val/{d}/{metric}", [])
                    if train:
                        ax.plot(*zip(*train), color=colour, ls=styles.get(d, "-"), lw=1.2)
                    if val:
                        ax.plot(*zip(*val), color=colour, ls="none", marker="o", ms=3.5)
            ax.set_title(title, fontsize=9)
            ax.set_xlabel("training step", fontsize=8)
            ax.tick_params(labelsize=7)
            if log:
                ax.set_yscale("log")
            ax.grid(alpha=0.3, which="both", lw=0.5)
        handles = [Line2D([], [], color=f"C{i % 10}", lw=2, label=layer_name(v)) for i, v in enumerate(curves)]
        handles += [Line2D([], [], color="0.3", ls=styles.get(d, "-"), label=f"{d[1:]}x dictionary")
                    for d in dictionaries]
        handles.append(Line2D([], [], color="0.3", ls="none", marker="o", ms=3.5, label="validation, end of epoch"))
        fig.legend(handles=handles, loc="outside upper center", ncols=min(len(handles), 6), fontsize=8, frameon=False)

    return draw


def draw_divergence(div: dict) -> Callable:
    """Per-layer divergence as dots joined by a line on an axis fitted to the data (layers differ by far less than
    the divergence itself, so bars from zero would all look the same); the chosen layers in red, labelled."""
    values, chosen = div["values"], div["top_k"]
    mean = sum(values) / len(values)

    def draw(fig) -> None:
        ax = fig.add_subplot()
        layers = range(len(values))
        ax.plot(layers, values, color="0.7", lw=1, zorder=1)
        others = [i for i in layers if i not in chosen]
        ax.scatter(others, [values[i] for i in others], s=16, color="0.35", zorder=2, label="other layers")
        ax.scatter(chosen, [values[i] for i in chosen], s=40, color="tab:red", zorder=3,
                   label=f"chosen: the top {len(chosen)}")
        for i in chosen:
            ax.annotate(str(i), (i, values[i]), textcoords="offset points", xytext=(0, 6), ha="center",
                        fontsize=8, color="tab:red")
        ax.axhline(mean, color="0.5", ls="--", lw=0.8, zorder=0, label=f"mean over layers, {mean:.4f}")
        ax.margins(y=0.18)
        ax.set_xticks(list(layers), minor=True)
        ax.set_xticks(list(layers)[:: max(1, len(values) // 15)])
        ax.tick_params(labelsize=7)
        ax.set_xlabel("layer (transformer block)", fontsize=9)
        ax.set_ylabel(r"$\sum_p\,\|\theta_p^{base} - \theta_p^{tuned}\|_F$"
                      + ("\n(axis does not start at 0)" if ax.get_ylim()[0] > 0 else ""), fontsize=9)
        ax.grid(axis="y", alpha=0.3, lw=0.5)
        fig.legend(loc="outside upper center", ncols=3, fontsize=8, frameon=False)

    return draw


def draw_ablation(before: dict, modes: dict) -> Callable:
    """Mean reward per condition with 95% intervals: the unspliced model grey and hatched with a dashed line at its
    mean, then one group of bars per splice mode, coloured by condition."""
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    def err(d: dict) -> tuple[float, float]:
        lo, hi = d.get("ci95") or (d["mean"], d["mean"])
        return d["mean"] - lo, hi - d["mean"]

    def draw(fig) -> None:
        ax = fig.add_subplot()
        ax.axhline(before["mean"], color="0.3", ls="--", lw=1, zorder=0)
        ax.bar([0], [before["mean"]], yerr=[[err(before)[0]], [err(before)[1]]], capsize=3, color="0.85",
               edgecolor="0.3", hatch="//", width=0.7)
        ticks, labels, x = [0], ["no splice\n(before)"], 1.5
        for mode, conds in modes.items():
            present = [c for c in ABLATION_CONDITIONS if c in conds]
            xs = [x + j for j in range(len(present))]
            for xi, c in zip(xs, present):
                lo, hi = err(conds[c])
                ax.bar([xi], [conds[c]["mean"]], yerr=[[lo], [hi]], capsize=3, color=ABLATION_COLOURS[c], width=0.7)
            ticks += xs
            labels += present
            if xs:
                ax.text(sum(xs) / len(xs), -0.11, ABLATION_MODES.get(mode, mode), ha="center", va="top", fontsize=8,
                        fontweight="bold", transform=ax.get_xaxis_transform())
            x += len(present) + 0.5
        ax.set_xticks(ticks, labels, fontsize=8)
        ax.set_ylabel("mean reward of the completions", fontsize=9)
        ax.tick_params(axis="y", labelsize=7)
        ax.grid(axis="y", alpha=0.3, lw=0.5)
        handles = [Patch(facecolor="0.85", edgecolor="0.3", hatch="//", label="tuned model, no splice (before)")]
        handles += [Patch(color=ABLATION_COLOURS[c], label=f"{c}: {text}") for c, text in ABLATION_CONDITIONS.items()]
        handles.append(Line2D([], [], color="0.3", ls="--", lw=1, label=f"before mean, {before['mean']:.3f}"))
        fig.legend(handles=handles, loc="outside upper center", ncols=3, fontsize=8, frameon=False)

    return draw


def draw_lexicon(rows: list[dict]) -> Callable:
    """Reconstructed against true value, one dot per word of lexicon.csv, held-out words in their own colour."""

    def draw(fig) -> None:
        ax = fig.add_subplot()
        for held, colour, label in (("0", "tab:blue", "not held out"), ("1", "tab:orange", "held out")):
            pts = [(float(r["true"]), float(r["reconstructed"])) for r in rows if r["heldout"] == held]
            if pts:
                ax.scatter(*zip(*pts), s=6, alpha=0.6, c=colour, label=label)
        lo, hi = ax.get_xlim()
        ax.plot([lo, hi], [lo, hi], color="0.4", ls="--", lw=0.8, label="reconstructed = true")
        ax.set_xlim(lo, hi)
        ax.set_xlabel("true VADER value", fontsize=9)
        ax.set_ylabel("reconstructed value", fontsize=9)
        ax.tick_params(labelsize=7)
        fig.legend(loc="outside upper center", ncols=3, fontsize=7, frameon=False)

    return draw


def draw_control(c: dict, rows: list[dict]) -> Callable:
    """The base-model control (control.json, control_words.csv): each word's reconstructed value on both models,
    and the sign-shuffled nulls of tau against the observed and raw-activation taus."""

    def draw(fig) -> None:
        left, right = fig.subplots(1, 2)
        x = [float(r["base"]) for r in rows]
        y = [float(r["tuned"]) for r in rows]
        true = [float(r["true"]) for r in rows]
        sc = left.scatter(x, y, c=true, cmap="coolwarm", vmin=-4, vmax=4, s=6)
        moved = [r for r in rows if r["moved"] == "1"]
        left.scatter([float(r["base"]) for r in moved], [float(r["tuned"]) for r in moved], s=40,
                     facecolors="none", edgecolors="k", linewidths=0.7)
        for r in sorted(moved, key=lambda r: -abs(float(r["move"])))[:8]:
            left.annotate(r["word"], (float(r["base"]), float(r["tuned"])), fontsize=7)
        lo, hi = min(x + y), max(x + y)
        left.plot([lo, hi], [lo, hi], color="0.5", lw=0.8, ls=":")
        left.set_xlabel("base model: reconstructed value")
        left.set_ylabel("tuned model: reconstructed value")
        fig.colorbar(sc, ax=left, label="true lexicon value")
        for label, colour in (("tuned", "tab:red"), ("base", "tab:blue")):
            m = c[label]
            right.hist(m["permutation"]["all"]["taus"], bins=20, alpha=0.5, color=colour, label=f"{label}: null")
            right.axvline(m["tau"]["all"]["tau"], color=colour, lw=1.5, label=f"{label}: observed")
            raw = (m.get("raw_tau") or {}).get("all", {}).get("tau")
            if raw is not None:
                right.axvline(raw, color=colour, lw=1, ls="--", label=f"{label}: raw activations")
        right.set_xlabel("Kendall tau vs the lexicon")
        right.set_ylabel("sign-shuffled refits")
        right.legend(fontsize=7, loc="upper left")

    return draw
