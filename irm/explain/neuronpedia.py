"""The explain stage's feature pages in the formats other viewers read: SAEDashboard's Neuronpedia batch JSON (what
SAEDashboard's `neuronpedia-runner` writes and Neuronpedia imports; loaded by SAEDashboard's own
`NeuronpediaDashboardBatch(**json.load(f))`), and Neuronpedia's explanation export rows.

    explain/neuronpedia/layer-NN-xE/batch-0.json         {model_id, layer, sae_set, features: [...]}
    explain/neuronpedia/layer-NN-xE/explanations.jsonl   one row per explained feature

Fields filled per feature (SAEDashboard's `NeuronpediaDashboardFeature`): `feature_index`; `pos_str`/`pos_values` and
`neg_str`/`neg_values` (the tokens the decoder direction promotes and suppresses through the unembedding, the logit
lens); `logits_hist_data_bar_values`/`_heights` (histogram of that effect over the whole vocabulary); `frac_nonzero`
(fraction of cached tokens where the feature fires); `freq_hist_data_bar_values`/`_heights` (bin centres and counts of
the feature's largest activation per window, windows where it fires: SAEDashboard bins token activations instead);
`n_prompts_total` (windows), `n_tokens_in_prompt` (`explain.window`), `dataset` (`corpus.source`); `activations`, one
per top and quantile window: `tokens`, `values`, `qualifying_token_index` (its strongest token), and the bin
SAEDashboard's converter gives them (top windows:
`bin_min` -1, `bin_max` the feature's largest activation, `bin_contains` -1; a quantile window: its bin's lowest and
highest window maximum and its share of the activating windows). Left at SAEDashboard's empty defaults: the neuron
alignment and correlation tables, `decoder_weights_dist` (attention-head SAEs only) and `vector`. Written against
sae-dashboard 0.8.0. `model_id` is the model
name of the SAEs' cfg.json (a hub id for hub models), `sae_set` is `irm-xE`, and Neuronpedia's source id is
`<layer>-irm-xE`. Explanation rows hold Neuronpedia's explanation columns we can fill (`modelId`, `layer` (the source
id), `index`, `description`, `typeName`, `explanationModelName`); the detection and fuzzing scores stay in
explain/scores.json and the report.
"""

from __future__ import annotations

import json
from pathlib import Path

from irm.artifacts import atomic_dir
from irm.stages import artifact

BATCH = "batch-0.json"
EXPLANATION_ROWS = "explanations.jsonl"
TYPE_NAME = "oai_token-act-pair"  # Bills et al.'s token<TAB>activation explainer, which irm's prompt follows


def sae_set(dictionary: str) -> str:
    return f"irm-{dictionary}"


def folder(layer: int, dictionary: str) -> str:
    return f"layer-{layer:02d}-{dictionary}"


def _bins(h: dict | None) -> tuple[list[float], list[int]]:
    if not h or not h.get("counts"):
        return [], []
    e = h["edges"]
    return [round((e[i] + e[i + 1]) / 2, 6) for i in range(len(h["counts"]))], list(h["counts"])


def _activation(record: dict, max_activation: float) -> dict:
    if record.get("kind") == "quantile" and record.get("bin"):
        lo, hi, share = record["bin"]
    else:
        lo, hi, share = -1, max_activation, -1
    values = [round(float(v), 4) for v in record["activations"]]
    return {"bin_min": lo, "bin_max": hi, "bin_contains": share, "tokens": record["tokens"], "values": values,
            "qualifying_token_index": max(range(len(values)), key=values.__getitem__) if values else 0}


def feature(line: dict, cfg) -> dict:
    """One explanation line as SAEDashboard's NeuronpediaDashboardFeature dict (its keys only)."""
    lens = line.get("logit_lens") or {}
    hist = line.get("histogram") or {}
    centres, heights = _bins(hist)
    logit_centres, logit_heights = _bins(lens.get("histogram"))
    return {
        "feature_index": int(line["index"]),
        "pos_str": [t for t, _ in lens.get("promoted") or []],
        "pos_values": [round(float(v), 4) for _, v in lens.get("promoted") or []],
        "neg_str": [t for t, _ in lens.get("suppressed") or []],
        "neg_values": [round(float(v), 4) for _, v in lens.get("suppressed") or []],
        "frac_nonzero": float((line.get("density") or {}).get("tokens") or 0.0),
        "freq_hist_data_bar_values": centres,
        "freq_hist_data_bar_heights": heights,
        "logits_hist_data_bar_values": logit_centres,
        "logits_hist_data_bar_heights": logit_heights,
        "n_prompts_total": int(hist.get("windows") or 0),
        "n_tokens_in_prompt": int(cfg.explain.window),
        "dataset": str(cfg.corpus.source),
        "activations": [_activation(r, float(line.get("max_activation") or 0.0)) for r in line.get("records") or []],
    }


def _model_id(cfg, layer: int, dictionary: str) -> str:
    from irm.errors import UserError
    from irm.sae import sae_dir
    from irm.sae.export import read_cfg

    try:
        return read_cfg(sae_dir(cfg.run_dir, layer, int(dictionary[1:]))).get("model_name") or cfg.model.name
    except UserError:  # no exported cfg.json (a hand-made run directory): the config's name
        return cfg.model.name


def write(cfg, lines: list[dict]) -> Path:
    """Write every line's page under explain/neuronpedia/, one folder per layer and dictionary; returns the folder."""
    out = artifact(cfg.run_dir, "neuronpedia")
    groups: dict[tuple[int, str], list[dict]] = {}
    for line in lines:
        groups.setdefault((int(line["layer"]), line["dictionary"]), []).append(line)
    with atomic_dir(out) as tmp:
        for (layer, dictionary), group in sorted(groups.items()):
            model_id = _model_id(cfg, layer, dictionary)
            d = Path(tmp) / folder(layer, dictionary)
            d.mkdir(parents=True)
            batch = {"model_id": model_id, "layer": layer, "sae_set": sae_set(dictionary),
                     "features": [feature(ln, cfg) for ln in sorted(group, key=lambda ln: ln["index"])]}
            (d / BATCH).write_text(json.dumps(batch), encoding="utf-8")
            rows = [{"modelId": model_id, "layer": f"{layer}-{sae_set(dictionary)}", "index": str(ln["index"]),
                     "description": ln["explanation"], "typeName": TYPE_NAME,
                     "explanationModelName": f"{ln.get('backend')}/{ln.get('model')}"}
                    for ln in sorted(group, key=lambda ln: ln["index"]) if ln.get("explanation")]
            (d / EXPLANATION_ROWS).write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return out
