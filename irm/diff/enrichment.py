"""Are the latents RLHF added about the reward? (README "Model diffing", issue 27.) Each crosscoder latent's share of
its activation that falls on the reward's words, over every cached row (the diff stage's choice: a share says what
a latent fires on, and a reward's words can be rare), and the tests that the tuned-specific latents' shares exceed
the shared latents' (`enrichment_test`) and that latents leaning toward the tuned model have larger shares
(`lean_test`).

A latent's share: s_j = sum_i f_ij m_i / sum_i f_ij over rows i, with f_ij its code (the inference rule)
and m_i = 1 when row i's token is one of the marked words (`word_marks`: the planted words of a planted lexicon,
else every word of the reward's lexicon), so s_j in [0, 1] and a latent blind to the words has about the words' base
rate. The test statistic is the mean share of the tuned-specific latents minus that of the live shared latents,
pooled over layers; its null distribution permutes the "tuned-specific" labels among those latents within each layer
(stratified: layers' shares differ), so the test is exact when, under the null, a layer's latents are exchangeable.
The harness (irm.calibration.diff, finding "diff_enrichment") measures how far that holds."""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np
import torch

PERMUTATIONS = 9999
TOP_WORDS = 5  # words named per tuned-specific latent


@torch.no_grad()
def marked_mass(cc, batches: Iterable[torch.Tensor], token_ids_R: torch.Tensor, marks_R: torch.Tensor,
                track: Sequence[int] = ()) -> dict:
    """Per latent the code mass on marked rows and in all (numpy [F] each), and for the latents `track` their code
    mass per token id ({latent: {token_id: mass}}), over paired raw batches [rows, 2, width] whose rows are, in
    order, those of `token_ids_R` and `marks_R`."""
    marked_F = torch.zeros(cc.d_hidden, dtype=torch.float64)
    mass_F = torch.zeros(cc.d_hidden, dtype=torch.float64)
    track_t = torch.as_tensor(list(track), dtype=torch.long)
    per_token = torch.zeros(len(track_t), int(token_ids_R.max()) + 1 if len(token_ids_R) else 1, dtype=torch.float64)
    start = 0
    for x_BMD in batches:
        codes_BF = cc.encode(x_BMD.to(cc.W_dec.device, cc.W_dec.dtype)).double().cpu()  # the inference rule
        stop = start + codes_BF.shape[0]
        if stop > len(marks_R):
            raise ValueError(f"the batches hold more rows than the {len(marks_R)} marks")
        m_B = marks_R[start:stop].double()
        marked_F += m_B @ codes_BF
        mass_F += codes_BF.sum(dim=0)
        if len(track_t):
            per_token.index_add_(1, token_ids_R[start:stop].long(), codes_BF[:, track_t].t())
        start = stop
    if start != len(marks_R):
        raise ValueError(f"the batches hold {start} rows, the marks {len(marks_R)}")
    tokens = {}
    for row, j in enumerate(track_t.tolist()):
        nz = per_token[row].nonzero().flatten()
        tokens[j] = {int(t): float(per_token[row, t]) for t in nz}
    return {"marked": marked_F.numpy(), "mass": mass_F.numpy(), "tokens": tokens}


