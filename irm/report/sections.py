"""The report's sections for the paper's tables and figures, one function each, in the report's order; each adds
its blocks to the Doc (irm.report.doc) from the run's artifacts."""

from __future__ import annotations

import platform
from pathlib import Path

from irm.config import RunConfig
from irm.report.claims import control_section
from irm.report.doc import Doc
from irm.report.plots import (NARROW, WIDE, draw_ablation, draw_divergence, draw_lexicon, draw_sae_curves, figure,
                              sae_curves)
from irm.report.text import (ABLATION_CONDITIONS, ABLATION_MODES, KENDALL_LABELS, VALIDATION_LABELS, ci, features,
                             fmt, load, pval)
from irm.stages import CONFIG_YAML


def reward_section(doc: Doc, cfg: RunConfig, root: Path, plots: Path) -> None:
    """Table 7: reward before and after RLHF, the paired difference, example completions."""
    reward = doc.section("Reward before and after PPO (paper table 7)", load(root, "reward_eval"))
    if not reward:
        return
    rows = [["base", fmt(reward["base"]["mean"]), ci(reward["base"]), reward["base"].get("n"), ""],
            ["tuned", fmt(reward["tuned"]["mean"]), ci(reward["tuned"]), reward["tuned"].get("n"), ""]]
    diff = reward.get("difference")
    if diff:
        rows.append(["tuned - base (paired: same prefixes)", fmt(diff["mean"]), ci(diff), diff.get("n"),
                     pval(diff.get("p_value"))])
    doc.table(["model", "mean reward", "95% CI", "n", "p-value (paired t-test)"], rows,
              caption=f"{reward.get('new_tokens')} new tokens after {reward.get('prefix_tokens')}-token "
                      "held-out prefixes")
    examples = reward.get("examples") or []
    if examples:
        doc.table(["held-out prefix", "base completion", "reward", "tuned completion", "reward"],
                  [[e["prefix"], e["base"], e["base_reward"], e["tuned"], e["tuned_reward"]] for e in examples],
                  caption="Example completions")


def divergence_section(doc: Doc, cfg: RunConfig, root: Path, plots: Path) -> None:
    """Figure 4: each layer's parameter distance, the chosen layers."""
    div = load(root, "divergence")
    if not doc.section("Layer divergence (paper figure 4)", div and div.get("values")):
        return
    values = div["values"]
    mean = sum(values) / len(values)
    spread = (max(values) - min(values)) / mean if mean else 0.0
    with doc.side_by_side():
        doc.image(figure(plots / "layer_divergence.png", draw_divergence(div), (NARROW, 4.6)),
                  f"Divergence of each layer's parameters, base vs tuned ({div.get('measure', 'per layer')}). "
                  f"The axis is fitted to the data: the layers differ by at most {100 * spread:.1f}% of the "
                  f"mean. The {len(div['top_k'])} largest (red) are the layers the SAEs are trained on.")
        doc.table(["layer", "divergence", "chosen"],
                  [[i, fmt(v, 4), "yes" if i in div["top_k"] else ""] for i, v in enumerate(values)])


def dictionaries_section(doc: Doc, cfg: RunConfig, root: Path, plots: Path) -> None:
    """Table 1: SAE quality on held-out data, MMCS beside its chance level, training curves."""
    mmcs = load(root, "mmcs")
    doc.heading("Dictionaries and their overlap (paper table 1, eq. 2)")
    sae_metrics = load(root, "sae_metrics")
    if sae_metrics and sae_metrics.get("layers"):
        _sae_quality_table(doc, sae_metrics)
    if mmcs:
        _mmcs_table(doc, mmcs)
    else:
        doc.para("Not run.")
    curves = sae_curves(cfg)
    if curves:
        doc.image(figure(plots / "sae_loss.png", draw_sae_curves(curves), (WIDE, 3.2)),
                  "SAE training curves, one line per layer and dictionary size: reconstruction MSE, MSE normalised "
                  "by the activations' variance, and L0 (features active per input), on the training batches of "
                  "the logged steps; dots are the validation rows at the end of each epoch.")


