"""`python -m irm report`: every table and plot of the paper, filled from one run directory, as report.md, a
self-contained report.html (plots inlined), and summary.json (the headline numbers, machine-readable)."""

from __future__ import annotations

import base64
import html
import platform
import re
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from irm.artifacts import write_json, write_text
from irm.config import RunConfig
from irm.diff.report import diff_section, diff_summary
from irm.loggers import tensorboard_dir
from irm.stages import CONFIG_YAML, artifact, mark_done, read_artifact, relpath

PLOTS = relpath("plots")
DPI = 110  # a 8.7-inch figure fills the page's 60rem (960 px) column at this resolution
SHORT = 24  # characters: table cells up to this long are kept on one line in the HTML
WIDE = 8.7  # inches: figures with several panels or an outside legend
NARROW = 5.0  # inches: single-panel figures that sit beside a table
# Training metrics of the SAEs plotted by the report (TensorBoard tag suffix, panel title, log axis).
SAE_METRICS = (("mse", "MSE per activation dimension", True),
               ("nmse", "normalised MSE (squared error / variance)", True),
               ("l0", "L0: active features per input", False))
# Readable names of validation.json's scalar entries; an entry not listed here is shown under its key.
VALIDATION_LABELS = {
    "inputs": "inputs",
    "n_texts": "eval texts",
    "n_inputs": "inputs (token positions)",
    "threshold": "threshold on R",
    "threshold_scale": "threshold scale",
    "raw_threshold": "threshold on R's raw output",
    "n_inputs_above": "inputs where R > threshold",
    "n_related": "features labelled related to the reward",
    "related": "those features (layer: indices)",
    "active": "a feature is active where",
    "related_frequency": "activation frequency of the related features, inputs above threshold",
    "average_frequency": "activation frequency of all features, inputs above threshold",
    "related_frequency_all_inputs": "activation frequency of the related features, all inputs",
    "average_frequency_all_inputs": "activation frequency of all features, all inputs",
}
KENDALL_LABELS = {"all": "all", "negative": "negative (true value < 0)", "heldout": "held out (R never saw them)",
                  "seen": "seen (in R's training triples)",
                  "vs_vader": "all, against VADER (a second reference, not the training reward)"}
ABLATION_CONDITIONS = {"splice": "SAE spliced in, nothing ablated", "ablated": "reward-related features ablated",
                       "random": "as many random features ablated"}
ABLATION_COLOURS = {"splice": "tab:blue", "ablated": "tab:red", "random": "tab:orange"}
ABLATION_MODES = {"reconstruction": "reconstruction splice (paper)", "error": "splice keeping the SAE error"}


def _load(root: Path, key: str) -> Optional[Any]:
    """Artifact `key` of the run (irm.stages.read_artifact), None if its stage has not run; a corrupt one is refused
    in one line."""
    return read_artifact(root, key, missing_ok=True)


def _fmt(x: Any, digits: int = 3) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, float):
        return f"{x:.{digits}g}" if abs(x) < 1e-3 and x != 0 else f"{x:.{digits}f}"
    return str(x)


def _p(p: Optional[float]) -> str:
    """A p-value; scipy returns exactly 0 when it underflows the smallest double, which is not a p of 0."""
    if p == 0.0:
        return "< 1e-300"
    return _fmt(p) if p is None or p >= 1e-3 else f"{p:.2e}"


def _ci(d: Optional[dict]) -> str:
    if not d or d.get("ci95") is None:
        return "n/a"
    lo, hi = d["ci95"]
    return f"[{_fmt(lo)}, {_fmt(hi)}]"


def _cell(x: Any) -> str:
    """A table cell as a reader wants it: numbers formatted, strings without quotes, lists and dicts as plain text."""
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, dict):
        return "; ".join(f"{k}: {_cell(v)}" for k, v in x.items())
    if isinstance(x, (list, tuple)):
        return ", ".join(_cell(v) for v in x)
    return _fmt(x)


def _features(by_layer: dict) -> str:
    """{"20": [18], "22": [422, 7]} as 'layer 20: 18; layer 22: 422, 7'."""
    return "; ".join(f"layer {layer}: {_cell(idx)}" for layer, idx in by_layer.items()) or "none"


class Doc:
    """Builds the Markdown and the HTML of the report side by side from the same calls."""

    def __init__(self) -> None:
        self.md: list[str] = []
        self.html: list[str] = []
        self.sections: list[tuple[str, str]] = []  # (anchor, title) of every section, for the HTML contents

    def heading(self, text: str, level: int = 2) -> None:
        self.md.append(f"{'#' * level} {text}\n")
        anchor = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
        if level == 2:
            self.sections.append((anchor, text))
        self.html.append(f'<h{level} id="{anchor}">{html.escape(text)}</h{level}>')

    def para(self, text: str) -> None:
        self.md.append(text + "\n")
        self.html.append(f"<p>{html.escape(text)}</p>")

    def table(self, header: list[str], rows: list[list[Any]], caption: str = "") -> None:
        cells = [[_cell(c) for c in r] for r in rows]
        if caption:
            self.md.append(f"*{caption}*\n")
        self.md.append("| " + " | ".join(header) + " |")
        self.md.append("|" + "---|" * len(header))
        for r in cells:
            self.md.append("| " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in r) + " |")
        self.md.append("")
        cap = f"<caption>{html.escape(caption)}</caption>" if caption else ""
        head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
        # Short cells (numbers, intervals) never wrap; prose does.
        body = "".join("<tr>" + "".join(f"<td{' class=n' if len(c) <= SHORT else ''}>{html.escape(c)}</td>" for c in r)
                       + "</tr>" for r in cells)
        self.html.append(f"<table>{cap}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")

    def image(self, png: Path, caption: str) -> None:
        self.md.append(f"![{png.stem}]({png.parent.name}/{png.name})\n\n*{caption}*\n")
        data = base64.b64encode(png.read_bytes()).decode()
        self.html.append(f'<figure><img alt="{html.escape(caption)}" src="data:image/png;base64,{data}">'
                         f"<figcaption>{html.escape(caption)}</figcaption></figure>")

    def raw(self, html_text: str, md_text: str) -> None:
        """Ready-made HTML (a rendered template) and what the Markdown shows in its place."""
        self.md.append(md_text + "\n")
        self.html.append(html_text)

    def code(self, text: str, summary: str) -> None:
        """A block of YAML; in the HTML folded under `summary` so it does not bury the results."""
        self.md.append("```yaml\n" + text.rstrip() + "\n```\n")
        self.html.append(f"<details><summary>{html.escape(summary)}</summary><pre>{html.escape(text)}</pre></details>")

    @contextmanager
    def side_by_side(self) -> Iterator[None]:
        """In the HTML, lay what is added inside the block out in a row (a long table beside its plot)."""
        self.html.append('<div class="row">')
        try:
            yield
        finally:
            self.html.append("</div>")

    def page(self, title: str) -> str:
        """The HTML document: a contents list of the sections after the title and the run line."""
        contents = "".join(f'<li><a href="#{a}">{html.escape(t)}</a></li>' for a, t in self.sections)
        body = self.html[:2] + [f"<nav><ol>{contents}</ol></nav>"] + self.html[2:]
        return _html_page(title, "\n".join(body))


