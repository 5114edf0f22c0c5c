"""`python -m irm report`: every table and plot of the paper, filled from one run directory, as report.md, a
self-contained report.html (plots inlined), and summary.json (the headline numbers, machine-readable)."""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import platform
import time
from pathlib import Path
from typing import Any, Optional

from irm.artifacts import read_jsonl, write_json, write_text
from irm.config import RunConfig
from irm.stages import mark_done

PLOTS = "plots"


def _load(root: Path, name: str) -> Optional[Any]:
    p = root / name
    return json.loads(p.read_text(encoding="utf-8")) if p.exists() else None


def _fmt(x: Any, digits: int = 3) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, float):
        return f"{x:.{digits}g}" if abs(x) < 1e-3 and x != 0 else f"{x:.{digits}f}"
    return str(x)


def _ci(d: Optional[dict]) -> str:
    if not d or d.get("ci95") is None:
        return "n/a"
    lo, hi = d["ci95"]
    return f"[{_fmt(lo)}, {_fmt(hi)}]"


class Doc:
    """Builds the Markdown and the HTML of the report side by side from the same calls."""

    def __init__(self) -> None:
        self.md: list[str] = []
        self.html: list[str] = []

    def heading(self, text: str, level: int = 2) -> None:
        self.md.append(f"{'#' * level} {text}\n")
        self.html.append(f"<h{level}>{html.escape(text)}</h{level}>")

    def para(self, text: str) -> None:
        self.md.append(text + "\n")
        self.html.append(f"<p>{html.escape(text)}</p>")

    def table(self, header: list[str], rows: list[list[Any]], caption: str = "") -> None:
        if caption:
            self.md.append(f"*{caption}*\n")
        self.md.append("| " + " | ".join(header) + " |")
        self.md.append("|" + "---|" * len(header))
        for r in rows:
            self.md.append("| " + " | ".join(str(c).replace("|", "\\|").replace("\n", " ") for c in r) + " |")
        self.md.append("")
        cap = f"<caption>{html.escape(caption)}</caption>" if caption else ""
        head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
        self.html.append(f"<table>{cap}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")

    def image(self, png: Path, alt: str) -> None:
        self.md.append(f"![{alt}]({png.parent.name}/{png.name})\n")
        data = base64.b64encode(png.read_bytes()).decode()
        self.html.append(f'<figure><img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'
                         f"<figcaption>{html.escape(alt)}</figcaption></figure>")

    def code(self, text: str) -> None:
        self.md.append("```yaml\n" + text.rstrip() + "\n```\n")
        self.html.append(f"<pre>{html.escape(text)}</pre>")


def _plot(path: Path, draw) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from irm.artifacts import atomic_path

    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=110)
    draw(ax)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path