def shares(marked_F: np.ndarray, mass_F: np.ndarray) -> np.ndarray:
    """s_j = marked / mass; NaN for a latent that never fired."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(mass_F > 0, marked_F / np.where(mass_F > 0, mass_F, 1.0), np.nan)


def enrichment_test(layers: Sequence[tuple[np.ndarray, np.ndarray]], permutations: int = PERMUTATIONS,
                    seed: int = 0) -> dict:
    """The test of the module docstring over `layers`: per layer (share_F, class_F) with classes of
    irm.diff.scaling.CLASSES. Returns the counts, mean shares, their difference and the one-sided permutation
    p-values (`p_greater`: specific above shared; `p_less`), or None-valued numbers when no latent is
    tuned-specific or none is shared."""
    groups = []
    for share_F, class_F in layers:
        share_F, class_F = np.asarray(share_F, dtype=np.float64), np.asarray(class_F, dtype=object)
        live = np.isfinite(share_F)
        spec, shared = live & (class_F == "tuned-specific"), live & (class_F == "shared")
        if spec.any() or shared.any():
            groups.append((share_F[spec | shared], spec[spec | shared]))
    n_spec = int(sum(s.sum() for _, s in groups))
    n_shared = int(sum((~s).sum() for _, s in groups))
    out = {"tuned_specific": n_spec, "shared": n_shared, "specific_share": None, "shared_share": None,
           "difference": None, "p_greater": None, "p_less": None, "permutations": permutations}
    if n_spec == 0 or n_shared == 0:
        return out

    values = np.concatenate([v for v, _ in groups])

    def stat(flags: np.ndarray) -> float:
        return float(values[flags].mean() - values[~flags].mean())

    flags = np.concatenate([s for _, s in groups])
    observed = stat(flags)
    rng = np.random.default_rng(seed)
    null = np.array([stat(np.concatenate([rng.permutation(s) for _, s in groups])) for _ in range(permutations)])
    out.update(specific_share=float(values[flags].mean()), shared_share=float(values[~flags].mean()),
               difference=observed, **_one_sided(observed, null))
    return out


def _one_sided(observed: float, null: np.ndarray) -> dict:
    """Both one-sided permutation p-values, the observed statistic counted among the draws; draws within 1e-12 of it
    count as ties (sums of equal shares in another order differ by rounding)."""
    n = len(null)
    return {"p_greater": float((1 + (null >= observed - 1e-12).sum()) / (1 + n)),
            "p_less": float((1 + (null <= observed + 1e-12).sum()) / (1 + n))}


def word_marks(token_ids_R: torch.Tensor, tokenizer, words: Iterable[str]) -> torch.Tensor:
    """Per row, whether its token spells one of `words` (lower-cased, surrounding spaces and the tokenizer's space
    marker stripped). Whole tokens only: a word split into sub-word tokens is not marked (the reward's words that a
    tokenizer splits are listed by `split_words`)."""
    words = {w.lower() for w in words}
    ids = torch.unique(token_ids_R).tolist()
    hit = {i for i in ids if token_word(tokenizer, i) in words}
    lookup = torch.zeros(int(token_ids_R.max()) + 1 if len(token_ids_R) else 1, dtype=torch.bool)
    if hit:
        lookup[torch.as_tensor(sorted(hit))] = True
    return lookup[token_ids_R.long()]


def token_word(tokenizer, token_id: int) -> str:
    """The word a single token spells, lower-cased and stripped."""
    return tokenizer.decode([int(token_id)]).strip().lower()


def top_words(tokenizer, per_token: dict[int, float], n: int = TOP_WORDS) -> list[tuple[str, float]]:
    """The `n` words carrying most of a latent's mass, each with its share of the latent's total mass."""
    total = sum(per_token.values()) or 1.0
    by_word: dict[str, float] = {}
    for t, mass in per_token.items():
        w = token_word(tokenizer, t) or repr(tokenizer.decode([t]))
        by_word[w] = by_word.get(w, 0.0) + mass
    return [(w, m / total) for w, m in sorted(by_word.items(), key=lambda kv: -kv[1])[:n]]


def marked_words(reward_cfg) -> tuple[str, list[str]]:
    """(what, words): the planted words of a planted lexicon reward ("planted words"), else every word of the
    reward's reference lexicon ("reward lexicon")."""
    from irm.reward import planted_words, reference_lexicon

    lexicon = reference_lexicon(reward_cfg)
    planted = planted_words(lexicon)
    if planted:
        return "planted words", sorted(planted)
    return "reward lexicon", sorted(w for w, v in lexicon.items() if v)



def lean_test(layers: Sequence[tuple[np.ndarray, np.ndarray]], permutations: int = PERMUTATIONS,
              seed: int = 0) -> dict:
    """A graded reading that needs no tuned-specific latent: do the latents that lean toward the tuned model (their
    relative decoder-norm difference delta, irm.diff.scaling) fire more on the marked words? Per layer (delta_F,
    share_F) over its live latents (finite share), Spearman's rho of delta and share; the statistic is the mean of
    the layers' rhos weighted by their latents, its null permutes the shares within each layer. Returns rho, the
    latents counted and the one-sided permutation p-values (`p_greater`: leaning latents fire more on the words)."""
    from scipy.stats import rankdata

    ranks = []
    for delta_F, share_F in layers:
        delta_F, share_F = np.asarray(delta_F, dtype=np.float64), np.asarray(share_F, dtype=np.float64)
        live = np.isfinite(share_F) & np.isfinite(delta_F)
        if live.sum() >= 3:
            a, b = rankdata(delta_F[live]), rankdata(share_F[live])
            a, b = a - a.mean(), b - b.mean()
            if a @ a > 0 and b @ b > 0:  # a layer whose deltas or shares are all tied has no rank correlation
                ranks.append((a / np.sqrt(a @ a), b / np.sqrt(b @ b)))
    n = sum(len(a) for a, _ in ranks)
    out = {"rho": None, "latents": n, "p_greater": None, "p_less": None, "permutations": permutations}
    if not ranks:
        return out
    weights = np.array([len(a) for a, _ in ranks], dtype=np.float64) / n
    observed = float(sum(w * (a @ b) for w, (a, b) in zip(weights, ranks)))
    rng = np.random.default_rng(seed)
    null = np.zeros(permutations)
    for w, (a, b) in zip(weights, ranks):
        for start in range(0, permutations, 500):  # [chunk, latents] index arrays, a few MB at a time
            stop = min(permutations, start + 500)
            idx = np.argsort(rng.random((stop - start, len(b))), axis=1)
            null[start:stop] += w * (b[idx] @ a)
    out.update(rho=observed, **_one_sided(observed, null))
    return out