def _plot(path: Path, draw: Callable, size: tuple[float, float] = (NARROW, 3.6)) -> Path:
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


def _sae_curves(cfg: RunConfig) -> dict[str, dict[str, list[tuple[int, float]]]]:
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


def _layer_name(version: str) -> str:
    """`layer-20` (the SAE stage's logger version) as 'layer 20'."""
    m = re.fullmatch(r"layer-0*(\d+)", version)
    return f"layer {m.group(1)}" if m else version


def _draw_sae_curves(curves: dict[str, dict[str, list[tuple[int, float]]]]) -> Callable:
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
        handles = [Line2D([], [], color=f"C{i % 10}", lw=2, label=_layer_name(v)) for i, v in enumerate(curves)]
        handles += [Line2D([], [], color="0.3", ls=styles.get(d, "-"), label=f"{d[1:]}x dictionary")
                    for d in dictionaries]
        handles.append(Line2D([], [], color="0.3", ls="none", marker="o", ms=3.5, label="validation, end of epoch"))
        fig.legend(handles=handles, loc="outside upper center", ncols=min(len(handles), 6), fontsize=8, frameon=False)

    return draw


def _draw_divergence(div: dict) -> Callable:
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


def _draw_ablation(before: dict, modes: dict) -> Callable:
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


def build_summary(root: Path) -> dict:
    reward = _load(root, "reward_eval") or {}
    kendall = _load(root, "kendall") or {}
    mmcs = _load(root, "mmcs") or {}
    ablation = _load(root, "ablation") or {}
    validation = _load(root, "validation") or {}
    return {
        "reward": {
            "base_mean": reward.get("base", {}).get("mean"),
            "tuned_mean": reward.get("tuned", {}).get("mean"),
            "base_ci95": reward.get("base", {}).get("ci95"),
            "tuned_ci95": reward.get("tuned", {}).get("ci95"),
        },
        "kendall": {
            k: {"tau": kendall.get(k, {}).get("tau"), "p": kendall.get(k, {}).get("p"),
                "ci95": kendall.get(k, {}).get("ci95"), "n": kendall.get(k, {}).get("n")}
            for k in ("all", "negative", "heldout")
        },
        "reference": kendall.get("reference"),  # what the true values are: the training reward's (irm.reward)
        "mmcs": {layer: {"max": v.get("max"), "hungarian": v.get("hungarian"), "max_firing": v.get("max_firing"),
                         "chance": {m: {k: c.get(k) for k in ("mean", "std")} for m, c in (v.get("chance") or {}).items()},
                         "init": v.get("init")}
                 for layer, v in mmcs.get("layers", {}).items()},
        "sae": {layer: {name: {k: m.get(k) for k in ("width", "l0", "l0_fraction", "explained_variance",
                                                     "explained_variance_after_first", "dead_fraction",
                                                     "dead_fraction_all_tokens", "ce_loss_recovered")}
                        for name, m in rec.items()}
                for layer, rec in ((_load(root, "sae_metrics") or {}).get("layers") or {}).items()},
        "ablation": {
            "before": ablation.get("before", {}).get("mean"),
            "after": ablation.get("after", {}).get("mean"),
            "n_features": ablation.get("n_features"),
            "paired": {mode: {key: {k: conds[key].get(k) for k in ("mean", "ci95", "p_value", "between_draw_std")}
                              for key in ("ablated_minus_splice", "ablated_minus_random") if key in conds}
                       for mode, conds in ablation.get("modes", {}).items()},
        },
        "validation": {**{k: validation.get(k) for k in ("related_frequency", "average_frequency", "n_inputs_above")},
                       "vs_other_explained": {k: {f: v.get(f) for f in ("n_related", "n_other", "related_frequency",
                                                                         "other_frequency", "lift", "p_value")}
                                              for k, v in (validation.get("vs_other_explained") or {}).items()}},
        "explain": {k: (_load(root, "explain_scores") or {}).get(k)
                    for k in ("backend", "model", "explanations", "n_scored", "n_unparsed", "n_retried")},
        **({"diff": diff} if (diff := diff_summary(root)) else {}),
    }


