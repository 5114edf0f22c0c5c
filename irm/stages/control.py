"""`python -m irm control`: the base-model control and the nulls that say what a Kendall tau means (README "What the
numbers mean").

The chain of the paper - sentiment activation deltas of the triples -> linear R -> R applied to lexicon words in
context -> Kendall tau against the lexicon - is run on the tuned model M_RLHF and, on the same triples, the same
words and the same contexts, on the base model M_base. tau_tuned alone cannot say what RLHF put into the model (a
pretrained model already knows much about sentiment); delta_tau = tau_tuned - tau_base, with a paired bootstrap
interval over words, and the per-word moves between the two reconstructed lexicons can.

Which SAEs on M_base: the tuned run's SAEs, spliced into M_base at the same layers. The alternative, SAEs trained
afresh on M_base's activations, would give the base chain another dictionary: different features, another
feature order, another training draw (shard order, initialisation), so tau_base would differ from tau_tuned by the
dictionary as well as by the model, and nothing would separate the two. With one dictionary the two chains differ
only in the model weights the activations pass through; the deltas, R's input space and the readout are the same
functions. The cost of the choice - the dictionary was fitted to M_RLHF's activations - is measured, not assumed:
`sae_fit` reports the SAEs' normalised reconstruction error at the triples' sentiment tokens on both models (RLHF
moves activations little, so they fit M_base about as well; when they do not, the findings table says so). Then
`control.base_saes: base` trains SAEs on M_base's own activations (the cache and sae stages, run on a sub-run
directory `control/base-run` whose policy is M_base) and reads the base chain through them. Measured on the tiny
config, whose PPO at lr 1e-2 on a random model inflates the chosen layers' activations 160x, the tuned SAEs'
NMSE is 0.22 on M_RLHF and 26,000 on M_base: there the premise fails and `base` is the control to use.

R is refitted here for both models by the same closed-form ridge (irm.ridge.RidgePath), at one penalty for every
chain (chosen by exact leave-one-triple-out error summed over the chains), not by the regression stage's Adam
loop, so that both chains use one estimator and so that
the nulls can refit it hundreds of times in seconds:
- permutation null: R refit on targets whose signs are flipped for a random half of the triples (a triple's two
  rows swap their +/- sign; magnitudes kept), `control.permutations` times; p = (1 + #{tau_null >= tau}) / (1 + n);
- raw activations: R fitted on the MLP outputs the SAEs encode (same tokens, same targets) instead of their codes,
  so what the SAE adds is visible.
Both for the tuned and the base model. Every word's features are read once per model (codes and the SAE's input in
the same pass, through the same `codes_at` as the deltas and lexicon stages) and kept as a words x features matrix,
so a refit's tau is one matrix-vector product (R is linear: the mean over contexts of R is R of the mean). The tuned
model's triple rows are the deltas stage's own (its shards keep the activations the codes encode, `x_raw`): the same
model, SAEs and reader, so they are read once in the run, not twice; M_base's are read here.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Optional

import numpy as np

from irm.artifacts import read_json, write_json, write_text
from irm.chains import MODELS, analyse
from irm.config import RunConfig
from irm.stages import relpath

CONTROL_JSON = relpath("control")
CONTROL_WORDS = relpath("control_words")
SAE_CHOICE = "the tuned run's SAEs spliced into both models at the same layers"
SAE_OWN = "each model's own SAEs at the same layers (M_base's trained on its activations: control/base-run)"


# ---------------------------------------------------------------------------------------------------------------
# Reading: codes and the activations they encode, in one pass


def tuned_rows(root: Path, n_triples: int) -> Optional[dict]:
    """The tuned model's rows as the deltas stage wrote them (the same model, SAEs, triples and reader as
    `irm.delta_rows.triple_rows` would use: read once, not twice), or None when the deltas stage has not written them
    (not run, or shards from before they kept the raw activations): then they are read here."""
    from irm.artifacts import MANIFEST
    from irm.delta_rows import KEYS, RAW, open_deltas

    if not (root / relpath("deltas") / MANIFEST).exists():
        return None
    store = open_deltas(root / relpath("deltas"))
    if RAW not in store.manifest or store.manifest.get("n_triples") != n_triples:
        return None
    return store.read_all((*KEYS, RAW))


def features_of(rows: dict, saes: dict, model, items: list, word_of_row: np.ndarray, n_words: int, pad_id: int,
                batch_size: int, site: str, label: str, context_of_row: Optional[np.ndarray] = None) -> dict:
    """For one model: its triple rows as float64 arrays, the SAEs' reconstruction error at the positive sentiment
    tokens (normalised by the activations' variance), every word's mean codes and raw activations over its
    contexts (words x features) and, with `context_of_row`, the codes and activations of every word in every
    context (items x features: delta_tau's bootstrap resamples the contexts)."""
    import torch

    from irm.delta_rows import RAW
    from irm.sae.splice import codes_at, n_codes, with_inputs
    from irm.readout import per_word

    width = n_codes(saes)
    both = codes_at(model, with_inputs(saes), items, pad_id, batch_size, site,
                    desc=f"control ({label}): words in context")
    word_codes, word_raw = both[..., :width], both[..., width:]
    positive = rows["sign"] == 1
    n_layers = len(saes)
    codes_pos = rows["x"][positive].reshape(int(positive.sum()), n_layers, width)
    x = rows[RAW][positive].reshape(codes_pos.shape[0], n_layers, -1).double()
    with torch.no_grad():
        w = {layer: next(saes[layer].parameters()) for layer in saes}  # codes come back on the CPU
        x_hat = torch.stack([saes[layer].decode(codes_pos[:, i].to(w[layer].device, w[layer].dtype))
                             .double().cpu() for i, layer in enumerate(saes)], dim=1)
    nmse = float(((x - x_hat) ** 2).sum() / ((x - x.mean(dim=0)) ** 2).sum())
    return {
        "x": rows["x"].double().numpy(), "x_raw": rows[RAW].double().numpy(), "y": rows["y"].double().numpy(),
        "sign": rows["sign"].numpy(), "triple": rows["triple"].numpy(),
        "words": per_word(word_codes.flatten(1).double().numpy(), word_of_row, n_words),
        "words_raw": per_word(word_raw.flatten(1).double().numpy(), word_of_row, n_words),
        "sae_nmse": nmse,
        **({} if context_of_row is None else {
            "items": word_codes.flatten(1).double().numpy(), "items_raw": word_raw.flatten(1).double().numpy(),
            "word_of_item": np.asarray(word_of_row), "context_of_item": np.asarray(context_of_row)}),
    }


def read_features(model, saes: dict, triples: list[dict], items: list, word_of_row: np.ndarray, n_words: int,
                  pad_id: int, batch_size: int, site: str, label: str, rows: Optional[dict] = None,
                  context_of_row: Optional[np.ndarray] = None) -> dict:
    """For one model: `features_of` its triple rows (read here unless `rows` gives them) and words."""
    if rows is None:
        from irm.delta_rows import triple_rows

        rows = triple_rows(model, saes, triples, pad_id, batch_size, site, f"control ({label}): triples")
    return features_of(rows, saes, model, items, word_of_row, n_words, pad_id, batch_size, site, label,
                       context_of_row)


# ---------------------------------------------------------------------------------------------------------------
# Writing


def words_csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    fields = ["word", "true", "base", "tuned", "move", "moved", "direction", "heldout"]
    writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({**r, **{k: f"{r[k]:.6g}" for k in ("base", "tuned", "move")}, "true": f"{r['true']:g}",
                         "moved": int(r["moved"]), "heldout": int(r["heldout"])})
    return buf.getvalue()


CHAINS = {"x": "SAE codes", "x_raw": "raw activations"}


# ---------------------------------------------------------------------------------------------------------------
# The stage


BASE_RUN = "control/base-run"


def base_run_saes(cfg: RunConfig, model, tokenizer, layers: list[int], expansion: int) -> dict:
    """SAEs trained on M_base's own activations (control.base_saes: base): the cache and sae stages themselves, run
    on a sub-run directory whose "tuned policy" is M_base, at the chosen layers; both resume and skip as stages do."""
    import dataclasses

    from irm.sae.splice import load_saes
    from irm.stages import artifact, is_done, open_run_dir, run_stage

    sub = dataclasses.replace(cfg, run_dir=str(Path(cfg.run_dir) / BASE_RUN),
                              cache=dataclasses.replace(cfg.cache, layers=list(layers)))
    open_run_dir(sub)
    policy = artifact(sub.run_dir, "policy")
    if not (policy / "config.json").is_file():
        from irm.artifacts import atomic_dir

        with atomic_dir(policy) as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
    for name in ("cache", "sae"):
        if not is_done(sub, name):
            run_stage(sub, name)
    return load_saes(sub.run_dir, layers, model, cfg.cache.site, expansion)


def run(cfg: RunConfig) -> dict:
    from irm.sae.splice import load_saes
    from irm.layers import chosen_layers
    from irm.readers import read_triples
    from irm.readout import heldout_and_seen, lexicon_words, unseen_contexts, word_items
    from irm.models import load_model, load_tuned, n_layers
    from irm.reward import reference_lexicon
    from irm.runtime import start
    from irm.stages import artifact, mark_done

    cc = cfg.control  # its ranges: irm.config.check_all, before any stage runs
    device = start(cfg.seed, cfg.device)
    root = Path(cfg.run_dir)
    triples = read_triples(root)
    info = read_json(artifact(root, "triples_summary"))
    heldout, seen = heldout_and_seen(info)
    lexicon = reference_lexicon(cfg.reward)

    features, sae_fit = {}, {}
    for label in MODELS:
        # One model in memory at a time; the tuned run's SAEs on both.
        model, tokenizer = (load_tuned(cfg, device=device) if label == "tuned"
                            else load_model(cfg.model, seed=cfg.seed, device=device))
        if label == "tuned":
            layers = chosen_layers(cfg, n_layers(model))
            words, _ = lexicon_words(tokenizer, lexicon, cc.max_words, cfg.seed)
            contexts = unseen_contexts(info, cfg.lexicon.contexts_per_word, cfg.seed)
            # context by context, so that every item's context is known (delta_tau's bootstrap resamples them)
            per_context = [word_items(tokenizer, words, [context]) for context in contexts]
            items = [item for its, _ in per_context for item in its]
            word_of_row = np.concatenate([w for _, w in per_context]).astype(np.int64)
            context_of_row = np.concatenate([np.full(len(w), c) for c, (_, w) in enumerate(per_context)])
            kept = np.unique(word_of_row)  # words read in at least one context
            remap = np.full(len(words), -1)
            remap[kept] = np.arange(len(kept))
            words, word_of_row = [words[i] for i in kept], remap[word_of_row]
            true = np.array([lexicon[w] for w in words], dtype=np.float64)
        expansion = cfg.sae.dictionary_pair()[0]
        if label == "base" and cc.base_saes == "base":
            saes = base_run_saes(cfg, model, tokenizer, layers, expansion)
        else:
            saes = load_saes(root, layers, model, cfg.cache.site, expansion)
        # The tuned chain's triples are the deltas stage's rows: the same model, SAEs and reader.
        stored = tuned_rows(root, len(triples)) if label == "tuned" else None
        features[label] = read_features(model, saes, triples, items, word_of_row, len(words),
                                        tokenizer.pad_token_id, cfg.cache.batch_size, cfg.cache.site, label, stored,
                                        context_of_row)
        sae_fit[label] = features[label]["sae_nmse"]
        del model, saes
    analysis, rows = analyse(features, words, true, heldout, seen, cc, cfg.lexicon.percentiles, cfg.seed,
                             show_progress=True)

    kendall_stage = read_json(root / relpath("kendall")) if (root / relpath("kendall")).exists() else {}
    report = {
        "sae_choice": SAE_CHOICE if cc.base_saes == "tuned" else SAE_OWN,
        "chain": "deltas of the triples -> closed-form ridge R (one penalty, by leave-one-triple-out error) -> R on "
                 "every word's mean features over the contexts -> Kendall tau against the lexicon (raw R output)",
        "layers": layers, "n_triples": len(triples), "n_words": len(words), "n_contexts": len(contexts),
        "sae_fit": {"nmse_at_sentiment_tokens": sae_fit,
                    "what": "sum of squared reconstruction errors over the sum of squared deviations from the mean, "
                            "at the triples' positive-variant sentiment tokens"},
        **analysis,
        "lexicon_stage_tau": (kendall_stage.get("all") or {}).get("tau"),
        "permutation_how": "R refit on targets with the signs of a random half of the triples flipped",
    }
    write_text(root / CONTROL_WORDS, words_csv(rows))
    write_json(root / CONTROL_JSON, report)
    mark_done(cfg, "control", [CONTROL_JSON, CONTROL_WORDS])
    _print(report)
    return report


def _print(r: dict) -> None:
    from irm.findings import interval, num, p_text

    d = r["delta_tau"]["all"]
    print(f"control: {r['n_words']} words, {r['n_triples']} triples; SAE NMSE at sentiment tokens tuned "
          f"{num(r['sae_fit']['nmse_at_sentiment_tokens']['tuned'])}, base "
          f"{num(r['sae_fit']['nmse_at_sentiment_tokens']['base'])}")
    for label in MODELS:
        t = r[label]
        raw = t.get("raw_tau", {}).get("all", {}).get("tau")
        print(f"  {label:<5} tau {num(t['tau']['all']['tau'])} (held out {num(t['tau']['heldout']['tau'])}); "
              f"permutation {p_text(t['permutation']['all']['p_greater'])}; raw-activation tau {num(raw)}")
    pw = r["per_word"]
    print(f"  delta_tau = tau_tuned - tau_base = {num(d['delta'], signed=True)}, 95% CI {interval(d['ci95'])}; "
          f"words moved: {pw['n_moved_toward']} toward the reward, {pw['n_moved_away']} away")
