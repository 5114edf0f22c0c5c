"""Comparing two dictionaries of one layer (paper eq. 2, E.1; issue 22): MMCS both ways with the shared pairs, and
its chance level from random dictionaries with the rows' own moments. The dictionaries stage and the calibration
harness's simulated worlds compare with it; the module docstring of irm.stages.dictionaries says why each choice."""

from __future__ import annotations

from typing import NamedTuple

from irm.sae.mmcs import CHUNK_ELEMENTS, METHODS, Pair, as_float64, max_cosines, mmcs, unit_rows

BOOTSTRAP = 1000  # resamples of the small dictionary's features for the max MMCS's interval
# Chance pairs scored one-to-one as well (the Hungarian assignment costs about 4x the max search and carries no
# verdict), and isotropic pairs drawn as a reference beside the activations' chance level.
HUNGARIAN_DRAWS = 5


def random_unit_dictionary(n, width: int, generator=None, moments: "Moments | None" = None, device=None):
    """[n, width] random dictionary rows scaled to unit norm, float64 (`n` a tuple: a batch of dictionaries, [*n,
    width]). Without `moments` the rows are uniform on the unit sphere (normalised standard normals: isotropic);
    with them each row is a draw of the activations' own distribution, mean + factor @ z (a Gaussian with their mean
    and covariance), then normalised: a dictionary that shares nothing with another but the data's shape (its
    principal directions and its mean)."""
    import torch

    shape = tuple(n) if isinstance(n, (tuple, list)) else (n,)
    z = torch.randn(*shape, width, generator=generator, dtype=torch.float64).to(device or "cpu")
    d = z if moments is None else moments.mean + z @ moments.factor.T
    return unit_rows(d)[0]


class Moments(NamedTuple):
    """Mean [width] and a covariance factor [width, width] (cov = factor @ factor.T) of the activations, float64,
    and the number of rows they come from."""

    mean: "object"
    factor: "object"
    rows: int


def moments_of(mean, cov, rows: int) -> Moments:
    """`Moments` from a mean and a (symmetric, positive semi-definite) covariance: the factor is V sqrt(lambda) of
    its eigendecomposition (eigenvalues rounded below 0 clipped to 0)."""
    import torch

    mean_W = torch.as_tensor(mean, dtype=torch.float64)
    cov_WW = torch.as_tensor(cov, dtype=torch.float64)
    eigenvalues, vectors = torch.linalg.eigh((cov_WW + cov_WW.T) / 2)
    return Moments(mean_W, vectors * eigenvalues.clamp(min=0).sqrt(), int(rows))


def activation_moments(batches) -> Moments:
    """Mean and covariance (divisor rows - 1) of the rows of `batches` ([rows, width] tensors or arrays), summed in
    float64 one batch at a time around the first batch's mean (so a large shared mean costs no precision)."""
    import torch

    n, shift, total, outer = 0, None, None, None
    for batch in batches:
        x = torch.as_tensor(batch).to(torch.float64)
        if x.ndim != 2 or not len(x):
            continue
        if shift is None:
            shift = x.mean(dim=0)
            total, outer = torch.zeros_like(shift), torch.zeros(len(shift), len(shift), dtype=torch.float64)
        x = x - shift
        n += len(x)
        total += x.sum(dim=0)
        outer += x.T @ x
    if n < 2:
        raise ValueError(f"the moments of the activations need two rows or more, got {n}")
    centred = total / n
    cov = (outer - n * torch.outer(centred, centred)) / (n - 1)
    return moments_of(shift + centred, cov, n)