def findings_section(doc: "Doc", root: Path, summary: dict) -> None:
    """The findings table at the top of the report (irm.findings: each claim, its number, its control, a verdict
    from its interval or p-value) and the named numbers of the controls in summary.json: the paired reward
    difference under `reward`, tau_base, delta_tau with its interval, the permutation p-values and the
    raw-activation tau under `control`."""
    from irm.findings import build_findings, paired_reward

    rows = build_findings(root)
    summary["findings"] = rows
    paired = paired_reward(_load(root, "reward_eval"))
    if paired:
        summary.setdefault("reward", {})["paired_difference_tuned_minus_base"] = paired
    c = _load(root, "control")
    if c:
        def tau(label, key="tau", subset="all"):
            return (c.get(label, {}).get(key) or {}).get(subset, {}).get("tau")

        summary["control"] = {
            "sae_choice": c.get("sae_choice"),
            "tau_tuned": tau("tuned"), "tau_base": tau("base"),
            "tau_tuned_heldout": tau("tuned", subset="heldout"), "tau_base_heldout": tau("base", subset="heldout"),
            "delta_tau_tuned_minus_base": {k: c["delta_tau"]["all"].get(k) for k in ("delta", "ci95", "n")},
            "delta_tau_heldout": {k: c["delta_tau"].get("heldout", {}).get(k) for k in ("delta", "ci95", "n")},
            "permutation_p_tuned": c["tuned"]["permutation"]["all"]["p_greater"],
            "permutation_p_base": c["base"]["permutation"]["all"]["p_greater"],
            "permutation_p_tuned_heldout": c["tuned"]["permutation"].get("heldout", {}).get("p_greater"),
            "permutation_refits": c["tuned"]["permutation"]["all"]["n"],
            "raw_activation_tau_tuned": tau("tuned", "raw_tau"), "raw_activation_tau_base": tau("base", "raw_tau"),
            "words_moved_toward_reward": c.get("per_word", {}).get("n_moved_toward"),
            "words_moved_away_from_reward": c.get("per_word", {}).get("n_moved_away"),
            "sae_nmse_at_sentiment_tokens": c.get("sae_fit", {}).get("nmse_at_sentiment_tokens"),
        }
    doc.heading("Findings")
    if rows:
        doc.table(["claim", "number", "control", "verdict", "false positives", "detail"],
                  [[r["claim"], r["number"], r["control"], _verdict_text(r), _fp_text(r), r["detail"]] for r in rows],
                  caption="Each claim of the paper as this run measured it. The verdict follows from the interval "
                          "or p-value at one convention (two-sided alpha 0.05: a 95% interval, or 2.5% in each "
                          "direction), Holm-corrected across the table's rows: supported when it excludes the "
                          "control in the claimed direction, contradicted when it excludes it in the other, else "
                          "not distinguishable, with the smallest effect this run could have detected with 80% "
                          "power; not tested when the stage ran but had nothing to measure (the detail says why). "
                          "False positives: the rate at which this verdict said supported or contradicted in "
                          "simulated worlds where the claim is false, in the worst of its null families: first the "
                          "full calibration harness (hundreds of worlds or more per family at its default sizes; "
                          "benchmarks/RESULTS.md section 10), then this run's calibrate stage (a few worlds at this "
                          "run's sizes, hence its wide interval).")
    else:
        doc.para("No claim could be checked: the stages that measure them have not run.")


def _verdict_text(r: dict) -> str:
    """The verdict, with the minimal detectable effect when not distinguishable (calibrate stage)."""
    mde = r.get("minimal_detectable_effect")
    if mde is None:
        return r["verdict"]
    unit = f" {r['effect_unit']}" if r.get("effect_unit") else ""
    return f"{r['verdict']} (detectable with 80% power: {mde:.3g}{unit}; from {r.get('mde_source')})"


def _fp_text(r: dict) -> str:
    """The certified rate of the full harness, then this run's calibrate stage's, each with its interval."""
    if r["verdict"] == "not tested":
        return "n/a"

    def rate(fp, ci, worlds=None):
        if fp is None:
            return "not calibrated"
        return (f"{100 * fp:.1f}%" + (f" [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]" if ci else "")
                + (f" over {worlds:,} worlds" if worlds else ""))

    certified = rate(r.get("certified_false_positive_rate"), r.get("certified_false_positive_ci95"),
                     r.get("certified_worlds"))
    own = rate(r.get("false_positive_rate"), r.get("false_positive_ci95"))
    return f"harness {certified}; this run's sizes {own}"


def control_section(doc: "Doc", root: Path, plots: Path) -> None:
    """The base-model control and nulls (control.json, control_words.csv): taus of both chains, their permutation
    nulls and raw-activation fits, delta_tau, and the words that moved between the two reconstructed lexicons."""
    c = _load(root, "control")
    doc.heading("Base-model control and nulls")
    if not c:
        doc.para("Not run.")
        return
    doc.para(f"The same triples, {c['n_words']} lexicon words and {c['n_contexts']} contexts through the same chain "
             f"on the tuned and on the base model, with {c['sae_choice']} (why: irm/control.py). R is a closed-form "
             f"ridge refit for both; the permutation null refits it on targets whose signs were flipped for a random "
             f"half of the triples; the raw-activation R reads the MLP outputs the SAEs encode.")
    rows = []
    for label in ("tuned", "base"):
        m = c[label]
        perm = m["permutation"]["all"]
        rows.append([label, _fmt(m["tau"]["all"]["tau"]), _fmt(m["tau"]["heldout"]["tau"]),
                     _ci({"ci95": perm.get("q95")}), _p(perm["p_greater"]),
                     _fmt((m.get("raw_tau") or {}).get("all", {}).get("tau")),
                     _fmt(c["sae_fit"]["nmse_at_sentiment_tokens"][label])])
    doc.table(["model", "tau (all)", "tau (held out)", "null tau, 95% range (sign-shuffled R)", "permutation p",
               "tau, R on raw activations", "SAE NMSE at sentiment tokens"], rows,
              caption=f"Kendall tau of R's output against the lexicon; permutation p over "
                      f"{c['tuned']['permutation']['all']['n']} refits (one-sided)")
    d, dh = c["delta_tau"]["all"], c["delta_tau"].get("heldout", {})
    doc.table(["words", "delta_tau = tau_tuned - tau_base", "paired bootstrap 95% CI", "n"],
              [["all", _fmt(d["delta"]), _ci(d), d["n"]]]
              + ([["held out", _fmt(dh.get("delta")), _ci(dh), dh.get("n")]] if dh else []),
              caption=d.get("method", ""))
    pw = c["per_word"]
    moved_rows = [r for r in pw.get("top", []) if r["moved"]]
    with doc.side_by_side():
        all_rows = _load(root, "control_words")
        if all_rows:
            doc.image(_plot(plots / "control.png", _draw_control(c, all_rows), (WIDE, 3.8)),
                      "Left: each word's reconstructed value on the base model (x) and the tuned model (y), coloured "
                      "by its true lexicon value; circled: words that moved. Right: Kendall tau of R refit on "
                      "sign-shuffled targets (histograms) against the observed tau (solid) and R on raw "
                      "activations (dashed), per model.")
    doc.table(["word", "true", "base", "tuned", "move", "direction", "held out"],
              [[r["word"], r["true"], _fmt(r["base"]), _fmt(r["tuned"]), _fmt(r["move"]), r["direction"],
                "yes" if r["heldout"] else ""] for r in moved_rows] or [["(none)", "", "", "", "", "", ""]],
              caption=f"Words that moved (|move - median| > {_fmt(pw['threshold'])}, {pw['z']} robust SDs): "
                      f"{pw['n_moved_toward']} toward the training reward, {pw['n_moved_away']} away. Over all "
                      f"{pw['n_words']} words, {pw['n_toward']} moved toward and {pw['n_away']} away (sign test "
                      f"p {_p(pw.get('sign_test_p'))}).")


