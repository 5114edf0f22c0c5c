"""`python -m irm control`: the base-model control and the nulls that say what a Kendall tau means (SPEC "Controls").

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

R is refitted here for both models by the same closed-form ridge (irm.regression.RidgePath), at one penalty for every
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
from typing import Optional, Sequence

import numpy as np

from irm.artifacts import read_json, write_json, write_text
from irm.config import RunConfig
from irm.stages import relpath

CONTROL_JSON = relpath("control")
CONTROL_WORDS = relpath("control_words")
MODELS = ("tuned", "base")
SAE_CHOICE = "the tuned run's SAEs spliced into both models at the same layers"
SAE_OWN = "each model's own SAEs at the same layers (M_base's trained on its activations: control/base-run)"


# ---------------------------------------------------------------------------------------------------------------
# Reading: codes and the activations they encode, in one pass


def tuned_rows(root: Path, n_triples: int) -> Optional[dict]:
    """The tuned model's rows as the deltas stage wrote them (the same model, SAEs, triples and reader as
    `irm.deltas.triple_rows` would use: read once, not twice), or None when the deltas stage has not written them
    (not run, or shards from before they kept the raw activations): then they are read here."""
    from irm.artifacts import MANIFEST
    from irm.deltas import KEYS, RAW, open_deltas

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

    from irm.deltas import RAW
    from irm.sae.splice import codes_at, n_codes, with_inputs
    from irm.lexicon import per_word

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
        from irm.deltas import triple_rows

        rows = triple_rows(model, saes, triples, pad_id, batch_size, site, f"control ({label}): triples")
    return features_of(rows, saes, model, items, word_of_row, n_words, pad_id, batch_size, site, label,
                       context_of_row)


# ---------------------------------------------------------------------------------------------------------------
# The maths: refits, nulls, paired intervals, per-word moves


def flipped_signs(triple: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A row multiplier of +-1, -1 on both rows of a random half of the triples: a triple's positive row gets
    -Delta+ and its negative row +|Delta-|. Magnitudes and the triples' pairing are kept; only which variant is
    'positive' is shuffled across triples."""
    ids, inverse = np.unique(triple, return_inverse=True)
    flip = rng.random(len(ids)) < 0.5
    return np.where(flip[inverse], -1.0, 1.0)


PAIRWISE_MAX = 200  # above this many words, Kendall tau by scipy (n log n) is faster than by all pairs (n^2)


