"""Validation of R against the explainer's labels (paper 4.4, table 6): over unseen inputs, how often the features
labelled "related to the reward" are active where R predicts a large delta, versus the average feature.

An input is one token position of an eval-split text (every position but each text's first, whose activations are
atypical: it has no context and serves as the attention sink). Its A_concat is the 1x-SAE codes of every chosen
layer there, read with all SAEs spliced in as in the deltas stage. R's output is put on the reconstructed lexicon's
scale with the lexicon stage's mapping (kendall.json), so the threshold (paper: 3) is in VADER units.

The paper compares the related features with "the average feature", dead ones included: any explained feature
(the explainer only sees features that fire) beats that. The control here is the *other explained* features of the
same layers (explained and labelled 0). A feature that fires on most tokens fires often where R is high too, so raw
frequencies favour busy features; the verdict's statistic is each feature's *enrichment* over its own base rate,
P(active | R > threshold) / P(active), 1 for a feature that ignores R whatever its rate (issue 22), taken as a
z-score under "the feature ignores R" (hypergeometric: the ratio of a rare feature swings far more than a busy
one's, and a group of rare features would pass for enriched). The groups' z-scores, on one scale whatever the
feature, are compared by a label permutation test of their difference of means; mean enrichment ratios and raw
frequencies (compared by Welch's t) are kept beside it.

Circularity: the offline explainer (explain.backend offline) labels a feature related when reward-lexicon tokens
carry most of its activation, and R's targets are that lexicon's values, so related features fire on the words R
scores high by construction. validation.json records the label method and `circular` (the reason, or None); the
findings row then reports the numbers with verdict "not tested" and says why.
"""

from __future__ import annotations

from pathlib import Path
from irm.artifacts import read_json, write_json
from irm.config import RunConfig
from irm.enrichment import ENRICHMENT, Frequencies, circularity, compare_groups, enrichment_comparison
from irm.errors import UserError
from irm.stages import artifact, relpath

VALIDATION_JSON = relpath("validation")
INPUTS = ("every token position of each eval-split text except its first, truncated to cache.max_length tokens; "
          "x = concatenated 1x-SAE codes of the chosen layers at that position")


def label_methods(root: Path) -> list[str]:
    """How the small dictionary's features were labelled (explanations.jsonl's label_method), each method once."""
    from irm.artifacts import read_jsonl
    from irm.explain import EXPLANATIONS

    return sorted({line["label_method"] for line in read_jsonl(root / EXPLANATIONS)
                   if line.get("role") == "small" and line.get("label_method")})


def _eval_sequences(cfg: RunConfig, tokenizer) -> list:
    """Token ids of the eval-split texts; a one-token text has no position left once its first is dropped."""
    from irm.data import load_texts

    vc = cfg.validate_features
    texts = load_texts(cfg.corpus, cfg.corpus.eval_split, seed=cfg.seed, n=vc.n_inputs)
    sequences = [ids for ids in tokenizer(texts, truncation=True, max_length=cfg.cache.max_length)["input_ids"]
                 if len(ids) > 1]
    if not sequences:
        raise UserError(f"no eval-split text ({cfg.corpus.eval_split!r}) has two tokens or more; check the corpus")
    return sequences


def _count_frequencies(cfg: RunConfig, model, saes, sequences, pad_token_id, weight, bias, mapping, n_layers: int,
                       width: int) -> Frequencies:
    """How often each feature fires, on all positions and on those where R (lexicon scale) is above the threshold."""
    import torch

    from irm.sae.splice import iter_codes
    from irm.readout import apply_mapping

    vc = cfg.validate_features
    freqs = Frequencies(n_layers, width)
    w = weight.float()
    for batch, mask_BT, codes_BTLF in iter_codes(model, saes, sequences, pad_token_id,
                                                 cfg.cache.batch_size, cfg.cache.site, desc="validate: eval texts"):
        keep_BT = mask_BT.bool().clone()
        first = keep_BT.float().argmax(dim=1)  # left padding: each row's first real token
        keep_BT[torch.arange(len(batch)), first] = False
        codes_NLF = codes_BTLF[keep_BT]
        scaled = apply_mapping((codes_NLF.flatten(1) @ w + bias).numpy(), mapping)
        freqs.update(codes_NLF.numpy(), scaled > vc.threshold)
    return freqs