def _sae_quality_table(doc: Doc, sae_metrics: dict) -> None:
    """Each SAE's held-out quality (sae/metrics.json)."""
    st = sae_metrics.get("settings", {})
    arch = (f"TopK (k = {st.get('k')})" if st.get("activation") == "topk"
            else f"ReLU + L1 (alpha = {st.get('l1_coefficient')})")
    rows = []
    for layer, rec in sorted(sae_metrics["layers"].items(), key=lambda kv: int(kv[0])):
        for name, m in sorted(rec.items(), key=lambda kv: int(kv[0][1:])):
            l0, frac = m.get("l0"), m.get("l0_fraction")
            rows.append([layer, name, m.get("width"),
                         "n/a" if l0 is None else f"{l0:.1f} ({100 * frac:.1f}%)",
                         fmt(m.get("explained_variance")), fmt(m.get("explained_variance_after_first")),
                         "n/a" if m.get("dead_fraction") is None else f"{100 * m['dead_fraction']:.1f}%"
                         + ("" if m.get("dead_fraction_all_tokens") is None
                            else f" ({100 * m['dead_fraction_all_tokens']:.1f}%)"),
                         fmt(m.get("ce_loss_recovered")), _ce_gap_text(m)])
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


def _mmcs_table(doc: Doc, mmcs: dict) -> None:
    """MMCS per layer (mmcs.json) beside its chance level and the SAEs at initialisation."""
    rows = []
    for layer, v in sorted(mmcs["layers"].items(), key=lambda kv: int(kv[0])):
        sizes = v.get("sizes") or ["", ""]
        chance, init, firing = v.get("chance") or {}, v.get("init") or {}, v.get("firing") or {}

        def with_chance(method):
            c = chance.get(method)
            return "n/a" if not c else f"{c['mean']:.3f} ± {c['std']:.3f}"

        rows.append([layer, sizes[0], sizes[1], fmt(v.get("max")), fmt(v.get("hungarian")), with_chance("max"),
                     with_chance("hungarian"), fmt(init.get("max")),
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


def _ce_gap_text(m: dict) -> str:
    from irm.findings import ce_gaps

    gaps = ce_gaps(m)
    return "n/a" if gaps is None else f"{gaps[0]:+.3f}; {gaps[1]:+.3f}"


def lexicon_section(doc: Doc, cfg: RunConfig, root: Path, plots: Path) -> None:
    """Tables 3, 10: the reconstructed lexicon (a sample and a scatter plot)."""
    lex_rows = doc.section("Reconstructed lexicon (paper tables 3, 10)", load(root, "lexicon"))
    if not lex_rows:
        return
    kendall = load(root, "kendall")
    step = max(1, len(lex_rows) // cfg.lexicon.sample_size)
    sample = sorted(lex_rows[::step][: cfg.lexicon.sample_size], key=lambda r: float(r["true"]))
    bound = (kendall or {}).get("mapping", {}).get("bound")
    with doc.side_by_side():
        doc.image(figure(plots / "lexicon_scatter.png", draw_lexicon(lex_rows), (4.6, 4.4)),
                  f"Reconstructed vs true lexicon value, one dot per word ({len(lex_rows)} words)"
                  + (f"; reconstructed values are clipped to [-{bound:g}, {bound:g}]." if bound else "."))
        doc.table(["word", "true value", "reconstructed", "held out"],
                  [[r["word"], r["true"], fmt(float(r["reconstructed"])), "yes" if r["heldout"] == "1" else ""]
                   for r in sample], caption=f"{len(sample)} words spread over the lexicon")


def kendall_section(doc: Doc, cfg: RunConfig, root: Path, plots: Path) -> None:
    """Tables 4, 11: Kendall tau of the reconstructed vs the true lexicon."""
    kendall = doc.section("Kendall tau, reconstructed vs true lexicon (paper tables 4, 11)", load(root, "kendall"))
    if not kendall:
        return
    if kendall.get("reference"):
        doc.para(f"Reference (the true values): {kendall['reference']}.")
    doc.table(["words", "n", "tau", "p-value", "bootstrap 95% CI"],
              [[KENDALL_LABELS[k], kendall[k].get("n"), fmt(kendall[k].get("tau")), pval(kendall[k].get("p")),
                ci(kendall[k])] for k in KENDALL_LABELS if k in kendall])
    if "sign_agreement" in kendall:
        held = kendall.get("sign_agreement_heldout")
        doc.para(f"Sign agreement: {fmt(kendall['sign_agreement'])}"
                 + (f" (held out: {fmt(held)})" if held is not None else "")
                 + ". Only the held-out row measures generalisation: R never saw those words.")


def base_control_section(doc: Doc, cfg: RunConfig, root: Path, plots: Path) -> None:
    """The base-model control and its nulls (irm.stages.control)."""
    control_section(doc, root, plots)


def validation_section(doc: Doc, cfg: RunConfig, root: Path, plots: Path) -> None:
    """Table 6: the labelled features where R predicts a large delta, against the other explained features."""
    val = doc.section("Validation: labelled features where R predicts a large delta (paper table 6)",
                      load(root, "validation"))
    if not val:
        return
    vs = val.get("vs_other_explained") or {}
    if vs:
        doc.table(["inputs", "related features", "other explained features", "related frequency",
                   "other explained frequency", "lift (ratio)", "permutation p (one-sided)"],
                  [[k, v.get("n_related"), v.get("n_other"), v.get("related_frequency"),
                    v.get("other_frequency"), v.get("lift"), pval(v.get("p_value"))] for k, v in vs.items()],
                  caption="The control: the other explained features of the same layers (explained, labelled "
                          "0), not every feature (dead ones included). p: "
                          + (next(iter(vs.values())).get("test") or ""))
    shown = {k: features(v) if k == "related" else v for k, v in val.items()
             if k not in ("per_layer", "vs_other_explained", "other")}
    doc.table(["quantity", "value"], [[VALIDATION_LABELS.get(k, k), v] for k, v in shown.items()])
    per_layer = val.get("per_layer") or {}
    if per_layer:
        related = val.get("related") or {}
        doc.table(["layer", "related features", "related frequency", "average frequency"],
                  [[layer, related.get(layer, ""), v.get("related_frequency"), v.get("average_frequency")]
                   for layer, v in per_layer.items()],
                  caption="Per layer, inputs above the threshold")


def ablation_section(doc: Doc, cfg: RunConfig, root: Path, plots: Path) -> None:
    """Table 5: reward after ablating the labelled features, paired against its controls."""
    abl = doc.section("Ablating the reward-related features (paper table 5, with controls)", load(root, "ablation"))
    if not abl:
        return
    heads = []
    for mode, conds in abl.get("modes", {}).items():
        for key, text in (("ablated_minus_splice", "ablated - splice only"),
                          ("ablated_minus_random", "ablated - frequency-matched random features")):
            d = conds.get(key)
            if d:
                heads.append([f"{ABLATION_MODES.get(mode, mode)}: {text}", f"{d['mean']:+.3f}", ci(d),
                              pval(d.get("p_value")) if key == "ablated_minus_splice" else
                              f"between-draw sd {fmt(d.get('between_draw_std'))}", d.get("interval", "")])
    if heads:
        doc.table(["paired difference, same prompts", "mean reward difference", "95% CI", "p / spread",
                   "interval"], heads,
                  caption="The headline: negative means ablating the labelled features lowers the reward more "
                          "than the control. " + (abl.get("random_control") or ""))
    rows = [["tuned model, no splice (before)", fmt(abl["before"]["mean"]), ci(abl["before"]), ""]]
    for mode, conds in abl.get("modes", {}).items():
        for cond, text in ABLATION_CONDITIONS.items():
            if cond in conds:
                d = conds[cond].get("diff_vs_before")
                rows.append([f"{ABLATION_MODES.get(mode, mode)}: {text}", fmt(conds[cond]["mean"]),
                             ci(conds[cond]), f"{d['mean']:+.3f} {ci(d)}" if d else ""])
    doc.table(["condition", "mean reward", "95% CI", "minus before, same prompts (95% CI)"], rows,
              caption=f"{abl.get('n_features')} features ablated ({features(abl.get('features') or {})}) over "
                      f"{abl.get('n_prompts')} prompts; random: {abl.get('random_draws')} draws")
    doc.image(figure(plots / "ablation.png", draw_ablation(abl["before"], abl.get("modes", {})), (WIDE, 3.6)),
              "Mean reward per condition with 95% intervals; the dashed line is the unspliced model's mean. "
              "The reconstruction splice replaces the layer output by the SAE's reconstruction (the paper's "
              "ablation); the other keeps the SAE's error term, so only the ablated features are removed.")


def configuration_section(doc: Doc, cfg: RunConfig, root: Path, plots: Path) -> None:
    """The run's config and the package versions."""
    doc.heading("Configuration")
    cfg_text = (root / CONFIG_YAML).read_text(encoding="utf-8") if (root / CONFIG_YAML).exists() else ""
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