def kendall_taus(true, predicted_KN) -> np.ndarray:
    """Kendall tau-b of `true` against each row of `predicted_KN` (NaN entries left out, as scipy.stats.kendalltau's
    nan_policy "omit" does), by all pairs at once for up to PAIRWISE_MAX words (the bootstraps and nulls take it
    thousands of times, where scipy's per-call overhead dominated), else by scipy row by row. NaN when undefined."""
    from scipy.stats import kendalltau

    true = np.asarray(true, dtype=np.float64)
    pred = np.atleast_2d(np.asarray(predicted_KN, dtype=np.float64))
    if len(true) > PAIRWISE_MAX:
        return np.array([kendalltau(true, row, nan_policy="omit").statistic for row in pred], dtype=np.float64)
    iu = np.triu_indices(len(true), 1)
    sx = np.sign(true[iu[0]] - true[iu[1]])
    out = np.empty(len(pred))
    step = max(1, 4_000_000 // max(1, len(sx)))  # rows at a time: a few million pairs in memory
    for start in range(0, len(pred), step):
        sy = np.sign(pred[start:start + step, iu[0]] - pred[start:start + step, iu[1]])
        valid = np.isfinite(sy)
        sy = np.where(valid, sy, 0.0)
        sxv = np.where(valid, sx, 0.0)
        with np.errstate(invalid="ignore", divide="ignore"):
            out[start:start + step] = (sxv * sy).sum(axis=1) / np.sqrt((sxv != 0).sum(axis=1) * (sy != 0).sum(axis=1))
    return out


def taus(true: np.ndarray, predicted: np.ndarray, masks: dict) -> dict:
    """Kendall tau (irm.lexicon.kendall) of each subset."""
    from irm.lexicon import kendall

    return {name: kendall(true[m], predicted[m]) for name, m in masks.items()}


def permutation_null(path, multiple: float, y: np.ndarray, triple: np.ndarray, words_F: np.ndarray, true: np.ndarray,
                     masks: dict, observed: dict, n: int, seed: int) -> dict:
    """R refit `n` times on sign-flipped targets (`flipped_signs`) at the observed fit's penalty; per subset the
    null taus, their mean and sd, and the one-sided permutation p-values of the observed tau (upper: `p_greater`,
    lower: `p_less`)."""
    from irm.findings import permutation_p
    from irm.runtime import one_blas_thread

    rng = np.random.default_rng(seed)
    pred_PW = np.empty((n, len(true)))
    with one_blas_thread():
        for i in range(n):
            w, b, _ = path.fit(y * flipped_signs(triple, rng), multiple)
            pred_PW[i] = words_F @ w + b
    null = {name: kendall_taus(true[m], pred_PW[:, m]) if m.sum() > 1 else np.full(n, np.nan)
            for name, m in masks.items()}
    out = {}
    for name, values in null.items():
        arr = np.asarray(values, dtype=np.float64)
        tau = observed[name]["tau"]
        finite = arr[np.isfinite(arr)]
        out[name] = {"n": int(n), "mean": float(finite.mean()) if finite.size else None,
                     "sd": float(finite.std(ddof=1)) if finite.size > 1 else None,
                     "q95": [float(v) for v in np.percentile(finite, [2.5, 97.5])] if finite.size else None,
                     "p_greater": permutation_p(tau, arr, "greater") if tau is not None else None,
                     "p_less": permutation_p(tau, arr, "less") if tau is not None else None,
                     "taus": [round(float(v), 5) for v in arr]}
    return out


def _rows_by_triple(triple: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Row indices of each triple in `ids` order, [triples, rows per triple] (every triple has as many rows)."""
    order = np.argsort(triple, kind="stable")
    found, counts = np.unique(triple[order], return_counts=True)
    if len(set(counts.tolist())) != 1 or not np.array_equal(found, ids):
        raise ValueError("every chain needs the same triples, each with the same number of rows")
    return order.reshape(len(ids), int(counts[0]))


def _items(f: dict, key: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A chain's words in context: (features per item, word of each item, context of each item). Features without
    items (one row per word, already averaged) count as one context."""
    items = f.get(f"items{key[1:]}") if "word_of_item" in f else None
    if items is None:
        words = f["words" + key[1:]]
        return words, np.arange(len(words)), np.zeros(len(words), dtype=np.int64)
    return items, np.asarray(f["word_of_item"]), np.asarray(f["context_of_item"])


def resampled_deltas(features: dict, true: np.ndarray, masks: dict, scales: dict, multiple: float,
                     pairs: dict, n_resamples: int, seed: int, show_progress: bool = False) -> dict:
    """tau(a) - tau(b) for every pair of chains, with a 95% percentile interval from a bootstrap that resamples
    every unit that varies, paired across the chains: the triples (R refitted on the drawn triples' rows, closed
    form, at the one penalty `multiple` x each chain's own scale), the contexts the words are read in (a word's
    features are its mean over the drawn contexts) and the words tau is taken over (within each subset). A chain is
    (model label, "x" for the SAE codes or "x_raw" for the raw activations); `pairs` maps a name to (chain a,
    chain b); `scales` maps a chain to its RidgePath's scale. A hand loop: scipy.stats.bootstrap resamples one
    level of units, not three. Returns {pair name: {subset: {delta, ci95, p_value, n, ...}}}: p_value the two-sided
    bootstrap p of "no difference" (twice the smaller share of draws on either side of 0). `show_progress`: a
    progress bar (the stage's; the calibration worlds call this thousands of times without one)."""
    from scipy.stats import kendalltau

    from irm.regression import RidgeRefits
    from irm.runtime import one_blas_thread, progress

    true = np.asarray(true, dtype=np.float64)
    chains = sorted({c for pair in pairs.values() for c in pair})
    ids = np.unique(features[chains[0][0]]["triple"])
    refits, by_triple, items = {}, {}, {}
    for label, key in chains:
        f = features[label]
        items[(label, key)] = _items(f, key)
        if n_resamples:  # (no draws, e.g. the calibration's tau worlds: no Gram products to build)
            refits[(label, key)] = RidgeRefits(f[key], f["y"], multiple * scales[(label, key)], items[(label, key)][0])
        by_triple[(label, key)] = _rows_by_triple(np.asarray(f["triple"]), ids)
    n_contexts = int(max(it[2].max() for it in items.values())) + 1
    subsets = {name: np.flatnonzero(m) for name, m in masks.items()}
    draws = {(c, s): np.full(n_resamples, np.nan) for c in chains for s in subsets}
    rng = np.random.default_rng(seed)
    with one_blas_thread():  # thousands of small solves: one BLAS thread is 2.5x faster here on 2 cores
        for i in progress(range(n_resamples), desc="control: bootstrap of triples, contexts and words", unit="draw",
                          disable=not show_progress):
            picked = rng.integers(0, len(ids), len(ids))
            context_weight = np.bincount(rng.integers(0, n_contexts, n_contexts), minlength=n_contexts)
            words_drawn = {s: rng.choice(idx, size=len(idx)) for s, idx in subsets.items() if len(idx) > 2}
            word_pred = np.empty((len(chains), len(true)))
            for j, c in enumerate(chains):
                item_pred = refits[c].predict(by_triple[c][picked].ravel())
                _, word_of_item, context_of_item = items[c]
                weight = context_weight[context_of_item].astype(np.float64)
                with np.errstate(invalid="ignore", divide="ignore"):
                    word_pred[j] = (np.bincount(word_of_item, weights=weight * item_pred, minlength=len(true))
                                    / np.bincount(word_of_item, weights=weight, minlength=len(true)))
            for s, drawn in words_drawn.items():
                for c, tau in zip(chains, kendall_taus(true[drawn], word_pred[:, drawn])):
                    draws[(c, s)][i] = tau
    out: dict = {}
    for name, (a, b) in pairs.items():
        out[name] = {}
        for s, idx in subsets.items():
            ta = kendalltau(true[idx], features[a[0]]["pred" + a[1][1:]][idx]).statistic if len(idx) > 2 else np.nan
            tb = kendalltau(true[idx], features[b[0]]["pred" + b[1][1:]][idx]).statistic if len(idx) > 2 else np.nan
            delta = float(ta - tb) if np.isfinite(ta) and np.isfinite(tb) else None
            diff = draws[(a, s)] - draws[(b, s)]
            diff = diff[np.isfinite(diff)]
            ci = ([float(v) for v in np.percentile(diff, [2.5, 97.5])]
                  if delta is not None and len(diff) >= max(20, n_resamples // 2) else None)
            p = (min(1.0, 2 * min(1 + int((diff <= 0).sum()), 1 + int((diff >= 0).sum())) / (1 + len(diff)))
                 if ci is not None else None)
            out[name][s] = {"delta": delta, "ci95": ci, "p_value": p, "n": int(len(idx)), "n_triples": int(len(ids)),
                            "n_contexts": n_contexts, "n_resamples": int(n_resamples), "penalty_multiple": multiple,
                            "method": "bootstrap of triples (R refitted), contexts and words, paired across the "
                                      "chains; percentile interval"}
    return out


def word_moves(words: Sequence[str], true, tuned, base, heldout: set[str], z: float = 3.0) -> tuple[list, dict]:
    """Per word, the two reconstructed values (on the lexicon's [-4, 4] scale) and the move tuned - base; a word
    `moved` when its move is more than `z` robust standard deviations (1.4826 x median absolute deviation of all
    moves) from the median move, and moved `toward` the training reward when the tuned value is closer to the true
    one than the base value (else `away`). Returns (rows sorted by |move|, summary with a sign test of toward vs
    away over every word)."""
    from scipy.stats import binomtest

    true, tuned, base = (np.asarray(v, dtype=np.float64) for v in (true, tuned, base))
    move = tuned - base
    centre = float(np.median(move))
    scale = 1.4826 * float(np.median(np.abs(move - centre)))
    moved = np.abs(move - centre) > z * scale if scale > 0 else np.abs(move - centre) > 0
    closer = np.abs(true - tuned) - np.abs(true - base)
    direction = np.where(closer < 0, "toward", np.where(closer > 0, "away", "same"))
    rows = [{"word": w, "true": float(t), "base": float(b), "tuned": float(u), "move": float(m),
             "moved": bool(mv), "direction": str(d), "heldout": w in heldout}
            for w, t, b, u, m, mv, d in zip(words, true, base, tuned, move, moved, direction)]
    rows.sort(key=lambda r: -abs(r["move"] - centre))
    n_toward, n_away = int((closer < 0).sum()), int((closer > 0).sum())
    summary = {
        "threshold": float(z * scale), "z": z, "median_move": centre, "n_words": len(rows),
        "n_moved": int(moved.sum()),
        "n_moved_toward": int((moved & (closer < 0)).sum()), "n_moved_away": int((moved & (closer > 0)).sum()),
        "n_toward": n_toward, "n_away": n_away,
        "toward_fraction": n_toward / (n_toward + n_away) if n_toward + n_away else None,
        "sign_test_p": float(binomtest(n_toward, n_toward + n_away).pvalue) if n_toward + n_away else None,
        "moved_on": "each model's R output mapped by its own percentiles onto the lexicon's scale (-4 and +4 at the "
                    "10th and 90th by default), not clipped",
    }
    return rows, summary


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


def penalty(features: dict, cc) -> tuple[dict, float]:
    """Every chain's RidgePath (rows grouped by triple for leave-one-out) and the one penalty multiple all chains
    use: the grid value with the least summed leave-one-triple-out error (`irm.regression.shared_multiple`)."""
    from irm.regression import RidgePath, shared_multiple

    keys = ("x", "x_raw") if cc.raw else ("x",)
    paths = {(label, key): RidgePath(f[key], cc.ridge_alphas, f["triple"])
             for label, f in features.items() for key in keys}
    return paths, shared_multiple(list(paths.values()), [features[label]["y"] for label, _ in paths])


def chain(features: dict, paths: dict, label: str, multiple: float, true: np.ndarray, masks: dict,
          permutations: int, seed: int) -> dict:
    """The chain on one model's features, at the shared penalty: R (closed-form ridge) on the codes, its per-word
    predictions and taus, the permutation null; R on the raw activations and its taus (when its path is given)."""
    f = features[label]
    path = paths[(label, "x")]
    w, b, _ = path.fit(f["y"], multiple)
    pred = f["words"] @ w + b
    out = {"tau": taus(true, pred, masks), "ridge_alpha": multiple, "predicted": pred,
           "train_r2": _r2(f["y"], f["x"] @ w + b)}
    out["permutation"] = permutation_null(path, multiple, f["y"], f["triple"], f["words"], true, masks, out["tau"],
                                          permutations, seed)
    if (label, "x_raw") in paths:
        w_raw, b_raw, _ = paths[(label, "x_raw")].fit(f["y"], multiple)
        out["raw_predicted"] = f["words_raw"] @ w_raw + b_raw
        out["raw_tau"] = taus(true, out["raw_predicted"], masks)
        out["raw_ridge_alpha"] = multiple
    return out


def _r2(y, pred) -> float:
    y, pred = np.asarray(y), np.asarray(pred)
    ss = float(((y - y.mean()) ** 2).sum())
    return 1.0 - float(((y - pred) ** 2).sum()) / ss if ss > 0 else float("nan")


DELTA_SUBSETS = ("all", "heldout")


def word_subsets(words: Sequence[str], true: np.ndarray, heldout: set[str], seen: set[str]) -> dict:
    """The lexicon stage's subsets (irm.lexicon.subset_masks) and `unseen`: the words no triple used. R is trained
    on the triples' words with their signs as targets, so on a seen word it can read back the label it memorised
    from the word's identity (measured in the calibration harness: tau 0.1-0.2 and "supported" in a third of the
    worlds whose activations carry no sentiment at all); only unseen words test what R learned about sentiment."""
    from irm.lexicon import subset_masks

    masks = subset_masks(words, true, heldout, seen)
    return {**masks, "unseen": ~masks["seen"]}


def compare(features: dict, words: Sequence[str], true: np.ndarray, heldout: set[str], seen: set[str], results: dict,
            paths: dict, multiple: float, cc, percentiles: Sequence[float], seed: int,
            show_progress: bool = False) -> tuple[dict, list]:
    """control.json's comparisons of the chains: delta_tau per subset and SAE vs raw per model (both from one
    bootstrap, `resampled_deltas`), per-word moves."""
    from irm.lexicon import subset_masks

    masks = subset_masks(words, true, heldout, seen)
    preds = {label: {**features[label], "pred": r["predicted"], "pred_raw": r.get("raw_predicted")}
             for label, r in results.items()}
    pairs = {"delta_tau": (("tuned", "x"), ("base", "x"))}
    pairs.update({f"sae_vs_raw:{label}": ((label, "x"), (label, "x_raw")) for label, r in results.items()
                  if "raw_predicted" in r})
    scales = {c: p.scale for c, p in paths.items()}
    deltas = resampled_deltas(preds, true, {name: masks[name] for name in DELTA_SUBSETS}, scales, multiple, pairs,
                              cc.bootstrap, seed, show_progress)
    sae_vs_raw = {name.split(":", 1)[1]: {"all": d["all"]} for name, d in deltas.items() if name != "delta_tau"}
    recon = {label: affine(r["predicted"], percentiles) for label, r in results.items()}
    rows, moves = word_moves(words, true, recon["tuned"], recon["base"], heldout, cc.move_z)
    moves["top"] = rows[: cc.top_words]
    return {"delta_tau": deltas["delta_tau"], "sae_vs_raw": sae_vs_raw, "per_word": moves}, rows


def analyse(features: dict, words: Sequence[str], true: np.ndarray, heldout: set[str], seen: set[str], cc,
            percentiles: Sequence[float], seed: int, show_progress: bool = False) -> tuple[dict, list]:
    """Everything control.json says about the two chains, from each model's features (`read_features`): per model
    the taus, the permutation null and the raw-activation taus, all at one penalty (`penalty`); delta_tau, SAE vs
    raw and the per-word moves. Returns (that dict, every word's row of control_words.csv)."""
    from irm.lexicon import subset_masks

    masks = word_subsets(words, true, heldout, seen)
    paths, multiple = penalty(features, cc)
    results = {label: chain(features, paths, label, multiple, true, masks, cc.permutations, seed)
               for label in MODELS}
    comparison, rows = compare(features, words, true, heldout, seen, results, paths, multiple, cc, percentiles, seed,
                               show_progress)
    per_model = {label: {k: v for k, v in r.items() if k not in ("predicted", "raw_predicted")}
                 for label, r in results.items()}
    return {**per_model, **comparison, "penalty": {
        "multiple": multiple, "rule": "one ridge penalty for every chain (both models, codes and raw): the grid "
                                      "multiple of the mean squared singular value with the least summed "
                                      "leave-one-triple-out error"}}, rows


def affine(raw, percentiles: Sequence[float]) -> np.ndarray:
    """irm.lexicon.rescale's affine map (percentiles onto -4 and +4) without its clipping: words clipped to +-4 by
    both models would show no move however far apart the models put them, and would shrink the moves' spread."""
    from irm.lexicon import BOUND, rescale

    lo, hi = rescale(raw, percentiles)[1]["raw_at_percentiles"]
    raw = np.asarray(raw, dtype=np.float64)
    return np.zeros_like(raw) if hi <= lo else -BOUND + 2 * BOUND * (raw - lo) / (hi - lo)


# ---------------------------------------------------------------------------------------------------------------
# The stage


BASE_RUN = "control/base-run"


def base_run_saes(cfg: RunConfig, model, tokenizer, layers: list[int], expansion: int) -> dict:
    """SAEs trained on M_base's own activations (control.base_saes: base): the cache and sae stages themselves, run
    on a sub-run directory whose "tuned policy" is M_base, at the chosen layers; both resume and skip as stages do."""
    import dataclasses

    from irm.activations import cache as cache_stage
    from irm.sae.splice import load_saes
    from irm.sae import stage as sae_stage
    from irm.stages import artifact, is_done, open_run_dir

    sub = dataclasses.replace(cfg, run_dir=str(Path(cfg.run_dir) / BASE_RUN),
                              cache=dataclasses.replace(cfg.cache, layers=list(layers)))
    open_run_dir(sub)
    policy = artifact(sub.run_dir, "policy")
    if not (policy / "config.json").is_file():
        from irm.artifacts import atomic_dir

        with atomic_dir(policy) as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
    for name, module in (("cache", cache_stage), ("sae", sae_stage)):
        if not is_done(sub, name):
            module.run(sub)
    return load_saes(sub.run_dir, layers, model, cfg.cache.site, expansion)


def run(cfg: RunConfig) -> dict:
    from irm.sae.splice import load_saes
    from irm.divergence import chosen_layers
    from irm.lexicon import heldout_and_seen, lexicon_words, unseen_contexts, word_items
    from irm.models import load_model, load_tuned, n_layers
    from irm.reward import reference_lexicon
    from irm.runtime import start
    from irm.stages import mark_done
    from irm.triples import TRIPLES_JSON, read_triples

    cc = cfg.control  # its ranges: irm.config.validate, before any stage runs
    device = start(cfg.seed, cfg.device)
    root = Path(cfg.run_dir)
    triples = read_triples(root)
    info = read_json(root / TRIPLES_JSON)
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
