"""Calibration of the control's findings (irm.stages.control -> irm.findings): delta_tau, the lexicon tau against its
permutation null, held-out generalisation and SAE vs raw, in simulated worlds pushed through `irm.chains.analyse`
and the findings' own row functions (`delta_tau_row`, `lexicon_rows`, `heldout_row`).

A world: lexicon words with true values; each model "knows" a word's sentiment as a value along one direction of a
small activation space (the base model's knowledge is the lexicon plus noise; the tuned model's moves a planted
fraction `effect` of the way to the lexicon), plus a word identity vector; a word read in a context adds the
context's vector and noise. An SAE-like dictionary (ReLU of a random encoder) gives the codes. Triples (a positive,
a neutral and a negative word in one context) give the regression rows through `irm.delta_rows.rows_of`, the function the
deltas stage uses; the words in their contexts give the items. Some words are held out of every triple.

Null families, where the claim is false:
- delta_tau: RLHF changed nothing about sentiment, but the two chains differ by (a) each chain's own dictionary,
  (b) a sentiment-irrelevant shift of the tuned model's activations, (c) a sentiment-irrelevant linear map of them;
- lexicon tau and held-out tau: the activations carry no sentiment (isotropic, or with a 1/k spectrum);
- SAE vs raw: the codes are a linear view of the activations exactly as noisy as the raw ones (isotropic, or an
  overcomplete map).
Planted families at three effect sizes each, where the claim is true.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from irm.calibration.core import Family, Sizes

D_LATENT, N_FEATURES, THRESHOLD = 12, 24, 0.4
KNOWLEDGE_NOISE = 2.0  # sd of the base model's error about a word's value, on the lexicon's [-4, 4] scale
DEFAULTS = {"words": 160, "triples": 80, "contexts": 2, "bootstrap": 150, "permutations": 79}


def _size(sizes: Sizes, key: str) -> int:
    return int(sizes.get(key, DEFAULTS[key]))


def _encoder(rng: np.random.Generator, d_in: int = D_LATENT) -> np.ndarray:
    e = rng.normal(size=(N_FEATURES, d_in))
    return e / np.linalg.norm(e, axis=1, keepdims=True)


def _codes(enc: np.ndarray, a: np.ndarray) -> np.ndarray:
    return np.maximum(a @ enc.T - THRESHOLD, 0.0)


def simulate(rng: np.random.Generator, sizes: Sizes, *, effect: float = 0.0, signal: float = 3.0,
             tuned_map: str = "same", spectrum: str = "isotropic", raw_view: str = "relu",
             view_noise: tuple[float, float] = (0.0, 0.0)):
    """One world: (features {tuned, base} as irm.chains' analysis reads them, words, true values, held-out words,
    seen words). `effect`: the fraction of the way the tuned model's word values move from the base model's to the
    lexicon's; `signal`: the size of the sentiment direction (0: the activations carry no sentiment); `tuned_map`:
    "same" (one dictionary, same activations), "dictionary" (the tuned chain's own dictionary), "shift" (a shift of
    the tuned activations orthogonal to sentiment), "linear" (a linear map that leaves the sentiment direction
    alone); `spectrum`: "isotropic" or "1/k" identity vectors; `raw_view`: "relu" (codes = the dictionary's ReLU codes
    of the raw activations), "linear" / "overcomplete" (codes and raw are two linear views of the activations with
    independent noise of sizes `view_noise` = (codes, raw))."""
    w = _draw_world(rng, sizes, effect, tuned_map, spectrum, raw_view)
    features = {label: _model_features(rng, w, label, signal, tuned_map, view_noise) for label in ("tuned", "base")}
    return features, w["words"], w["true"], w["heldout"], w["seen"]


def _draw_world(rng: np.random.Generator, sizes: Sizes, effect: float, tuned_map: str, spectrum: str,
                raw_view: str) -> dict:
    """Everything of one world but the models' activations: words, values, identity, context and noise vectors,
    the triples, the dictionaries and the views (drawn in this order from `rng`)."""
    n_words, n_triples, n_contexts = _size(sizes, "words"), _size(sizes, "triples"), _size(sizes, "contexts")
    true = np.round(rng.uniform(0.5, 4.0, n_words) * rng.choice([-1.0, 1.0], n_words), 1)
    words = [f"w{i:05d}" for i in range(n_words)]
    heldout_idx = rng.permutation(n_words)[: max(3, n_words // 5)]
    seen_pool = np.setdiff1d(np.arange(n_words), heldout_idx)
    base_value = true + KNOWLEDGE_NOISE * rng.normal(size=n_words)
    u = rng.normal(size=D_LATENT)
    u /= np.linalg.norm(u)
    scale = 1.0 / np.sqrt(np.arange(1, D_LATENT + 1)) * np.sqrt(D_LATENT / np.sum(1.0 / np.arange(1, D_LATENT + 1)))
    basis = np.linalg.qr(rng.normal(size=(D_LATENT, D_LATENT)))[0]
    spread = (basis * scale) @ basis.T if spectrum == "1/k" else np.eye(D_LATENT)

    def noise(n: int, sd: float) -> np.ndarray:
        return sd * rng.normal(size=(n, D_LATENT)) @ spread

    w = {"n_triples": n_triples, "true": true, "words": words, "heldout": {words[i] for i in heldout_idx},
         "values": {"base": base_value, "tuned": base_value + effect * (true - base_value)}, "u": u,
         "identity": noise(n_words, 0.8)}
    n_neutral = max(10, n_triples // 4)
    w.update(neutral=noise(n_neutral, 0.8), context=noise(n_contexts, 0.5), triple_context=noise(n_triples, 0.5))
    pos_pool, neg_pool = seen_pool[true[seen_pool] > 0], seen_pool[true[seen_pool] < 0]
    w.update(pos=rng.choice(pos_pool, n_triples), neg=rng.choice(neg_pool, n_triples),
             neu=rng.integers(0, n_neutral, n_triples))
    w["eps"] = {k: noise(n, 0.3) for k, n in (("pos", n_triples), ("neu", n_triples), ("neg", n_triples),
                                               ("items", n_words * n_contexts))}
    w.update(word_of_item=np.repeat(np.arange(n_words), n_contexts),
             context_of_item=np.tile(np.arange(n_contexts), n_words))
    perp = np.eye(D_LATENT) - np.outer(u, u)
    shift = perp @ rng.normal(size=D_LATENT)
    w["shift"] = shift * (1.0 / np.linalg.norm(shift))
    w["linear"] = np.eye(D_LATENT) + 0.4 * perp @ (rng.normal(size=(D_LATENT, D_LATENT)) / np.sqrt(D_LATENT)) @ perp
    w["encoders"] = {"base": _encoder(rng)}
    w["encoders"]["tuned"] = _encoder(rng) if tuned_map == "dictionary" else w["encoders"]["base"]
    w["views"] = {}
    if raw_view != "relu":
        width = N_FEATURES if raw_view == "overcomplete" else D_LATENT
        w["views"] = {"x": rng.normal(size=(width, D_LATENT)) / np.sqrt(D_LATENT),
                      "x_raw": np.linalg.qr(rng.normal(size=(D_LATENT, D_LATENT)))[0]}
    w["seen"] = {words[i] for i in set(w["pos"].tolist()) | set(w["neg"].tolist())}
    return w


def _model_features(rng: np.random.Generator, w: dict, label: str, signal: float, tuned_map: str,
                    view_noise: tuple[float, float]) -> dict:
    """One model's activations in world `w` (its word values along the sentiment direction, identity, context and
    noise; the tuned model's shifted or mapped by `tuned_map`), read as the chain reads them: regression rows of
    the triples (`irm.delta_rows.rows_of`), items and per-word means, through the codes and the raw view."""
    import torch

    from irm.delta_rows import rows_of
    from irm.readout import per_word

    def activations(word_values: np.ndarray, ident: np.ndarray, ctx: np.ndarray, e: np.ndarray) -> np.ndarray:
        a = signal * (word_values / 4.0)[:, None] * w["u"] + ident + ctx + e
        if label == "tuned" and tuned_map == "shift":
            a = a + w["shift"]
        elif label == "tuned" and tuned_map == "linear":
            a = a @ w["linear"].T
        return a

    v, n_triples, eps, items = w["values"][label], w["n_triples"], w["eps"], w["word_of_item"]
    acts = {
        "pos": activations(v[w["pos"]], w["identity"][w["pos"]], w["triple_context"], eps["pos"]),
        "neu": activations(np.zeros(n_triples), w["neutral"][w["neu"]], w["triple_context"], eps["neu"]),
        "neg": activations(v[w["neg"]], w["identity"][w["neg"]], w["triple_context"], eps["neg"]),
        "items": activations(v[items], w["identity"][items], w["context"][w["context_of_item"]], eps["items"]),
    }
    if w["views"]:
        codes, raw = ({k: (a + sd * rng.normal(size=a.shape)) @ w["views"][key].T for k, a in acts.items()}
                      for key, sd in zip(("x", "x_raw"), view_noise))
    else:
        codes, raw = {k: _codes(w["encoders"][label], a) for k, a in acts.items()}, acts
    rows = rows_of(np.arange(n_triples), *(torch.from_numpy(codes[k][:, None]) for k in ("pos", "neu", "neg")))
    raw_rows = rows_of(np.arange(n_triples), *(torch.from_numpy(raw[k][:, None]) for k in ("pos", "neu", "neg")))
    n_words = len(w["words"])
    return {"x": rows["x"].numpy(), "x_raw": raw_rows["x"].numpy(), "y": rows["y"].numpy(),
            "sign": rows["sign"].numpy(), "triple": rows["triple"].numpy(),
            "items": codes["items"], "items_raw": raw["items"], "word_of_item": items,
            "context_of_item": w["context_of_item"],
            "words": per_word(codes["items"], items, n_words), "words_raw": per_word(raw["items"], items, n_words)}


def analysed(rng: np.random.Generator, sizes: Sizes, **world) -> dict:
    """control.json's analysis of one simulated world, by `irm.chains.analyse` itself."""
    from irm.config import ControlConfig
    from irm.chains import analyse

    cc = ControlConfig(permutations=_size(sizes, "permutations"), bootstrap=_size(sizes, "bootstrap"))
    features, words, true, heldout, seen = simulate(rng, sizes, **world)
    seed = int(rng.integers(2 ** 31))
    return analyse(features, words, true, heldout, seen, cc, (10.0, 90.0), seed)[0]