def _print_result(result: dict, threshold: float, n_texts: int, n_related: int) -> None:
    def pct(v):
        return "n/a" if v is None else f"{100 * v:.1f}%"

    print(f"validate-features: {result['n_inputs_above']} of {result['n_inputs']} positions ({n_texts} texts) "
          f"above {threshold}; {n_related} related features active at {pct(result['related_frequency'])} vs "
          f"average feature {pct(result['average_frequency'])} (all positions: "
          f"{pct(result['related_frequency_all_inputs'])} vs {pct(result['average_frequency_all_inputs'])})")
    vs = result["vs_other_explained"]["inputs above threshold"]
    if vs["lift"] is not None:
        print(f"  vs the {vs['n_other']} other explained features: {pct(vs['other_frequency'])}, lift "
              f"{vs['lift']:.2f}, permutation p = {vs['p_value']:.3g}")
    e = result["vs_other_explained"][ENRICHMENT]
    if e["p_value"] is not None:
        print(f"  enrichment over each feature's base rate: related {e['related_enrichment']:.2f}, other "
              f"{e['other_enrichment']:.2f} (z {e['related_frequency']:.2f} vs {e['other_frequency']:.2f}), "
              f"permutation p = {e['p_value']:.3g}")
    if result.get("circular"):
        print(f"  {result['circular']}")
    if "note" in result:
        print(f"  note: {result['note']}")


def run(cfg: RunConfig) -> dict:
    from irm.sae.splice import load_saes
    from irm.explain import explained_features
    from irm.readout import raw_threshold
    from irm.models import load_tuned
    from irm.readers import load_irm
    from irm.runtime import start
    from irm.stages import mark_done

    vc = cfg.validate_features  # its ranges: irm.config.check_all, before any stage runs
    device = start(cfg.seed, cfg.device)
    root = Path(cfg.run_dir)
    weight, bias, layers = load_irm(root)
    kendall_path = artifact(root, "kendall")
    if not kendall_path.exists():
        raise UserError(f"missing {kendall_path}: run `python -m irm lexicon` first (its mapping puts R on the "
                        "lexicon scale the threshold is in)")
    mapping = read_json(kendall_path)["mapping"]
    related_all, other_all = explained_features(root, 1), explained_features(root, 0)
    related = {layer: related_all.get(layer, []) for layer in layers}
    other = {layer: other_all.get(layer, []) for layer in layers}
    model, tokenizer = load_tuned(cfg, device=device)
    saes = load_saes(root, layers, model, cfg.cache.site, cfg.sae.dictionary_pair()[0])
    width = int(next(iter(saes.values())).dictionary.shape[0])

    sequences = _eval_sequences(cfg, tokenizer)
    freqs = _count_frequencies(cfg, model, saes, sequences, tokenizer.pad_token_id, weight, bias, mapping,
                               len(layers), width)

    n_related = sum(len(v) for v in related.values())
    result = {
        "inputs": INPUTS,
        "n_texts": len(sequences),
        "n_inputs": freqs.n_all,
        "threshold": vc.threshold,
        "threshold_scale": "reconstructed lexicon scale [-4, 4] (kendall.json mapping); R > threshold there",
        "raw_threshold": raw_threshold(vc.threshold, mapping),
        "n_inputs_above": freqs.n_above,
        "n_related": n_related,
        "related": {str(k): v for k, v in related.items()},
        "active": "code > 0",
        **freqs.summary(layers, related),
        "label_methods": label_methods(root),
        "vs_other_explained": {
            ENRICHMENT: enrichment_comparison(freqs, layers, related, other, cfg.seed),
            "inputs above threshold": compare_groups(freqs.per_feature(layers, related),
                                                     freqs.per_feature(layers, other), cfg.seed),
            "all inputs": compare_groups(freqs.per_feature(layers, related, above=False),
                                         freqs.per_feature(layers, other, above=False), cfg.seed),
        },
        "other": {str(k): v for k, v in other.items()},
    }
    result["circular"] = circularity(result["label_methods"])
    if n_related == 0:
        result["note"] = ("no feature of the chosen layers was labelled related to the reward by the explain stage: "
                          "there is nothing to compare with the average feature")
    elif freqs.n_above == 0:
        result["note"] = f"R puts no input above {vc.threshold} on the lexicon scale: no frequency to report"
    write_json(root / VALIDATION_JSON, result)
    mark_done(cfg, "validate-features", [VALIDATION_JSON])

    _print_result(result, vc.threshold, len(sequences), n_related)
    return result