def _draw_control(c: dict, rows: list[dict]) -> Callable:
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


def _score(f: dict, key: str = "score") -> str:
    """A feature's detection (`score`) or fuzzing (`fuzz`) accuracy: n/a when it was not scored, 'unparsed' when the
    scorer's answer was not, marked 'at chance' when its interval holds 0.5."""
    s = f.get(key)
    if not isinstance(s, dict):
        return "n/a"
    if s.get("accuracy") is None:
        return "unparsed"
    return _fmt(s["accuracy"]) + (" (at chance)" if s.get("at_chance") else "")


def _score_detail(s: Optional[dict]) -> Optional[dict]:
    """A score for the feature page: accuracy, its interval, F1, the set's size and the at-chance mark."""
    if not isinstance(s, dict):
        return None
    if s.get("accuracy") is None:
        return {"text": "unparsed" + (f" ({s['unscored_reason']})" if s.get("unscored_reason") else ""),
                "at_chance": False}
    ci = s.get("ci95")
    return {"text": f"accuracy {_fmt(s['accuracy'])}" + (f" [{_fmt(ci[0])}, {_fmt(ci[1])}]" if ci else "")
                    + f", F1 {_fmt(s.get('f1'))}, {s.get('n_active', 0) + s.get('n_inactive', 0)} texts",
            "at_chance": bool(s.get("at_chance"))}


HIST_W, HIST_H = 260, 90  # px: the dashboard's activation histogram


def _histogram_svg(h: Optional[dict], caption: Optional[str] = None, height: int = HIST_H) -> Optional[dict]:
    """Bar geometry of a histogram ({edges, counts}) for the dashboard template."""
    if not h or not h.get("counts") or not sum(h["counts"]):
        return None
    counts, edges = h["counts"], h["edges"]
    top, w = max(counts), HIST_W / len(counts)
    bars = [{"x": round(i * w, 1), "w": round(max(w - 1, 1), 1), "h": round(height * c / top, 1),
             "y": round(height - height * c / top, 1),
             "title": f"{edges[i]:.3g} to {edges[i + 1]:.3g}: {c}"} for i, c in enumerate(counts)]
    return {"bars": bars, "width": HIST_W, "height": height, "min": f"{edges[0]:.3g}", "max": f"{edges[-1]:.3g}",
            "caption": caption or f"max activation per window ({h.get('windows_active')} of {h.get('windows')} "
                                  "windows fire)"}


def _percent(x: Optional[float]) -> str:
    return "n/a" if x is None else f"{100 * x:.3g}%"


def _density(d: Optional[dict]) -> Optional[str]:
    if not d:
        return None
    text = (f"fires on {_percent(d.get('tokens'))} of tokens ({d.get('tokens_active')} of {d.get('tokens_total')} "
            f"cached) and {_percent(d.get('windows'))} of windows")
    return text + (f"; {_percent(d['held_out'])} of the SAE's held-out tokens" if d.get("held_out") is not None
                   else "")


def _window(r: dict, peak: float, gap: str) -> dict:
    """One record as shaded tokens; a quantile window says which bin it was drawn from."""
    b = r.get("bin")
    title = (f"drawn from windows with max {b[0]:.3g} to {b[1]:.3g} ({_percent(b[2])} of the activating windows)"
             if b else "")
    return {"kind": r.get("kind", ""), "title": title,
            "tokens": [{"text": t + gap, "value": f"{a:.3g}",
                        "alpha": round(min(max(a, 0.0) / peak, 1.0), 3) if peak > 0 else 0.0}
                       for t, a in zip(r["tokens"], r["activations"])]}


def _dashboard(f: dict) -> dict:
    """One feature's page as the dashboard template's context."""
    from irm.explain.records import token_gap

    records = f.get("records") or []
    peak = max([a for r in records for a in r.get("activations", [])] + [0.0])
    # Word-level tokenizers decode tokens without their spaces (BPE ones keep a leading space): put one back.
    gap = token_gap(r.get("tokens", []) for r in records)
    lens = f.get("logit_lens") or {}
    promoted, suppressed = lens.get("promoted") or [], lens.get("suppressed") or []
    pair = f.get("pair") or {}
    return {"layer": f.get("layer"), "dictionary": f.get("dictionary"), "index": f.get("index"),
            "label": f.get("label"), "status": f.get("status") or "unparsed", "score": _score(f),
            "detection": _score_detail(f.get("score")), "fuzzing": _score_detail(f.get("fuzz")),
            "label_method": f.get("label_method"), "explanation": f.get("explanation"),
            "rejected": f.get("rejected_explanation") or (f.get("note") if f.get("explanation") is None else None),
            "max_activation": _fmt(f.get("max_activation")), "density": _density(f.get("density")),
            "pair": f"{pair.get('dictionary')} #{pair.get('index')}, cosine {_fmt(pair.get('cosine'))}" if pair else "",
            "windows": [_window(r, peak, gap) for r in records if r.get("kind") == "top"],
            "quantiles": [_window(r, peak, gap) for r in records if r.get("kind") == "quantile"],
            "hist": _histogram_svg(f.get("histogram")),
            "logit_hist": _histogram_svg(lens.get("histogram"), "effect on every token's logit (vocabulary count)",
                                         height=50),
            "lens_method": lens.get("method"), "lens_note": lens.get("note") or "not computed",
            "promoted": promoted,
            "lens_rows": [((p[0], f"{p[1]:+.2f}"), (s[0], f"{s[1]:+.2f}")) for p, s in zip(promoted, suppressed)]}