def _row(kind: str, c: dict) -> dict:
    from irm.findings import delta_tau_row, heldout_row, lexicon_rows

    if kind == "delta_tau":
        return delta_tau_row(c)
    if kind == "heldout_tau":
        return heldout_row(c)
    rows = lexicon_rows(c)
    return rows[0] if kind == "lexicon_tau" else rows[1]


def _number(kind: str, c: dict):
    if kind == "delta_tau":
        return c["delta_tau"]["all"]["delta"]
    if kind == "sae_vs_raw":
        return c["sae_vs_raw"]["tuned"]["all"]["delta"]
    return c["tuned"]["tau"]["heldout" if kind == "heldout_tau" else "unseen"]["tau"]


NO_BOOTSTRAP = ("lexicon_tau", "heldout_tau")  # rows read the taus and the permutation null, not the bootstrap


def world_of(kind: str, **world) -> Callable[[np.random.Generator, Sizes], tuple]:
    """A Family's world: simulate, analyse, and read the finding's row (its verdict and its number). The tau rows'
    worlds skip delta_tau's bootstrap, which they do not read (its generator is its own: the same taus, nulls and
    verdicts, at a third of the cost)."""

    def draw(rng: np.random.Generator, sizes: Sizes) -> tuple:
        c = analysed(rng, {**sizes, "bootstrap": 0} if kind in NO_BOOTSTRAP else sizes, **world)
        return _row(kind, c)["verdict"], _number(kind, c)

    return draw


