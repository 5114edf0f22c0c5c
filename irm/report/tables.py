"""The report's tables as objects: each row keeps the artifact's raw values, each column says how it shows them.
The report renders `Table.header()` / `Table.cells()`; summary.json reads the same rows' raw values (`Table.get`,
`Table.values`), so a number cannot read one way in the report and another in the summary. A column without a title
is a number the summary keeps that the table does not show; `facts` are a table's numbers the report writes in its
caption or prose.

`ReportInputs.read` reads each artifact once (`ReportInputs.load`) and builds every table the report's sections and
the summary use."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from irm.report.text import (ABLATION_CONDITIONS, ABLATION_MODES, KENDALL_LABELS, VALIDATION_LABELS, ci, features,
                             fmt, load, pval)


def _same(x: Any) -> Any:
    return x


@dataclass(frozen=True)
class Column:
    """`title`: its header (None: kept for summary.json, not shown); `key`: the row value it shows (None: the whole
    row); `show`: that value as the cell (the templates then format it with irm.report.text.cell)."""

    title: Optional[str]
    key: Optional[str]
    show: Callable[[Any], Any] = _same


@dataclass
class Table:
    columns: tuple[Column, ...]
    rows: dict[Any, dict[str, Any]]  # row key -> {column key: raw value}, in the table's order
    caption: str = ""
    facts: dict[str, Any] = field(default_factory=dict)

    def header(self) -> list[str]:
        return [c.title for c in self.columns if c.title is not None]

    def cells(self) -> list[list[Any]]:
        return [[c.show(row if c.key is None else row.get(c.key)) for c in self.columns if c.title is not None]
                for row in self.rows.values()]

    def get(self, row: Any, key: str) -> Any:
        """A raw value; None when the row or the value is absent."""
        return self.rows.get(row, {}).get(key)

    def values(self, row: Any, keys: tuple[str, ...]) -> dict[str, Any]:
        return {k: self.get(row, k) for k in keys}


def _blank_none(p: Optional[float]) -> str:
    return "" if p is None else pval(p)


def _ci95(v: Optional[list]) -> str:
    return ci({"ci95": v})


def reward_table(reward: Optional[dict]) -> Optional[Table]:
    """Table 7: the mean reward of base and tuned completions and their paired difference."""
    if not reward:
        return None
    rows = {label: {"label": label, "mean": reward[label]["mean"], "ci95": reward[label].get("ci95"),
                    "n": reward[label].get("n")} for label in ("base", "tuned") if label in reward}
    diff = reward.get("difference")
    if diff:
        rows["difference"] = {"label": "tuned - base (paired: same prefixes)", "mean": diff["mean"],
                              "ci95": diff.get("ci95"), "n": diff.get("n"), "p": diff.get("p_value")}
    return Table((Column("model", "label"), Column("mean reward", "mean", fmt), Column("95% CI", "ci95", _ci95),
                  Column("n", "n"), Column("p-value (paired t-test)", "p", _blank_none)), rows,
                 caption=f"{reward.get('new_tokens')} new tokens after {reward.get('prefix_tokens')}-token "
                         "held-out prefixes", facts={"examples": reward.get("examples") or []})


def kendall_table(kendall: Optional[dict]) -> Optional[Table]:
    """Tables 4, 11: Kendall tau of the reconstructed vs the true lexicon, per group of words."""
    if not kendall:
        return None
    rows = {k: {"label": label, **{f: kendall[k].get(f) for f in ("n", "tau", "p", "ci95")}}
            for k, label in KENDALL_LABELS.items() if k in kendall}
    return Table((Column("words", "label"), Column("n", "n"), Column("tau", "tau", fmt), Column("p-value", "p", pval),
                  Column("bootstrap 95% CI", "ci95", _ci95)), rows,
                 facts={k: kendall.get(k) for k in ("reference", "sign_agreement", "sign_agreement_heldout")})


def _with_chance(method: str) -> Callable[[Optional[dict]], str]:
    def show(chance: Optional[dict]) -> str:
        c = (chance or {}).get(method)
        return "n/a" if not c else f"{c['mean']:.3f} ± {c['std']:.3f}"

    return show


def mmcs_table(mmcs: Optional[dict]) -> Optional[Table]:
    """MMCS per layer (mmcs.json) beside its chance level and the SAEs at initialisation."""
    if not mmcs:
        return None
    rows = {}
    for layer, v in sorted(mmcs["layers"].items(), key=lambda kv: int(kv[0])):
        sizes = v.get("sizes") or ["", ""]
        rows[layer] = {"layer": layer, "small": sizes[0], "large": sizes[1], "chance": v.get("chance") or {},
                       "init": v.get("init"), "firing": v.get("firing") or {},
                       **{k: v.get(k) for k in ("max", "hungarian", "max_firing")}}
    defs = mmcs.get("definitions", {})
    return Table(
        (Column("layer", "layer"), Column("small dictionary", "small"), Column("large dictionary", "large"),
         Column("MMCS (max, eq. 2)", "max", fmt), Column("MMCS (one-to-one Hungarian, authors' code)", "hungarian", fmt),
         Column("max: chance (random dictionaries)", "chance", _with_chance("max")),
         Column("Hungarian: chance", "chance", _with_chance("hungarian")),
         Column("max: SAEs at initialisation", "init", lambda init: fmt((init or {}).get("max"))),
         Column("firing features (small / large)", "firing",
                lambda f: f"{f.get('small', 'n/a')} / {f.get('large', 'n/a')}"),
         Column(None, "max_firing")), rows,
        caption=(f"Dictionary sizes in features. max: {defs['max']}. Hungarian: {defs['hungarian']}. "
                 "Chance: mean ± standard deviation of the MMCS of pairs of random unit-vector dictionaries "
                 "of the same shapes; an MMCS near it says the two dictionaries share nothing beyond what "
                 "random directions share. Shared features are chosen among features that fire on held-out "
                 "tokens." if "max" in defs and "hungarian" in defs else "Dictionary sizes in features"))


def _l0(m: dict) -> str:
    l0, frac = m.get("l0"), m.get("l0_fraction")
    return "n/a" if l0 is None else f"{l0:.1f} ({100 * frac:.1f}%)"


def _dead(m: dict) -> str:
    if m.get("dead_fraction") is None:
        return "n/a"
    return f"{100 * m['dead_fraction']:.1f}%" + ("" if m.get("dead_fraction_all_tokens") is None
                                                 else f" ({100 * m['dead_fraction_all_tokens']:.1f}%)")


def _ce_gap_text(m: dict) -> str:
    from irm.findings import ce_gaps

    gaps = ce_gaps(m)
    return "n/a" if gaps is None else f"{gaps[0]:+.3f}; {gaps[1]:+.3f}"


SAE_NUMBERS = ("width", "l0", "l0_fraction", "explained_variance", "explained_variance_after_first", "dead_fraction",
               "dead_fraction_all_tokens", "ce_loss_recovered")


def sae_table(sae_metrics: Optional[dict]) -> Optional[Table]:
    """Each SAE's held-out quality (sae/metrics.json), one row per (layer, dictionary)."""
    if not sae_metrics or not sae_metrics.get("layers"):
        return None
    rows = {(layer, name): {"layer": layer, "dictionary": name, **m}
            for layer, rec in sorted(sae_metrics["layers"].items(), key=lambda kv: int(kv[0]))
            for name, m in sorted(rec.items(), key=lambda kv: int(kv[0][1:]))}
    st, held = sae_metrics.get("settings", {}), sae_metrics.get("heldout", {})
    arch = (f"TopK (k = {st.get('k')})" if st.get("activation") == "topk"
            else f"ReLU + L1 (alpha = {st.get('l1_coefficient')})")
    return Table(
        (Column("layer", "layer"), Column("dictionary", "dictionary"), Column("features", "width"),
         Column("L0 (% of features)", None, _l0), Column("explained variance", "explained_variance", fmt),
         Column("explained variance, first tokens left out", "explained_variance_after_first", fmt),
         Column("dead on held-out (on any cached token)", None, _dead),
         Column("CE loss recovered", "ce_loss_recovered", fmt),
         Column("L_SAE - L_clean; L_zero - L_clean (nats)", None, _ce_gap_text)), rows,
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


PAIRED = (("ablated_minus_splice", "ablated - splice only"),
          ("ablated_minus_random", "ablated - frequency-matched random features"))


def ablation_tables(abl: Optional[dict]) -> Optional[dict[str, Table]]:
    """Table 5: `paired`, the headline paired differences per splice mode; `conditions`, each condition's mean
    reward and its difference from the unspliced model on the same prompts."""
    if not abl:
        return None
    heads = {}
    for mode, conds in abl.get("modes", {}).items():
        for key, text in PAIRED:
            d = conds.get(key)
            if d:
                heads[(mode, key)] = {"label": f"{ABLATION_MODES.get(mode, mode)}: {text}", "ci95": d.get("ci95"),
                                      "interval": d.get("interval", ""), "spread": (
                                          pval(d.get("p_value")) if key == "ablated_minus_splice" else
                                          f"between-draw sd {fmt(d.get('between_draw_std'))}"),
                                      **{k: d.get(k) for k in ("mean", "p_value", "between_draw_std")}}
    paired = Table((Column("paired difference, same prompts", "label"),
                    Column("mean reward difference", "mean", lambda m: f"{m:+.3f}"), Column("95% CI", "ci95", _ci95),
                    Column("p / spread", "spread"), Column("interval", "interval"),
                    Column(None, "p_value"), Column(None, "between_draw_std")), heads,
                   caption="The headline: negative means ablating the labelled features lowers the reward more "
                           "than the control. " + (abl.get("random_control") or ""))
    rows = {"before": {"label": "tuned model, no splice (before)", "mean": abl["before"]["mean"],
                       "ci95": abl["before"].get("ci95"), "diff": None}}
    for mode, conds in abl.get("modes", {}).items():
        for cond, text in ABLATION_CONDITIONS.items():
            if cond in conds:
                rows[(mode, cond)] = {"label": f"{ABLATION_MODES.get(mode, mode)}: {text}",
                                      "mean": conds[cond]["mean"], "ci95": conds[cond].get("ci95"),
                                      "diff": conds[cond].get("diff_vs_before")}
    conditions = Table((Column("condition", "label"), Column("mean reward", "mean", fmt),
                        Column("95% CI", "ci95", _ci95),
                        Column("minus before, same prompts (95% CI)", "diff",
                               lambda d: f"{d['mean']:+.3f} {ci(d)}" if d else "")), rows,
                       caption=f"{abl.get('n_features')} features ablated ({features(abl.get('features') or {})}) "
                               f"over {abl.get('n_prompts')} prompts; random: {abl.get('random_draws')} draws",
                       facts={"n_features": abl.get("n_features"), "after": abl.get("after", {}).get("mean"),
                              "modes": list(abl.get("modes", {}))})
    return {"paired": paired, "conditions": conditions}


VS_OTHER = ("n_related", "n_other", "related_frequency", "other_frequency", "lift", "p_value")


def validation_tables(val: Optional[dict]) -> Optional[dict[str, Table]]:
    """Table 6: `vs_other`, the labelled features against the other explained ones (when measured); `quantities`,
    validation.json's scalar entries; `per_layer`, when measured per layer."""
    if not val:
        return None
    vs = val.get("vs_other_explained") or {}
    out = {"vs_other": Table(
        (Column("inputs", "inputs"), Column("related features", "n_related"),
         Column("other explained features", "n_other"), Column("related frequency", "related_frequency"),
         Column("other explained frequency", "other_frequency"), Column("lift (ratio)", "lift"),
         Column("permutation p (one-sided)", "p_value", pval)),
        {k: {"inputs": k, **{f: v.get(f) for f in VS_OTHER}} for k, v in vs.items()},
        caption="The control: the other explained features of the same layers (explained, labelled 0), not every "
                "feature (dead ones included). p: " + (next(iter(vs.values())).get("test") or "") if vs else "")}
    shown = {k: features(v) if k == "related" else v for k, v in val.items()
             if k not in ("per_layer", "vs_other_explained", "other")}
    out["quantities"] = Table((Column("quantity", "label"), Column("value", "value")),
                              {k: {"label": VALIDATION_LABELS.get(k, k), "value": v} for k, v in shown.items()})
    per_layer, related = val.get("per_layer") or {}, val.get("related") or {}
    out["per_layer"] = Table((Column("layer", "layer"), Column("related features", "related"),
                              Column("related frequency", "related_frequency"),
                              Column("average frequency", "average_frequency")),
                             {layer: {"layer": layer, "related": related.get(layer, ""),
                                      "related_frequency": v.get("related_frequency"),
                                      "average_frequency": v.get("average_frequency")}
                              for layer, v in per_layer.items()}, caption="Per layer, inputs above the threshold")
    return out


def control_tables(c: Optional[dict]) -> Optional[dict[str, Table]]:
    """The base-model control (control.json): `models`, each chain's tau, permutation null and raw-activation tau;
    `delta_tau`, tau_tuned - tau_base with its interval; its other numbers in `models.facts`."""
    if not c:
        return None
    rows = {}
    for label in ("tuned", "base"):
        m = c[label]
        perm = m["permutation"]
        rows[label] = {"label": label, "tau": m["tau"]["all"]["tau"], "tau_heldout": m["tau"]["heldout"]["tau"],
                       "null_q95": perm["all"].get("q95"), "p": perm["all"]["p_greater"],
                       "p_heldout": perm.get("heldout", {}).get("p_greater"),
                       "raw_tau": (m.get("raw_tau") or {}).get("all", {}).get("tau"),
                       "raw_tau_heldout": (m.get("raw_tau") or {}).get("heldout", {}).get("tau"),
                       "nmse": c["sae_fit"]["nmse_at_sentiment_tokens"][label]}
    refits = c["tuned"]["permutation"]["all"]["n"]
    pw = c["per_word"]
    models = Table(
        (Column("model", "label"), Column("tau (all)", "tau", fmt), Column("tau (held out)", "tau_heldout", fmt),
         Column("null tau, 95% range (sign-shuffled R)", "null_q95", _ci95), Column("permutation p", "p", pval),
         Column("tau, R on raw activations", "raw_tau", fmt), Column("SAE NMSE at sentiment tokens", "nmse", fmt),
         Column(None, "p_heldout"), Column(None, "raw_tau_heldout")), rows,
        caption=f"Kendall tau of R's output against the lexicon; permutation p over {refits} refits (one-sided)",
        facts={"sae_choice": c.get("sae_choice"), "refits": refits, "per_word": pw,
               "nmse": c.get("sae_fit", {}).get("nmse_at_sentiment_tokens")})
    d, dh = c["delta_tau"]["all"], c["delta_tau"].get("heldout", {})
    delta = Table((Column("words", "label"), Column("delta_tau = tau_tuned - tau_base", "delta", fmt),
                   Column("paired bootstrap 95% CI", "ci95", _ci95), Column("n", "n")),
                  {"all": {"label": "all", **{k: d.get(k) for k in ("delta", "ci95", "n")}},
                   **({"heldout": {"label": "held out", **{k: dh.get(k) for k in ("delta", "ci95", "n")}}}
                      if dh else {})}, caption=d.get("method", ""))
    return {"models": models, "delta_tau": delta}


def _pct(x: Optional[float]) -> str:
    return "" if x is None else f"{100 * x:.1f}%"


def diff_table(d: Optional[dict]) -> Optional[Table]:
    """Model diffing (diff.json), per layer: the crosscoder's latent classes and reconstruction quality."""
    if not d:
        return None
    rows = {layer: {"layer": layer, "latents": r["latents"], "tuned_specific": len(r["tuned_specific"]),
                    "fractions": r["fractions"], "fractions_by_norm": r["fractions_by_norm"],
                    "explained_variance": {m: r["quality"][m]["explained_variance"] for m in ("base", "tuned")},
                    "diff_sae_explained_variance": (r.get("diff_sae") or {}).get("explained_variance"),
                    "seconds": r["seconds"]} for layer, r in d["layers"].items()}

    def fraction(cls: str) -> Column:
        return Column(cls, "fractions", lambda f: _pct(f[cls]))

    return Table(
        (Column("layer", "layer"), Column("latents", "latents"), Column("tuned-specific", "tuned_specific"),
         Column("tuned-only by norms alone", "fractions_by_norm", lambda f: _pct(f["tuned-specific"])),
         Column("tuned-only artifacts", "fractions", lambda f: _pct(f["tuned-only artifact"])),
         fraction("base-specific"), fraction("shared"), fraction("dead"),
         Column("explained variance base / tuned", "explained_variance",
                lambda ev: f"{ev['base']:.3f} / {ev['tuned']:.3f}"),
         Column("diff-SAE explained variance", "diff_sae_explained_variance",
                lambda ev: "" if ev is None else f"{ev:.3f}"),
         Column("seconds", "seconds", lambda s: f"{s:.0f}")), rows,
        caption=f"Held-out rows of the paired cache; the stage took {d['seconds']:.0f} s, "
                f"{d['base_cache_seconds']:.0f} s of it caching the base model's activations.")


def build_tables(load: Callable[[str], Any]) -> dict[str, Any]:
    """Every table of the report from the run's artifacts (`load(key)`: the artifact, None where its stage has not
    run)."""
    return {"reward": reward_table(load("reward_eval")), "kendall": kendall_table(load("kendall")),
            "mmcs": mmcs_table(load("mmcs")), "sae": sae_table(load("sae_metrics")),
            "ablation": ablation_tables(load("ablation")), "validation": validation_tables(load("validation")),
            "control": control_tables(load("control")), "diff": diff_table(load("diff_summary"))}


@dataclass
class ReportInputs:
    """What every section of the report reads: the config, the run and plot directories, the tables
    (`build_tables`) and the findings rows (irm.findings.build_findings), each built once; summary.json is built
    from the same tables and rows (irm.report.summary)."""

    cfg: Any
    root: Path
    plots: Path
    tables: dict[str, Any] = field(default_factory=dict)
    findings: list[dict] = field(default_factory=list)
    artifacts: dict[str, Any] = field(default_factory=dict)  # read once, by `load`

    def load(self, key: str) -> Any:
        """Artifact `key` of the run (irm.report.text.load), read once for the tables, the sections and the summary."""
        if key not in self.artifacts:
            self.artifacts[key] = load(self.root, key)
        return self.artifacts[key]

    @classmethod
    def read(cls, cfg: Any, root: Path, plots: Path) -> "ReportInputs":
        from irm.findings import build_findings

        inputs = cls(cfg, root, plots)
        inputs.tables, inputs.findings = build_tables(inputs.load), build_findings(root)
        return inputs
