"""The report's sections for the paper's tables and figures, one function each, in the report's order; each adds
its blocks to the Doc (irm.report.doc): the tables built once for the report and summary.json (irm.report.tables),
the figures and prose from the run's artifacts."""

from __future__ import annotations

import platform

from irm.report.claims import control_section
from irm.report.doc import Doc
from irm.report.plots import (NARROW, WIDE, draw_ablation, draw_divergence, draw_lexicon, draw_sae_curves, figure,
                              sae_curves)
from irm.report.tables import ReportInputs
from irm.report.text import fmt
from irm.stages import CONFIG_YAML


def reward_section(doc: Doc, r: ReportInputs) -> None:
    """Table 7: reward before and after RLHF, the paired difference, example completions."""
    reward = doc.section("Reward before and after PPO (paper table 7)", r.tables["reward"])
    if not reward:
        return
    doc.add(reward)
    examples = reward.facts["examples"]
    if examples:
        doc.table(["held-out prefix", "base completion", "reward", "tuned completion", "reward"],
                  [[e["prefix"], e["base"], e["base_reward"], e["tuned"], e["tuned_reward"]] for e in examples],
                  caption="Example completions")


def divergence_section(doc: Doc, r: ReportInputs) -> None:
    """Figure 4: each layer's parameter distance, the chosen layers."""
    div = r.load("divergence")
    if not doc.section("Layer divergence (paper figure 4)", div and div.get("values")):
        return
    values = div["values"]
    mean = sum(values) / len(values)
    spread = (max(values) - min(values)) / mean if mean else 0.0
    with doc.side_by_side():
        doc.image(figure(r.plots / "layer_divergence.png", draw_divergence(div), (NARROW, 4.6)),
                  f"Divergence of each layer's parameters, base vs tuned ({div.get('measure', 'per layer')}). "
                  f"The axis is fitted to the data: the layers differ by at most {100 * spread:.1f}% of the "
                  f"mean. The {len(div['top_k'])} largest (red) are the layers the SAEs are trained on.")
        doc.table(["layer", "divergence", "chosen"],
                  [[i, fmt(v, 4), "yes" if i in div["top_k"] else ""] for i, v in enumerate(values)])


def dictionaries_section(doc: Doc, r: ReportInputs) -> None:
    """Table 1: SAE quality on held-out data, MMCS beside its chance level, training curves."""
    doc.heading("Dictionaries and their overlap (paper table 1, eq. 2)")
    if r.tables["sae"]:
        doc.add(r.tables["sae"])
    if r.tables["mmcs"]:
        doc.add(r.tables["mmcs"])
    else:
        doc.para("Not run.")
    curves = sae_curves(r.cfg)
    if curves:
        doc.image(figure(r.plots / "sae_loss.png", draw_sae_curves(curves), (WIDE, 3.2)),
                  "SAE training curves, one line per layer and dictionary size: reconstruction MSE, MSE normalised "
                  "by the activations' variance, and L0 (features active per input), on the training batches of "
                  "the logged steps; dots are the validation rows at the end of each epoch.")


def lexicon_section(doc: Doc, r: ReportInputs) -> None:
    """Tables 3, 10: the reconstructed lexicon (a sample and a scatter plot)."""
    lex_rows = doc.section("Reconstructed lexicon (paper tables 3, 10)", r.load("lexicon"))
    if not lex_rows:
        return
    kendall = r.load("kendall")
    cfg = r.cfg
    size = cfg.lexicon.sample_size
    sample = sorted(lex_rows[::max(1, len(lex_rows) // size)][:size], key=lambda row: float(row["true"]))
    bound = (kendall or {}).get("mapping", {}).get("bound")
    with doc.side_by_side():
        doc.image(figure(r.plots / "lexicon_scatter.png", draw_lexicon(lex_rows), (4.6, 4.4)),
                  f"Reconstructed vs true lexicon value, one dot per word ({len(lex_rows)} words)"
                  + (f"; reconstructed values are clipped to [-{bound:g}, {bound:g}]." if bound else "."))
        doc.table(["word", "true value", "reconstructed", "held out"],
                  [[w["word"], w["true"], fmt(float(w["reconstructed"])), "yes" if w["heldout"] == "1" else ""]
                   for w in sample], caption=f"{len(sample)} words spread over the lexicon")


def kendall_section(doc: Doc, r: ReportInputs) -> None:
    """Tables 4, 11: Kendall tau of the reconstructed vs the true lexicon."""
    kendall = doc.section("Kendall tau, reconstructed vs true lexicon (paper tables 4, 11)", r.tables["kendall"])
    if not kendall:
        return
    facts = kendall.facts
    if facts["reference"]:
        doc.para(f"Reference (the true values): {facts['reference']}.")
    doc.add(kendall)
    if facts["sign_agreement"] is not None:
        held = facts["sign_agreement_heldout"]
        doc.para(f"Sign agreement: {fmt(facts['sign_agreement'])}"
                 + (f" (held out: {fmt(held)})" if held is not None else "")
                 + ". Only the held-out row measures generalisation: R never saw those words.")


def base_control_section(doc: Doc, r: ReportInputs) -> None:
    """The base-model control and its nulls (irm.stages.control)."""
    control_section(doc, r)


def validation_section(doc: Doc, r: ReportInputs) -> None:
    """Table 6: the labelled features where R predicts a large delta, against the other explained features."""
    val = doc.section("Validation: labelled features where R predicts a large delta (paper table 6)",
                      r.tables["validation"])
    if not val:
        return
    if val["vs_other"].rows:
        doc.add(val["vs_other"])
    doc.add(val["quantities"])
    if val["per_layer"].rows:
        doc.add(val["per_layer"])


def ablation_section(doc: Doc, r: ReportInputs) -> None:
    """Table 5: reward after ablating the labelled features, paired against its controls."""
    abl = doc.section("Ablating the reward-related features (paper table 5, with controls)", r.tables["ablation"])
    if not abl:
        return
    if abl["paired"].rows:
        doc.add(abl["paired"])
    doc.add(abl["conditions"])
    raw = r.load("ablation")
    doc.image(figure(r.plots / "ablation.png", draw_ablation(raw["before"], raw.get("modes", {})), (WIDE, 3.6)),
              "Mean reward per condition with 95% intervals; the dashed line is the unspliced model's mean. "
              "The reconstruction splice replaces the layer output by the SAE's reconstruction (the paper's "
              "ablation); the other keeps the SAE's error term, so only the ablated features are removed.")


def configuration_section(doc: Doc, r: ReportInputs) -> None:
    """The run's config and the package versions."""
    doc.heading("Configuration")
    path = r.root / CONFIG_YAML
    cfg_text = path.read_text(encoding="utf-8") if path.exists() else ""
    doc.code(cfg_text, f"config.yaml of this run ({len(cfg_text.splitlines())} lines; click to show)")
    doc.heading("Versions")
    doc.table(["package", "version"], [[k, v] for k, v in _versions().items()])


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("irm", "torch", "transformers", "trl", "lightning", "datasets", "spacy", "vaderSentiment", "scipy"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "not installed"
    return out