def dashboard_section(doc: "Doc", feats: list[dict]) -> None:
    """A page per shared feature (Neuronpedia / SAEDashboard style), rendered from a Jinja2 template into the HTML;
    the Markdown points there."""
    from jinja2 import Environment, FileSystemLoader, select_autoescape

    from irm.explain.stage import NOT_EXPLAINED

    env = Environment(loader=FileSystemLoader(Path(__file__).parent / "templates"),
                      autoescape=select_autoescape(["html", "j2"]), trim_blocks=True, lstrip_blocks=True)
    intro = ("Per feature of the shared pairs: its activation density, its top-activating windows and one window from "
             "each lower quantile bin with each token shaded by its activation (hover for the value), the histogram "
             "of its largest activation per window, the tokens its decoder direction promotes and suppresses directly "
             "through the unembedding (logit effect), and its explanation with its label and its detection and "
             "fuzzing scores (95% interval over the feature's texts; 'at chance' when it holds 0.5, what guessing "
             "gets on these balanced sets). The same pages in SAEDashboard's Neuronpedia format: "
             "explain/neuronpedia/.")
    boards = [_dashboard(f) for f in feats]
    doc.heading("Feature dashboards", 3)
    doc.raw(env.get_template("feature_dashboard.html.j2").render(intro=intro, features=boards,
                                                                 not_explained=NOT_EXPLAINED),
            f"{len(feats)} feature dashboards (density, top and quantile windows, histogram, logit effect, "
            f"explanation and scores): see report.html; SAEDashboard/Neuronpedia JSON in explain/neuronpedia/.")


def reward_section(doc: "Doc", cfg: RunConfig, root: Path, plots: Path) -> None:
    """Table 7: reward before and after RLHF, the paired difference, example completions."""
    reward = _load(root, "reward_eval")
    doc.heading("Reward before and after PPO (paper table 7)")
    if reward:
        rows = [["base", _fmt(reward["base"]["mean"]), _ci(reward["base"]), reward["base"].get("n"), ""],
                ["tuned", _fmt(reward["tuned"]["mean"]), _ci(reward["tuned"]), reward["tuned"].get("n"), ""]]
        diff = reward.get("difference")
        if diff:
            rows.append(["tuned - base (paired: same prefixes)", _fmt(diff["mean"]), _ci(diff), diff.get("n"),
                         _p(diff.get("p_value"))])
        doc.table(["model", "mean reward", "95% CI", "n", "p-value (paired t-test)"], rows,
                  caption=f"{reward.get('new_tokens')} new tokens after {reward.get('prefix_tokens')}-token "
                          "held-out prefixes")
        examples = reward.get("examples") or []
        if examples:
            doc.table(["held-out prefix", "base completion", "reward", "tuned completion", "reward"],
                      [[e["prefix"], e["base"], e["base_reward"], e["tuned"], e["tuned_reward"]] for e in examples],
                      caption="Example completions")
    else:
        doc.para("Not run.")



def divergence_section(doc: "Doc", cfg: RunConfig, root: Path, plots: Path) -> None:
    """Figure 4: each layer's parameter distance, the chosen layers."""
    div = _load(root, "divergence")
    doc.heading("Layer divergence (paper figure 4)")
    if div and div.get("values"):
        values = div["values"]
        mean = sum(values) / len(values)
        spread = (max(values) - min(values)) / mean if mean else 0.0
        with doc.side_by_side():
            doc.image(_plot(plots / "layer_divergence.png", _draw_divergence(div), (NARROW, 4.6)),
                      f"Divergence of each layer's parameters, base vs tuned ({div.get('measure', 'per layer')}). "
                      f"The axis is fitted to the data: the layers differ by at most {100 * spread:.1f}% of the "
                      f"mean. The {len(div['top_k'])} largest (red) are the layers the SAEs are trained on.")
            doc.table(["layer", "divergence", "chosen"],
                      [[i, _fmt(v, 4), "yes" if i in div["top_k"] else ""] for i, v in enumerate(values)])
    else:
        doc.para("Not run.")



