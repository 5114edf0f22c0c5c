"""The base-model control's statistics (irm.stages.control): the paper's chain refitted by closed-form ridge for the tuned
and the base model, its permutation null and raw-activation chain, delta_tau with its paired bootstrap interval and
the per-word moves. The control stage and the calibration harness's simulated worlds run the same `analyse`."""

from __future__ import annotations

from typing import Sequence

import numpy as np


MODELS = ("tuned", "base")


def flipped_signs(triple: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A row multiplier of +-1, -1 on both rows of a random half of the triples: a triple's positive row gets
    -Delta+ and its negative row +|Delta-|. Magnitudes and the triples' pairing are kept; only which variant is
    'positive' is shuffled across triples."""
    ids, inverse = np.unique(triple, return_inverse=True)
    flip = rng.random(len(ids)) < 0.5
    return np.where(flip[inverse], -1.0, 1.0)


def kendall_taus(true, predicted_KN) -> np.ndarray:
    """Kendall tau-b of `true` against each row of `predicted_KN`, NaN entries left out as scipy.stats.kendalltau's
    nan_policy "omit" does (a NaN in `true` drops that word for every row); NaN where tau-b is undefined (fewer than
    two words, or one side constant), as scipy gives. Every row without a NaN at once (`_tau_b`): the bootstraps,
    nulls and calibration worlds take it thousands of times, where scipy row by row spent most of its time in its
    per-call overhead (and all pairs, used up to 200 words before, grows as n^2); a row with a NaN goes alone, on its
    own words."""
    true = np.asarray(true, dtype=np.float64)
    pred = np.atleast_2d(np.asarray(predicted_KN, dtype=np.float64))
    if pred.ndim != 2 or pred.shape[1] != len(true):
        raise ValueError(f"predicted_KN has shape {pred.shape}, not (rows, {len(true)})")
    if np.isnan(true).any():
        keep = ~np.isnan(true)
        true, pred = true[keep], pred[:, keep]
    gaps = np.isnan(pred).any(axis=1)
    if not gaps.any():
        return _tau_b(true, pred)
    out = np.empty(len(pred))
    out[~gaps] = _tau_b(true, pred[~gaps])
    for k in np.flatnonzero(gaps):
        finite = ~np.isnan(pred[k])
        out[k] = _tau_b(true[finite], pred[k, finite][None])[0]
    return out


def _tau_b(x: np.ndarray, y_KN: np.ndarray) -> np.ndarray:
    """Kendall tau-b of x (n,) against each row of y_KN (K, n), neither with a NaN, in scipy.stats.kendalltau's
    arithmetic: (n0 - n1 - n2 + n3 - 2 D) / sqrt(n0 - n1) / sqrt(n0 - n2), n0 the pairs, n1 those tied in x, n2 in y,
    n3 in both, D the discordant pairs: the inversions of x's ranks with the words in (y, x) order (`_inversions`).
    No loop over rows: one argsort of y, one sort of (y rank, x rank) keys, log2(n) sorts in `_inversions`."""
    K, n = y_KN.shape
    out = np.full(K, np.nan)
    if K == 0 or n < 2:
        return out
    tot = n * (n - 1) // 2
    ox = np.argsort(x)
    xs = x[ox]
    new_x = np.empty((1, n), dtype=bool)
    new_x[0, 0] = True
    np.not_equal(xs[1:], xs[:-1], out=new_x[0, 1:])
    x_tie = int(_tied_pairs(new_x)[0])
    if x_tie == tot:
        return out
    n_x = int(new_x.sum())
    dt = np.int32 if (K * n + 1) * n_x < 2**31 else np.int64
    rank_x = np.empty(n, dtype=dt)
    rank_x[ox] = np.cumsum(new_x[0], dtype=dt) - 1
    oy = np.argsort(y_KN, axis=1)
    ys = y_KN.ravel()[oy + np.arange(0, K * n, n)[:, None]]
    new_y = np.empty((K, n), dtype=bool)
    new_y[:, 0] = True
    np.not_equal(ys[:, 1:], ys[:, :-1], out=new_y[:, 1:])
    y_tie = _tied_pairs(new_y)
    run_y = np.cumsum(new_y.ravel(), dtype=dt).reshape(K, n)  # y's tie groups numbered (across rows: any order will do)
    run_y *= n_x
    key = run_y + rank_x[oy]
    key.sort(axis=1)  # y's order, ties in y by x
    seq = key - run_y  # x's ranks in that order
    both_tie = np.zeros(K, dtype=np.int64)
    if x_tie and y_tie.any():
        new_y[:, 1:] |= seq[:, 1:] != seq[:, :-1]
        both_tie = _tied_pairs(new_y)
    con_minus_dis = tot - x_tie - y_tie + both_tie - 2 * _inversions(seq, n_x)
    ok = y_tie < tot
    out[ok] = np.minimum(1.0, np.maximum(-1.0, con_minus_dis[ok] / np.sqrt(tot - x_tie) / np.sqrt(tot - y_tie[ok])))
    return out


def _tied_pairs(new_KN: np.ndarray) -> np.ndarray:
    """Per row, the pairs of equal entries, sum of t(t-1)/2 over runs of equal entries, from the mask of where each
    run starts in rows sorted along axis 1 (column 0 True)."""
    K, n = new_KN.shape
    if new_KN.all():
        return np.zeros(K, dtype=np.int64)
    starts = np.flatnonzero(new_KN)
    t = np.empty(len(starts), dtype=np.int64)
    np.subtract(starts[1:], starts[:-1], out=t[:-1])
    t[-1] = K * n - starts[-1]
    return np.add.reduceat(t * (t - 1) // 2, starts.searchsorted(np.arange(0, K * n, n)))


def _inversions(seq_KN: np.ndarray, n_values: int) -> np.ndarray:
    """Per row of seq_KN (K, n), ints in [0, n_values): the pairs i < j with seq[i] > seq[j]. Bottom-up merge sort
    of all rows at once: at level l each row is cut into blocks of 2s (s = 2^l) whose halves are sorted; one sort
    per row of the keys block x span + 2 x value + (1 in the right half) merges every block, and a right-half
    element with index j in its half that lands at place p of its block has p - j left-half elements at or below
    it (ties: left first), so s + j - p above it. log2(n) sorts of K x n keys (numpy's quicksort measured faster
    here than its run-merging stable sort); int32 keys where they fit."""
    K, n = seq_KN.shape
    levels = int(n - 1).bit_length()
    span = 2 * n_values
    dt = np.int32 if max(n_values, n) * (n + 2) < 2**31 else np.int64
    pos = np.arange(n)
    lev = np.arange(levels)[:, None]
    place = pos & ((2 << lev) - 1)  # place in the block of 2s
    right = (pos >> lev) & 1
    offset = (pos >> (lev + 1)) * span
    step = offset + right  # added to the last level's keys (their offsets, values x 2)
    step[1:] -= offset[:-1]
    step = step.astype(dt)
    inv = np.full(K, int((place * right).sum()), dtype=np.int64)  # s + j over the right halves' elements
    place = place.astype(dt)
    keys = seq_KN.astype(dt) * 2
    for i in range(levels):
        keys += step[i]
        keys.sort(axis=1)
        odd = keys & 1
        inv -= odd @ place[i]
        keys -= odd
    return inv


def taus(true: np.ndarray, predicted: np.ndarray, masks: dict) -> dict:
    """Kendall tau (irm.readout.kendall) of each subset."""
    from irm.readout import kendall

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

    from irm.ridge import RidgeRefits
    from irm.runtime import one_blas_thread, progress, thread_map

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
    # Every draw's random numbers first, in the order one loop would draw them; the draws then run on
    # `worker_threads()` threads (their solves and sorts release the GIL), each writing only its own index.
    plan = []
    for _ in range(n_resamples):
        picked = rng.integers(0, len(ids), len(ids))
        context_weight = np.bincount(rng.integers(0, n_contexts, n_contexts), minlength=n_contexts)
        plan.append((picked, context_weight,
                     {s: rng.choice(idx, size=len(idx)) for s, idx in subsets.items() if len(idx) > 2}))

    def draw(i: int) -> None:
        picked, context_weight, words_drawn = plan[i]
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

    with one_blas_thread():  # thousands of small solves: one BLAS thread each is 2.5x faster here on 2 cores
        for _ in progress(thread_map(draw, range(n_resamples)), total=n_resamples, unit="draw",
                          desc="control: bootstrap of triples, contexts and words", disable=not show_progress):
            pass
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


def penalty(features: dict, cc) -> tuple[dict, float]:
    """Every chain's RidgePath (rows grouped by triple for leave-one-out) and the one penalty multiple all chains
    use: the grid value with the least summed leave-one-triple-out error (`irm.ridge.shared_multiple`)."""
    from irm.ridge import RidgePath, shared_multiple

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
    """The lexicon stage's subsets (irm.readout.subset_masks) and `unseen`: the words no triple used. R is trained
    on the triples' words with their signs as targets, so on a seen word it can read back the label it memorised
    from the word's identity (measured in the calibration harness: tau 0.1-0.2 and "supported" in a third of the
    worlds whose activations carry no sentiment at all); only unseen words test what R learned about sentiment."""
    from irm.readout import subset_masks

    masks = subset_masks(words, true, heldout, seen)
    return {**masks, "unseen": ~masks["seen"]}


def compare(features: dict, words: Sequence[str], true: np.ndarray, heldout: set[str], seen: set[str], results: dict,
            paths: dict, multiple: float, cc, percentiles: Sequence[float], seed: int,
            show_progress: bool = False) -> tuple[dict, list]:
    """control.json's comparisons of the chains: delta_tau per subset and SAE vs raw per model (both from one
    bootstrap, `resampled_deltas`), per-word moves."""
    from irm.readout import subset_masks

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
    """irm.readout.rescale's affine map (percentiles onto -4 and +4) without its clipping: words clipped to +-4 by
    both models would show no move however far apart the models put them, and would shrink the moves' spread."""
    from irm.readout import BOUND, rescale

    lo, hi = rescale(raw, percentiles)[1]["raw_at_percentiles"]
    raw = np.asarray(raw, dtype=np.float64)
    return np.zeros_like(raw) if hi <= lo else -BOUND + 2 * BOUND * (raw - lo) / (hi - lo)