NULL_DELTA = {"separate dictionaries": {"tuned_map": "dictionary"},
              "sentiment-irrelevant shift": {"tuned_map": "shift"},
              "sentiment-irrelevant linear map": {"tuned_map": "linear"}}
NULL_TAU = {"no sentiment in the activations": {"signal": 0.0},
            "no sentiment, 1/k spectrum": {"signal": 0.0, "spectrum": "1/k"}}
NULL_RAW = {"codes an equally noisy linear view": {"raw_view": "linear", "view_noise": (0.5, 0.5)},
            "codes an equally noisy overcomplete view": {"raw_view": "overcomplete", "view_noise": (0.5, 0.5)}}
UNIT = {"delta_tau": "delta_tau", "lexicon_tau": "Kendall tau (words no triple used)",
        "heldout_tau": "Kendall tau (held-out words)", "sae_vs_raw": "tau(codes) - tau(raw)"}
# Planted families' `effect` is the world's parameter (named in the family); the harness reports power against the
# finding's own number measured in those worlds (the unit above), which is what a reader compares with a run.


def _families() -> list[Family]:
    out = []
    for i, (name, world) in enumerate(NULL_DELTA.items()):
        out.append(Family("delta_tau", name, 0.0, world_of("delta_tau", **world), UNIT["delta_tau"],
                          "fast" if i == 0 else "slow"))
    for effect in (0.25, 0.5, 1.0):
        out.append(Family("delta_tau", "planted move toward the lexicon", effect,
                          world_of("delta_tau", effect=effect), UNIT["delta_tau"]))
    for kind in ("lexicon_tau", "heldout_tau"):
        for i, (name, world) in enumerate(NULL_TAU.items()):
            out.append(Family(kind, name, 0.0, world_of(kind, **world), UNIT[kind], "fast" if i == 0 else "slow"))
        for effect in (0.5, 1.0, 2.0):
            out.append(Family(kind, "planted sentiment", effect, world_of(kind, signal=effect),
                              UNIT[kind]))
    for i, (name, world) in enumerate(NULL_RAW.items()):
        out.append(Family("sae_vs_raw", name, 0.0, world_of("sae_vs_raw", **world), UNIT["sae_vs_raw"],
                          "fast" if i == 0 else "slow"))
    for effect in (0.5, 1.0, 2.0):
        out.append(Family("sae_vs_raw", "codes less noisy than raw", effect,
                          world_of("sae_vs_raw", raw_view="linear", view_noise=(0.5, 0.5 + effect)),
                          UNIT["sae_vs_raw"]))
    return out


FAMILIES: list[Family] = _families()