def dictionaries_section(doc: "Doc", cfg: RunConfig, root: Path, plots: Path) -> None:
    """Table 1: SAE quality on held-out data, MMCS beside its chance level, training curves."""
    mmcs = _load(root, "mmcs")
    doc.heading("Dictionaries and their overlap (paper table 1, eq. 2)")
    sae_metrics = _load(root, "sae_metrics")
    if sae_metrics and sae_metrics.get("layers"):
        st = sae_metrics.get("settings", {})
        arch = (f"TopK (k = {st.get('k')})" if st.get("activation") == "topk"
                else f"ReLU + L1 (alpha = {st.get('l1_coefficient')})")
        rows = []
        for layer, rec in sorted(sae_metrics["layers"].items(), key=lambda kv: int(kv[0])):
            for name, m in sorted(rec.items(), key=lambda kv: int(kv[0][1:])):
                l0, frac = m.get("l0"), m.get("l0_fraction")
                rows.append([layer, name, m.get("width"),
                             "n/a" if l0 is None else f"{l0:.1f} ({100 * frac:.1f}%)",
                             _fmt(m.get("explained_variance")), _fmt(m.get("explained_variance_after_first")),
                             "n/a" if m.get("dead_fraction") is None else f"{100 * m['dead_fraction']:.1f}%"
                             + ("" if m.get("dead_fraction_all_tokens") is None
                                else f" ({100 * m['dead_fraction_all_tokens']:.1f}%)"),
                             _fmt(m.get("ce_loss_recovered")), _ce_gap_text(m)])
        held = sae_metrics.get("heldout", {})
        doc.table(["layer", "dictionary", "features", "L0 (% of features)", "explained variance",
                   "explained variance, first tokens left out", "dead on held-out (on any cached token)",
                   "CE loss recovered", "L_SAE - L_clean; L_zero - L_clean (nats)"], rows,
                  caption=f"SAE quality on held-out data ({arch}; activations normalised to mean norm sqrt(d): "
                          f"{st.get('normalize')}; dead features revived by {st.get('revive')}). L0: features active "
                          "per token; dead: features that fire on no held-out token; explained variance on the "
                          f"held-out {100 * held.get('cache_val_fraction', 0):.0f}% of the activation cache (also "
                          "without each document's first token, whose activations can be an attention sink hundreds "
                          "of times larger than any other's and then dominate the variance); CE loss "
                          "recovered = (L_zero - L_SAE) / (L_zero - L_clean), the tuned model's next-token loss on "
                          f"{held.get('ce_documents')} held-out documents with the layer's output zeroed, replaced "
                          "by the SAE's reconstruction, untouched (1 = the splice costs nothing; above 1 = the "
                          "splice lowers the loss a little, read it with the two gaps beside it: when zeroing the "
                          "layer costs a few hundredths of a nat the ratio is a small difference over a small gap). "
                          "A dictionary is "
                          "worth analysing with L0 a small fraction of its width and most variance explained.")
    if mmcs:
        rows = []
        for layer, v in sorted(mmcs["layers"].items(), key=lambda kv: int(kv[0])):
            sizes = v.get("sizes") or ["", ""]
            chance, init, firing = v.get("chance") or {}, v.get("init") or {}, v.get("firing") or {}

            def with_chance(method):
                c = chance.get(method)
                return "n/a" if not c else f"{c['mean']:.3f} ± {c['std']:.3f}"

            rows.append([layer, sizes[0], sizes[1], _fmt(v.get("max")), _fmt(v.get("hungarian")), with_chance("max"),
                         with_chance("hungarian"), _fmt(init.get("max")),
                         f"{firing.get('small', 'n/a')} / {firing.get('large', 'n/a')}"])
        defs = mmcs.get("definitions", {})
        doc.table(["layer", "small dictionary", "large dictionary", "MMCS (max, eq. 2)",
                   "MMCS (one-to-one Hungarian, authors' code)", "max: chance (random dictionaries)",
                   "Hungarian: chance", "max: SAEs at initialisation", "firing features (small / large)"], rows,
                  caption=(f"Dictionary sizes in features. max: {defs['max']}. Hungarian: {defs['hungarian']}. "
                           "Chance: mean ± standard deviation of the MMCS of pairs of random unit-vector dictionaries "
                           "of the same shapes; an MMCS near it says the two dictionaries share nothing beyond what "
                           "random directions share. Shared features are chosen among features that fire on held-out "
                           "tokens." if "max" in defs and "hungarian" in defs else "Dictionary sizes in features"))
    else:
        doc.para("Not run.")
    curves = _sae_curves(cfg)
    if curves:
        doc.image(_plot(plots / "sae_loss.png", _draw_sae_curves(curves), (WIDE, 3.2)),
                  "SAE training curves, one line per layer and dictionary size: reconstruction MSE, MSE normalised "
                  "by the activations' variance, and L0 (features active per input), on the training batches of "
                  "the logged steps; dots are the validation rows at the end of each epoch.")



def _ce_gap_text(m: dict) -> str:
    from irm.findings import ce_gaps

    gaps = ce_gaps(m)
    return "n/a" if gaps is None else f"{gaps[0]:+.3f}; {gaps[1]:+.3f}"


def features_section(doc: "Doc", cfg: RunConfig, root: Path, plots: Path) -> None:
    """Tables 2, 8, 9: the shared features' explanations, labels, detection and fuzzing scores; a page per shared
    feature."""
    from irm.explain.stage import NOT_EXPLAINED

    pages = _load(root, "explanations") or []
    # Related features first, then by layer, dictionary and how well the feature is matched in the other dictionary.
    pages = sorted(pages, key=lambda f: (f.get("label") != 1, f.get("status") == NOT_EXPLAINED, f.get("layer", 0),
                                         f.get("dictionary", ""), -((f.get("pair") or {}).get("cosine") or 0.0)))
    feats = [f for f in pages if f.get("status") != NOT_EXPLAINED]
    doc.heading("Shared features, their descriptions and reward labels (paper tables 2, 8, 9)")
    if feats:
        methods = sorted({f["label_method"] for f in feats if f.get("label_method")})
        doc.table(
            ["layer", "dictionary", "feature", "explanation", "related to reward", "detection score",
             "fuzzing score"],
            [[f.get("layer"), f.get("dictionary"), f.get("index"),
              f.get("explanation") or (f"[{f.get('status', 'unparsed')}] {f.get('rejected_explanation') or ''}"
                                       .strip()),
              {1: "yes", 0: "no"}.get(f.get("label"), f.get("status") or "unparsed"), _score(f), _score(f, "fuzz")]
             for f in feats],
            caption=f"explainer: {feats[0].get('backend')} / {feats[0].get('model')}; labels: "
                    f"{'; '.join(methods) or 'n/a'}; detection score: accuracy of the explainer predicting from the "
                    "explanation which texts activate the feature; fuzzing score: accuracy of telling windows with "
                    "the firing tokens highlighted from the same windows with random tokens highlighted; 'at chance': "
                    "the 95% Clopper-Pearson interval over the feature's texts holds 0.5",
        )
        scores = _load(root, "explain_scores") or {}
        means = [(name, s) for name, s in (("detection", scores), ("fuzzing", scores.get("fuzz") or {}))
                 if (s.get("mean") or {}).get("accuracy") is not None]
        if means:
            doc.para("Mean accuracy over the features scored: " + "; ".join(
                f"{name} {_fmt(s['mean']['accuracy'])} {_ci({'ci95': s.get('accuracy_ci95')})} over "
                f"{s.get('n_scored')} features ({s.get('n_at_chance')} at chance)"
                + (", at chance (the t interval over features holds 0.5)" if s.get("at_chance") else "")
                for name, s in means) + ".")
        statuses = {}
        for f in feats:
            statuses[f.get("status", "ok")] = statuses.get(f.get("status", "ok"), 0) + 1
        unusable = {k: v for k, v in statuses.items() if k != "ok"}
        if unusable:
            doc.para("Not explained (never labelled related): "
                     + "; ".join(f"{n} {k}" for k, n in sorted(unusable.items())) + ".")
    if len(pages) > len(feats):
        doc.para(f"{len(pages) - len(feats)} more features of the shared pairs have a page below but no explanation "
                 "(beyond explain.max_features).")
    if pages:
        dashboard_section(doc, pages)
    else:
        doc.para("Not run.")