def chance_mmcs(n_small: int, n_large: int, width: int, draws: int = 5, seed: int = 0,
                methods: tuple[str, ...] = METHODS, device=None, moments: Moments | None = None,
                hungarian_draws: int | None = None) -> dict:
    """MMCS of two independent random dictionaries of these shapes (`random_unit_dictionary`: isotropic without
    `moments`, a Gaussian with that mean and covariance with them): what MMCS reads when the dictionaries share
    nothing. {method: {"mean", "std", "draws": [...]}} over `draws` seeded pairs
    (std: sample standard deviation between draws; 0 for a single draw). `hungarian` is scored on the first
    `hungarian_draws` pairs only (default all): its assignment costs about 4x the `max` search, and only `max`
    carries the verdict."""
    import numpy as np
    import torch

    if draws < 1:
        raise ValueError(f"chance MMCS needs at least one draw, got {draws}")
    g = torch.Generator().manual_seed(seed)
    on = device if device is not None else "cpu"
    if moments is not None:
        moments = Moments(moments.mean.to(on), moments.factor.to(on), moments.rows)
    scores = {m: [] for m in methods}
    # Pairs are drawn `batch` at a time (as many as CHUNK_ELEMENTS cosines hold): the small dictionaries of the
    # batch, then its large ones, from one seeded generator.
    batch = max(1, CHUNK_ELEMENTS // max(1, n_small * n_large))
    done = 0
    while done < draws:
        b = min(batch, draws - done)
        small_BNW = random_unit_dictionary((b, n_small), width, g, moments, on)
        large_BMW = random_unit_dictionary((b, n_large), width, g, moments, on)
        for m in methods:
            if m == "max":
                if b == 1:  # one pair may be too large for one matrix: the chunked search
                    best = max_cosines(small_BNW[0], large_BMW[0], CHUNK_ELEMENTS)[0].mean()[None]
                else:
                    best = torch.bmm(small_BNW, large_BMW.transpose(1, 2)).amax(dim=2).clamp(-1.0, 1.0).mean(dim=1)
                scores[m].extend(best.cpu().tolist())
            else:
                scores[m].extend(mmcs(small_BNW[i], large_BMW[i], m, device=device)[0] for i in range(b)
                                 if hungarian_draws is None or done + i < hungarian_draws)
        done += b
    return {m: {"mean": float(np.mean(v)), "std": float(np.std(v, ddof=1)) if len(v) > 1 else 0.0,
                "draws": [float(x) for x in v]} for m, v in scores.items()}


def dictionary_moments(small, large) -> Moments:
    """Mean and covariance of the two dictionaries' unit rows pooled (zero rows left out)."""
    rows = [u[u.norm(dim=1) > 0] for u in (unit_rows(as_float64(small))[0], unit_rows(as_float64(large))[0])]
    return activation_moments(rows)


def chance_levels(small, large, activations: Moments, draws: int, seed: int, device=None,
                  hungarian_draws: int | None = HUNGARIAN_DRAWS) -> dict:
    """The chance entries of a layer's mmcs.json record: `chance` (rows with the two dictionaries' own mean and
    covariance, `draws` pairs: the verdict's; max, and hungarian on the first `hungarian_draws`, 0 for none),
    `chance_activations` (rows with the activations' mean and covariance) and `chance_isotropic` (uniform on the
    sphere), HUNGARIAN_DRAWS pairs each as references (max), and `chance_rows` (the activation rows behind the
    reference). Each level's pairs come from their own seeded generator."""
    shape = dict(n_small=int(small.shape[0]), n_large=int(large.shape[0]), width=int(small.shape[1]), device=device)
    return {
        "chance": chance_mmcs(**shape, draws=draws, seed=seed, moments=dictionary_moments(small, large),
                              methods=METHODS if hungarian_draws != 0 else ("max",), hungarian_draws=hungarian_draws),
        "chance_source": "dictionary rows",
        "chance_activations": chance_mmcs(**shape, draws=HUNGARIAN_DRAWS, seed=seed + 1, methods=("max",),
                                          moments=activations),
        "chance_isotropic": chance_mmcs(**shape, draws=HUNGARIAN_DRAWS, seed=seed + 2, methods=("max",)),
        "chance_rows": activations.rows,
    }


def zero_rows(dictionary) -> int:
    """Number of rows with no direction (norm <= ZERO_NORM): their cosine with anything counts as 0."""
    return unit_rows(as_float64(dictionary))[1]


def alive_pairs(small, large, alive_small, alive_large, device=None) -> tuple[float, list[Pair]]:
    """The `max` matching restricted to features that fire: each firing small feature's best firing large feature.
    (score over the firing small features, pairs with indices into the full dictionaries). A feature that never
    fires has no behaviour to share, so it can never be part of a shared pair."""
    import torch

    alive_small = torch.as_tensor(alive_small, dtype=torch.bool)
    alive_large = torch.as_tensor(alive_large, dtype=torch.bool)
    if not bool(alive_small.any()) or not bool(alive_large.any()):
        return float("nan"), []
    small_idx = alive_small.nonzero().squeeze(1).numpy()
    large_idx = alive_large.nonzero().squeeze(1).numpy()
    small_t, large_t = as_float64(small), as_float64(large)
    score, pairs = mmcs(small_t[small_idx], large_t[large_idx], "max", device=device)
    return score, [Pair(int(small_idx[p.small]), int(large_idx[p.large]), p.cosine) for p in pairs]


def compare_layer(small, large, top_k: int, device=None, alive_small=None, alive_large=None, seed: int = 0) -> dict:
    """The mmcs.json record of one layer: both scores, the top-k shared pairs (max matching among the features that
    fire, `alive_*` boolean masks; every feature when they are None) and a summary of the per-feature max cosines."""
    import numpy as np

    score_max, pairs_max = mmcs(small, large, "max", device=device)
    score_hungarian, pairs_hungarian = mmcs(small, large, "hungarian", device=device)
    best = np.array([p.cosine for p in pairs_max])
    n_small, n_large = int(small.shape[0]), int(large.shape[0])
    alive_small = np.ones(n_small, bool) if alive_small is None else np.asarray(alive_small, bool)
    alive_large = np.ones(n_large, bool) if alive_large is None else np.asarray(alive_large, bool)
    score_alive, pairs_alive = alive_pairs(small, large, alive_small, alive_large, device=device)
    hungarian_alive = [p for p in pairs_hungarian if alive_small[p.small] and alive_large[p.large]]
    # 95% percentile bootstrap interval of the max MMCS over the small dictionary's features (which features a
    # dictionary of this size happens to hold), seeded by the run's seed.
    from scipy import stats

    boot = stats.bootstrap((best,), np.mean, n_resamples=BOOTSTRAP, confidence_level=0.95, method="percentile",
                           vectorized=True, random_state=np.random.default_rng(seed))
    return {
        "max": score_max,
        "max_ci95": [float(boot.confidence_interval.low), float(boot.confidence_interval.high)],
        "max_se": float(best.std(ddof=1) / np.sqrt(best.size)) if best.size > 1 else 0.0,
        "hungarian": score_hungarian,
        "max_firing": score_alive if score_alive == score_alive else None,
        "firing": {"small": int(alive_small.sum()), "large": int(alive_large.sum())},
        "pairs": [p._asdict() for p in pairs_alive[:top_k]],
        "hungarian_pairs": [p._asdict() for p in hungarian_alive[:top_k]],
        "max_cosine": {
            "mean": float(best.mean()),
            "median": float(np.median(best)),
            "min": float(best.min()),
            "max": float(best.max()),
        },
        "sizes": [int(small.shape[0]), int(large.shape[0])],  # [small, large] rows
        "width": int(small.shape[1]),
        "zero_rows": {"small": zero_rows(small), "large": zero_rows(large)},
    }