def _sae_curves(cfg: RunConfig) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """Training curves of every SAE read back from its TensorBoard event files: {run: {tag: [(step, value)]}}."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    root = Path(cfg.log_dir) / Path(cfg.run_dir).name / "sae"
    curves: dict[str, dict[str, list[tuple[int, float]]]] = {}
    for events in sorted(root.rglob("events.out.tfevents.*")) if root.exists() else []:
        acc = EventAccumulator(str(events.parent), size_guidance={"scalars": 0})
        acc.Reload()
        name = str(events.parent.relative_to(root))
        for tag in acc.Tags().get("scalars", []):
            if "mse" in tag.lower() and "train" in tag.lower():
                curves.setdefault(name, {})[tag] = [(e.step, e.value) for e in acc.Scalars(tag)]
    return curves


def build_summary(root: Path) -> dict:
    reward = _load(root, "reward_eval.json") or {}
    kendall = _load(root, "kendall.json") or {}
    mmcs = _load(root, "mmcs.json") or {}
    ablation = _load(root, "ablation.json") or {}
    validation = _load(root, "validation.json") or {}
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
        "mmcs": {layer: {"max": v.get("max"), "hungarian": v.get("hungarian")}
                 for layer, v in mmcs.get("layers", {}).items()},
        "ablation": {
            "before": ablation.get("before", {}).get("mean"),
            "after": ablation.get("after", {}).get("mean"),
            "n_features": ablation.get("n_features"),
        },
        "validation": {k: validation.get(k) for k in ("related_frequency", "average_frequency", "n_inputs_above")},
    }


def run(cfg: RunConfig) -> dict:
    root = Path(cfg.run_dir)
    plots = root / PLOTS
    plots.mkdir(parents=True, exist_ok=True)
    summary = build_summary(root)
    doc = Doc()
    doc.heading(f"irm report: {cfg.model.name}", 1)
    doc.para(
        f"Run directory {root}; reward: {cfg.reward.kind}; explainer backend: {cfg.explain.backend}"
        + (" (offline: deterministic token summaries, not an LLM)" if cfg.explain.backend == "offline" else "")
        + f"; generated {time.strftime('%Y-%m-%d %H:%M:%S')}."
    )

    # Table 7: reward before and after RLHF.
    reward = _load(root, "reward_eval.json")
    doc.heading("Reward before and after PPO (paper table 7)")
    if reward:
        doc.table(
            ["model", "mean reward", "95% CI", "n"],
            [["base", _fmt(reward["base"]["mean"]), _ci(reward["base"]), reward["base"].get("n")],
             ["tuned", _fmt(reward["tuned"]["mean"]), _ci(reward["tuned"]), reward["tuned"].get("n")]],
            caption=f"{reward.get('new_tokens')} new tokens after {reward.get('prefix_tokens')}-token held-out prefixes",
        )
    else:
        doc.para("Not run.")

    # Figure 4: layer divergence.
    div = _load(root, "divergence.json")
    doc.heading("Layer divergence (paper figure 4)")
    if div:
        doc.table(["layer", "divergence", "chosen"],
                  [[i, _fmt(v, 4), "yes" if i in div["top_k"] else ""] for i, v in enumerate(div["values"])])
        if (root / "divergence.png").exists():
            doc.image(root / "divergence.png", "Per-layer parameter divergence, base vs tuned")
    else:
        doc.para("Not run.")

    # Table 1: dictionaries and MMCS.
    mmcs = _load(root, "mmcs.json")
    doc.heading("Dictionaries and their overlap (paper table 1, eq. 2)")
    if mmcs:
        rows = []
        for layer, v in sorted(mmcs["layers"].items(), key=lambda kv: int(kv[0])):
            rows.append([layer, v.get("sizes", ["", ""])[0] if v.get("sizes") else "",
                         v.get("sizes", ["", ""])[1] if v.get("sizes") else "",
                         _fmt(v.get("max")), _fmt(v.get("hungarian"))])
        doc.table(["layer", "small dictionary", "large dictionary", "MMCS (max, eq. 2)",
                   "MMCS (one-to-one Hungarian, authors' code)"], rows)
    else:
        doc.para("Not run.")
    curves = _sae_curves(cfg)
    if curves:
        def draw(ax):
            for name, tags in curves.items():
                for tag, pts in tags.items():
                    ax.plot([s for s, _ in pts], [v for _, v in pts], label=f"{name} {tag}", lw=1)
            ax.set_xlabel("step")
            ax.set_ylabel("reconstruction MSE")
            ax.set_yscale("log")
            ax.legend(fontsize=6)
        doc.image(_plot(plots / "sae_loss.png", draw), "SAE training reconstruction loss")

    # Tables 2, 8, 9: feature descriptions.
    feats = read_jsonl(root / "explanations.jsonl")
    doc.heading("Shared features, their descriptions and reward labels (paper tables 2, 8, 9)")
    if feats:
        doc.table(
            ["layer", "dictionary", "feature", "explanation", "related to reward", "detection score"],
            [[f.get("layer"), f.get("dictionary"), f.get("index"), f.get("explanation"),
              {1: "yes", 0: "no"}.get(f.get("label"), "unparsed"), _fmt(f.get("score", {}).get("accuracy")
                                                                       if isinstance(f.get("score"), dict) else None)]
             for f in feats],
            caption=f"explainer: {feats[0].get('backend')} / {feats[0].get('model')}",
        )
    else:
        doc.para("Not run.")

    # Tables 3, 10: reconstructed lexicon sample; tables 4, 11: Kendall tau.
    lex_rows = []
    if (root / "lexicon.csv").exists():
        with open(root / "lexicon.csv", encoding="utf-8") as f:
            lex_rows = list(csv.DictReader(f))
    kendall = _load(root, "kendall.json")
    doc.heading("Reconstructed lexicon (paper tables 3, 10)")
    if lex_rows:
        step = max(1, len(lex_rows) // cfg.lexicon.sample_size)
        sample = sorted(lex_rows[::step][: cfg.lexicon.sample_size], key=lambda r: float(r["true"]))
        doc.table(["word", "true value", "reconstructed", "held out"],
                  [[r["word"], r["true"], _fmt(float(r["reconstructed"])), "yes" if r["heldout"] == "1" else ""]
                   for r in sample])

        def scatter(ax):
            for held, colour, label in (("0", "tab:blue", "seen in training"), ("1", "tab:orange", "held out")):
                pts = [(float(r["true"]), float(r["reconstructed"])) for r in lex_rows if r["heldout"] == held]
                if pts:
                    ax.scatter(*zip(*pts), s=6, alpha=0.6, c=colour, label=label)
            ax.set_xlabel("true VADER value")
            ax.set_ylabel("reconstructed value")
            ax.legend(fontsize=7)
        doc.image(_plot(plots / "lexicon_scatter.png", scatter), "Reconstructed vs true lexicon values")
    else:
        doc.para("Not run.")
    doc.heading("Kendall tau, reconstructed vs true lexicon (paper tables 4, 11)")
    if kendall:
        doc.table(["words", "n", "tau", "p-value", "bootstrap 95% CI"],
                  [[k, kendall[k].get("n"), _fmt(kendall[k].get("tau")), _fmt(kendall[k].get("p")), _ci(kendall[k])]
                   for k in ("all", "negative", "heldout") if k in kendall])
        if "sign_agreement" in kendall:
            doc.para(f"Sign agreement: {_fmt(kendall['sign_agreement'])}. Only the held-out row measures "
                     "generalisation: R never saw those words.")
    else:
        doc.para("Not run.")

    # Table 6: validation.
    val = _load(root, "validation.json")
    doc.heading("Validation: labelled features where R predicts a large delta (paper table 6)")
    if val:
        doc.table(["quantity", "value"], [[k, _fmt(v) if isinstance(v, float) else json.dumps(v)]
                                          for k, v in val.items() if not isinstance(v, (list, dict)) or len(str(v)) < 80])
    else:
        doc.para("Not run.")

    # Table 5: ablation with controls.
    abl = _load(root, "ablation.json")
    doc.heading("Ablating the reward-related features (paper table 5, with controls)")
    if abl:
        rows = [["tuned model, no splice (before)", _fmt(abl["before"]["mean"]), _ci(abl["before"])]]
        bars = [("before", abl["before"])]
        for mode, conds in abl.get("modes", {}).items():
            for cond in ("splice", "ablated", "random"):
                if cond in conds:
                    rows.append([f"{mode}: {cond}", _fmt(conds[cond]["mean"]), _ci(conds[cond])])
                    bars.append((f"{mode[:5]}:{cond}", conds[cond]))
        doc.table(["condition", "mean reward", "95% CI"], rows,
                  caption=f"{abl.get('n_features')} features ablated over {abl.get('n_prompts')} prompts")

        def bar(ax):
            names = [b[0] for b in bars]
            means = [b[1]["mean"] for b in bars]
            err = [[m - (b[1].get("ci95") or [m, m])[0] for m, b in zip(means, bars)],
                   [(b[1].get("ci95") or [m, m])[1] - m for m, b in zip(means, bars)]]
            ax.bar(range(len(bars)), means, yerr=err, capsize=3, color="tab:green")
            ax.set_xticks(range(len(bars)), names, rotation=30, ha="right", fontsize=7)
            ax.set_ylabel("mean reward")
        doc.image(_plot(plots / "ablation.png", bar), "Mean reward per condition, 95% intervals")
    else:
        doc.para("Not run.")

    doc.heading("Configuration")
    cfg_text = (root / "config.yaml").read_text(encoding="utf-8") if (root / "config.yaml").exists() else ""
    doc.code(cfg_text)
    doc.heading("Versions")
    doc.table(["package", "version"], [[k, v] for k, v in _versions().items()])

    write_json(root / "summary.json", summary)
    write_text(root / "report.md", "\n".join(doc.md))
    write_text(root / "report.html", _html_page(cfg.model.name, "\n".join(doc.html)))
    mark_done(cfg, "report", ["summary.json", "report.md", "report.html", PLOTS])
    print(f"report: {root / 'report.html'}")
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
        "body{font-family:system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem;color:#222}"
        "table{border-collapse:collapse;margin:1rem 0;font-size:.9rem}"
        "th,td{border:1px solid #ccc;padding:.3rem .6rem;text-align:left;vertical-align:top}"
        "th{background:#f3f3f3}caption{caption-side:top;text-align:left;font-style:italic;padding:.3rem 0}"
        "img{max-width:100%}figure{margin:1rem 0}figcaption{font-size:.85rem;color:#555}"
        "pre{background:#f7f7f7;padding:1rem;overflow:auto;font-size:.8rem}h1{font-size:1.6rem}"
    )
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>irm report: {html.escape(title)}</title>"
            f"<style>{style}</style></head><body>{body}</body></html>\n")