def lexicon_section(doc: "Doc", cfg: RunConfig, root: Path, plots: Path) -> None:
    """Tables 3, 10: the reconstructed lexicon (a sample and a scatter plot)."""
    lex_rows = _load(root, "lexicon") or []
    kendall = _load(root, "kendall")
    doc.heading("Reconstructed lexicon (paper tables 3, 10)")
    if lex_rows:
        step = max(1, len(lex_rows) // cfg.lexicon.sample_size)
        sample = sorted(lex_rows[::step][: cfg.lexicon.sample_size], key=lambda r: float(r["true"]))
        bound = (kendall or {}).get("mapping", {}).get("bound")

        def scatter(fig) -> None:
            ax = fig.add_subplot()
            for held, colour, label in (("0", "tab:blue", "not held out"), ("1", "tab:orange", "held out")):
                pts = [(float(r["true"]), float(r["reconstructed"])) for r in lex_rows if r["heldout"] == held]
                if pts:
                    ax.scatter(*zip(*pts), s=6, alpha=0.6, c=colour, label=label)
            lo, hi = ax.get_xlim()
            ax.plot([lo, hi], [lo, hi], color="0.4", ls="--", lw=0.8, label="reconstructed = true")
            ax.set_xlim(lo, hi)
            ax.set_xlabel("true VADER value", fontsize=9)
            ax.set_ylabel("reconstructed value", fontsize=9)
            ax.tick_params(labelsize=7)
            fig.legend(loc="outside upper center", ncols=3, fontsize=7, frameon=False)

        with doc.side_by_side():
            doc.image(_plot(plots / "lexicon_scatter.png", scatter, (4.6, 4.4)),
                      f"Reconstructed vs true lexicon value, one dot per word ({len(lex_rows)} words)"
                      + (f"; reconstructed values are clipped to [-{bound:g}, {bound:g}]." if bound else "."))
            doc.table(["word", "true value", "reconstructed", "held out"],
                      [[r["word"], r["true"], _fmt(float(r["reconstructed"])), "yes" if r["heldout"] == "1" else ""]
                       for r in sample], caption=f"{len(sample)} words spread over the lexicon")
    else:
        doc.para("Not run.")


def kendall_section(doc: "Doc", cfg: RunConfig, root: Path, plots: Path) -> None:
    """Tables 4, 11: Kendall tau of the reconstructed vs the true lexicon."""
    kendall = _load(root, "kendall")
    doc.heading("Kendall tau, reconstructed vs true lexicon (paper tables 4, 11)")
    if kendall:
        if kendall.get("reference"):
            doc.para(f"Reference (the true values): {kendall['reference']}.")
        doc.table(["words", "n", "tau", "p-value", "bootstrap 95% CI"],
                  [[KENDALL_LABELS[k], kendall[k].get("n"), _fmt(kendall[k].get("tau")), _p(kendall[k].get("p")),
                    _ci(kendall[k])] for k in KENDALL_LABELS if k in kendall])
        if "sign_agreement" in kendall:
            held = kendall.get("sign_agreement_heldout")
            doc.para(f"Sign agreement: {_fmt(kendall['sign_agreement'])}"
                     + (f" (held out: {_fmt(held)})" if held is not None else "")
                     + ". Only the held-out row measures generalisation: R never saw those words.")
    else:
        doc.para("Not run.")


def base_control_section(doc: "Doc", cfg: RunConfig, root: Path, plots: Path) -> None:
    """The base-model control and its nulls (irm.control)."""
    control_section(doc, root, plots)


def validation_section(doc: "Doc", cfg: RunConfig, root: Path, plots: Path) -> None:
    """Table 6: the labelled features where R predicts a large delta, against the other explained features."""
    val = _load(root, "validation")
    doc.heading("Validation: labelled features where R predicts a large delta (paper table 6)")
    if val:
        vs = val.get("vs_other_explained") or {}
        if vs:
            doc.table(["inputs", "related features", "other explained features", "related frequency",
                       "other explained frequency", "lift (ratio)", "permutation p (one-sided)"],
                      [[k, v.get("n_related"), v.get("n_other"), v.get("related_frequency"),
                        v.get("other_frequency"), v.get("lift"), _p(v.get("p_value"))] for k, v in vs.items()],
                      caption="The control: the other explained features of the same layers (explained, labelled "
                              "0), not every feature (dead ones included). p: "
                              + (next(iter(vs.values())).get("test") or ""))
        shown = {k: _features(v) if k == "related" else v for k, v in val.items()
                 if k not in ("per_layer", "vs_other_explained", "other")}
        doc.table(["quantity", "value"], [[VALIDATION_LABELS.get(k, k), v] for k, v in shown.items()])
        per_layer = val.get("per_layer") or {}
        if per_layer:
            related = val.get("related") or {}
            doc.table(["layer", "related features", "related frequency", "average frequency"],
                      [[layer, related.get(layer, ""), v.get("related_frequency"), v.get("average_frequency")]
                       for layer, v in per_layer.items()],
                      caption="Per layer, inputs above the threshold")
    else:
        doc.para("Not run.")



def ablation_section(doc: "Doc", cfg: RunConfig, root: Path, plots: Path) -> None:
    """Table 5: reward after ablating the labelled features, paired against its controls."""
    abl = _load(root, "ablation")
    doc.heading("Ablating the reward-related features (paper table 5, with controls)")
    if abl:
        heads = []
        for mode, conds in abl.get("modes", {}).items():
            for key, text in (("ablated_minus_splice", "ablated - splice only"),
                              ("ablated_minus_random", "ablated - frequency-matched random features")):
                d = conds.get(key)
                if d:
                    heads.append([f"{ABLATION_MODES.get(mode, mode)}: {text}", f"{d['mean']:+.3f}", _ci(d),
                                  _p(d.get("p_value")) if key == "ablated_minus_splice" else
                                  f"between-draw sd {_fmt(d.get('between_draw_std'))}", d.get("interval", "")])
        if heads:
            doc.table(["paired difference, same prompts", "mean reward difference", "95% CI", "p / spread",
                       "interval"], heads,
                      caption="The headline: negative means ablating the labelled features lowers the reward more "
                              "than the control. " + (abl.get("random_control") or ""))
        rows = [["tuned model, no splice (before)", _fmt(abl["before"]["mean"]), _ci(abl["before"]), ""]]
        for mode, conds in abl.get("modes", {}).items():
            for cond, text in ABLATION_CONDITIONS.items():
                if cond in conds:
                    d = conds[cond].get("diff_vs_before")
                    rows.append([f"{ABLATION_MODES.get(mode, mode)}: {text}", _fmt(conds[cond]["mean"]),
                                 _ci(conds[cond]), f"{d['mean']:+.3f} {_ci(d)}" if d else ""])
        doc.table(["condition", "mean reward", "95% CI", "minus before, same prompts (95% CI)"], rows,
                  caption=f"{abl.get('n_features')} features ablated ({_features(abl.get('features') or {})}) over "
                          f"{abl.get('n_prompts')} prompts; random: {abl.get('random_draws')} draws")
        doc.image(_plot(plots / "ablation.png", _draw_ablation(abl["before"], abl.get("modes", {})), (WIDE, 3.6)),
                  "Mean reward per condition with 95% intervals; the dashed line is the unspliced model's mean. "
                  "The reconstruction splice replaces the layer output by the SAE's reconstruction (the paper's "
                  "ablation); the other keeps the SAE's error term, so only the ablated features are removed.")
    else:
        doc.para("Not run.")



def configuration_section(doc: "Doc", cfg: RunConfig, root: Path, plots: Path) -> None:
    """The run's config and the package versions."""
    doc.heading("Configuration")
    cfg_text = (root / CONFIG_YAML).read_text(encoding="utf-8") if (root / CONFIG_YAML).exists() else ""
    doc.code(cfg_text, f"config.yaml of this run ({len(cfg_text.splitlines())} lines; click to show)")
    doc.heading("Versions")
    doc.table(["package", "version"], [[k, v] for k, v in _versions().items()])



# The report's sections after the findings, in order: one function per paper table or figure.
SECTIONS = (reward_section, divergence_section, dictionaries_section, features_section, lexicon_section,
            kendall_section, base_control_section, validation_section, ablation_section, diff_section,
            configuration_section)


def run(cfg: RunConfig) -> dict:
    root = Path(cfg.run_dir)
    plots = artifact(root, "plots")
    plots.mkdir(parents=True, exist_ok=True)
    summary = build_summary(root)
    doc = Doc()
    doc.heading(f"irm report: {cfg.model.name}", 1)
    doc.para(
        f"Run directory {root}; reward: {cfg.reward.kind}; explainer backend: {cfg.explain.backend}"
        + (" (offline: deterministic token summaries, not an LLM)" if cfg.explain.backend == "offline" else "")
        + f"; generated {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}."
    )
    findings_section(doc, root, summary)
    for section in SECTIONS:
        section(doc, cfg, root, plots)
    outputs = {key: artifact(root, key) for key in ("summary", "report_md", "report_html")}
    write_json(outputs["summary"], summary)
    write_text(outputs["report_md"], "\n".join(doc.md))
    write_text(outputs["report_html"], doc.page(cfg.model.name))
    mark_done(cfg, "report", [*outputs.values(), plots])
    print(f"report: {outputs['report_html']}")
    return summary


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("irm", "torch", "transformers", "trl", "lightning", "datasets", "spacy", "vaderSentiment", "scipy"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def _html_page(title: str, body: str) -> str:
    style = (
        "body{font-family:system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem;color:#222;"
        "line-height:1.4}"
        "h2{margin-top:2.2rem;border-bottom:1px solid #ddd;padding-bottom:.2rem}"
        "nav ol{columns:2;font-size:.9rem;margin:.5rem 0 1rem}nav a{color:#2a5db0;text-decoration:none}"
        "table{border-collapse:collapse;margin:1rem 0;font-size:.85rem}"
        "th,td{border:1px solid #ccc;padding:.25rem .55rem;text-align:left;vertical-align:top}"
        "td{font-variant-numeric:tabular-nums}td.n{white-space:nowrap}tbody tr:nth-child(even){background:#fafafa}"
        "th{background:#f0f0f0}caption{caption-side:top;text-align:left;font-style:italic;padding:.3rem 0;"
        "color:#444}"
        "img{max-width:100%}figure{margin:1rem 0}figcaption{font-size:.85rem;color:#555;max-width:44rem}"
        ".row{display:flex;gap:1.5rem;align-items:flex-start;flex-wrap:wrap}"
        ".row figure{width:min-content}.row img{max-width:none}"
        "details summary{cursor:pointer;color:#2a5db0}"
        "pre{background:#f7f7f7;padding:1rem;overflow:auto;font-size:.8rem}h1{font-size:1.6rem}"
    )
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>irm report: {html.escape(title)}</title>"
            f"<style>{style}</style></head><body>{body}</body></html>\n")
