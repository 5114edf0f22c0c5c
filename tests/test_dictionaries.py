"""MMCS (paper eq. 2) both ways, checked against brute force; shared-pair indexing; the dictionaries stage."""

import itertools
import os
import sys

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from irm.sae.mmcs import Pair, mmcs

torch.set_num_threads(1)


def brute_cos(a, b):
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    na = np.linalg.norm(a, axis=1, keepdims=True)
    nb = np.linalg.norm(b, axis=1, keepdims=True)
    ua = np.where(na > 0, a / np.where(na > 0, na, 1), 0)
    ub = np.where(nb > 0, b / np.where(nb > 0, nb, 1), 0)
    return ua @ ub.T


def brute_max(a, b):
    return brute_cos(a, b).max(axis=1).mean()


def brute_hungarian(a, b):
    """Best one-to-one matching by trying every injection of small rows into large rows."""
    cos = brute_cos(a, b)
    n, m = cos.shape
    best = max(sum(cos[i, j] for i, j in enumerate(perm)) for perm in itertools.permutations(range(m), n))
    return best / n


def rng_dicts(seed, n, m, d):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, d)), rng.standard_normal((m, d))


@pytest.mark.parametrize("seed", range(5))
def test_max_matches_bruteforce_numpy(seed):
    small, large = rng_dicts(seed, 37, 81, 12)
    score, pairs = mmcs(small, large, "max")
    cos = brute_cos(small, large)
    assert score == pytest.approx(brute_max(small, large), abs=1e-12)
    assert len(pairs) == 37
    for p in pairs:
        assert p.cosine == pytest.approx(cos[p.small].max(), abs=1e-12)
        assert cos[p.small, p.large] == pytest.approx(cos[p.small].max(), abs=1e-12)
    assert sorted(p.small for p in pairs) == list(range(37))


@pytest.mark.parametrize("seed,n,m", [(0, 3, 3), (1, 4, 6), (2, 5, 7), (3, 6, 6), (4, 2, 8)])
def test_hungarian_matches_exhaustive_permutation_search(seed, n, m):
    small, large = rng_dicts(seed, n, m, 5)
    score, pairs = mmcs(small, large, "hungarian")
    assert score == pytest.approx(brute_hungarian(small, large), abs=1e-12)
    assert len({p.large for p in pairs}) == n  # one-to-one
    cos = brute_cos(small, large)
    assert score == pytest.approx(np.mean([cos[p.small, p.large] for p in pairs]), abs=1e-12)


def test_hungarian_differs_from_max_when_large_rows_are_contested():
    # Both small rows are closest to large row 0; the one-to-one matching must give one of them row 1.
    small = np.array([[1.0, 0.0], [1.0, 0.1]])
    large = np.array([[1.0, 0.05], [0.0, 1.0]])
    s_max, p_max = mmcs(small, large, "max")
    s_h, p_h = mmcs(small, large, "hungarian")
    assert {p.large for p in p_max} == {0}
    assert {p.large for p in p_h} == {0, 1}
    assert s_max > s_h + 0.3


@pytest.mark.parametrize("method", ["max", "hungarian"])
def test_identical_dictionaries_score_one(method):
    small, _ = rng_dicts(0, 20, 1, 8)
    score, pairs = mmcs(small, small.copy(), method)
    assert score == pytest.approx(1.0, abs=1e-12)
    assert all(p.small == p.large for p in pairs)


@pytest.mark.parametrize("method", ["max", "hungarian"])
def test_pairs_index_each_dictionary(method):
    """The large dictionary contains the small one's rows (rescaled) at known shuffled positions, none at the small
    row's own index: every pair must name the large row where the small row was put."""
    rng = np.random.default_rng(7)
    n, m, d = 12, 40, 16
    small = rng.standard_normal((n, d))
    large = rng.standard_normal((m, d))
    positions = rng.permutation(np.arange(n, m))[:n]  # all >= n, so position i != i for every small row i
    large[positions] = small * rng.uniform(0.5, 3.0, size=(n, 1))
    score, pairs = mmcs(small, large, method)
    assert score == pytest.approx(1.0, abs=1e-12)
    assert {p.small: p.large for p in pairs} == {i: int(positions[i]) for i in range(n)}
    assert all(p.cosine == pytest.approx(1.0, abs=1e-12) for p in pairs)


def test_pairs_sorted_by_cosine_descending():
    small, large = rng_dicts(3, 30, 50, 6)
    for method in ("max", "hungarian"):
        _, pairs = mmcs(small, large, method)
        assert [p.cosine for p in pairs] == sorted((p.cosine for p in pairs), reverse=True)
        assert all(isinstance(p, Pair) for p in pairs)


def test_torch_tensors_and_float32_accepted():
    small, large = rng_dicts(4, 10, 20, 8)
    score_np, _ = mmcs(small, large, "max")
    score_t, _ = mmcs(torch.tensor(small, dtype=torch.float32), torch.tensor(large, dtype=torch.float32), "max")
    assert score_t == pytest.approx(score_np, abs=1e-6)


def test_zero_rows_have_cosine_zero():
    small, large = rng_dicts(5, 6, 9, 4)
    small[2] = 0.0
    large[:] = np.abs(large)  # every cosine with a zero row is 0, with the others whatever they are
    score, pairs = mmcs(small, large, "max")
    by_small = {p.small: p for p in pairs}
    assert by_small[2].cosine == 0.0
    assert score == pytest.approx(brute_max(small, large), abs=1e-12)
    large[4] = 0.0
    score_h, _ = mmcs(small, large, "hungarian")
    assert score_h == pytest.approx(brute_hungarian(small, large), abs=1e-12)
    assert np.isfinite(score_h)


def test_chunking_does_not_change_results():
    small, large = rng_dicts(6, 50, 70, 5)
    for method in ("max", "hungarian"):
        whole = mmcs(small, large, method)
        chunked = mmcs(small, large, method, chunk_elements=1)  # one small row at a time
        assert chunked[0] == pytest.approx(whole[0], abs=1e-12)
        assert [(p.small, p.large) for p in chunked[1]] == [(p.small, p.large) for p in whole[1]]
        assert np.allclose([p.cosine for p in chunked[1]], [p.cosine for p in whole[1]], rtol=0, atol=1e-12)


def test_bad_inputs_rejected():
    small, large = rng_dicts(0, 5, 4, 3)
    with pytest.raises(ValueError, match="small dictionary first"):
        mmcs(small, large, "hungarian")
    with pytest.raises(ValueError, match="widths"):
        mmcs(small, large[:, :2], "max")
    with pytest.raises(ValueError, match="method"):
        mmcs(small, large, "mean")
    for method in ("max", "hungarian"):  # either dictionary empty, not only both
        with pytest.raises(ValueError, match="empty"):
            mmcs(small[:0], large, method)
        with pytest.raises(ValueError, match="empty"):
            mmcs(small, large[:0], "max")


def test_cosines_are_clipped_to_minus_one_and_one_where_rounding_leaves_them():
    """A unit row against its own negative: its rounded cosine -(u . u) falls a hair below -1 for some rows (checked
    here, so the test can fail); the reported cosine never leaves [-1, 1]."""
    rows = torch.as_tensor(np.random.default_rng(0).standard_normal((300, 5)))
    unit = rows / rows.norm(dim=1, keepdim=True)
    assert ((unit @ unit.T).diagonal() > 1.0).any()
    for v in rows:
        for method in ("max", "hungarian"):
            assert -1.0 <= mmcs(v[None], -v[None], method)[1][0].cosine <= -1.0 + 1e-15
            assert 1.0 - 1e-15 <= mmcs(v[None], v[None], method)[1][0].cosine <= 1.0


# Property tests ---------------------------------------------------------------------------------------------------

finite = st.floats(min_value=-10, max_value=10, allow_nan=False, allow_subnormal=False).map(
    lambda x: 0.0 if abs(x) < 1e-3 else x)


@st.composite
def dictionary_pair(draw, equal=False):
    d = draw(st.integers(1, 6))
    n = draw(st.integers(1, 6))
    m = n if equal else draw(st.integers(n, 9))
    small = draw(arrays(np.float64, (n, d), elements=finite))
    large = draw(arrays(np.float64, (m, d), elements=finite))
    # Rows are either exactly zero or clearly non-zero, so rescaling never moves a row across the zero threshold.
    assume(all(np.linalg.norm(r) == 0 or np.linalg.norm(r) > 1e-2 for r in np.vstack([small, large])))
    return small, large


PROPS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])


@PROPS
@given(dictionary_pair(), st.sampled_from(["max", "hungarian"]))
def test_property_bounds(pair, method):
    score, pairs = mmcs(*pair, method)
    assert -1.0 <= score <= 1.0
    assert all(-1.0 <= p.cosine <= 1.0 for p in pairs)


@PROPS
@given(dictionary_pair())
def test_property_max_at_least_hungarian(pair):
    assert mmcs(*pair, "max")[0] >= mmcs(*pair, "hungarian")[0] - 1e-12


@PROPS
@given(dictionary_pair(), st.sampled_from(["max", "hungarian"]), st.randoms(use_true_random=False))
def test_property_row_permutation_invariance(pair, method, rnd):
    small, large = pair
    ps, pl = list(range(len(small))), list(range(len(large)))
    rnd.shuffle(ps)
    rnd.shuffle(pl)
    score, pairs = mmcs(small, large, method)
    score_p, pairs_p = mmcs(small[ps], large[pl], method)
    assert score_p == pytest.approx(score, abs=1e-9)
    if method == "max":
        # Same per-feature best cosine for each original small row.
        orig = {p.small: p.cosine for p in pairs}
        for p in pairs_p:
            assert p.cosine == pytest.approx(orig[ps[p.small]], abs=1e-9)


@PROPS
@given(dictionary_pair(), st.sampled_from(["max", "hungarian"]), st.data())
def test_property_positive_row_scaling_invariance(pair, method, data):
    small, large = pair
    scale_s = np.array(data.draw(st.lists(st.floats(1e-2, 1e2), min_size=len(small), max_size=len(small))))
    scale_l = np.array(data.draw(st.lists(st.floats(1e-2, 1e2), min_size=len(large), max_size=len(large))))
    score, _ = mmcs(small, large, method)
    score_s, _ = mmcs(small * scale_s[:, None], large * scale_l[:, None], method)
    assert score_s == pytest.approx(score, abs=1e-9)


@PROPS
@given(dictionary_pair(equal=True))
def test_property_hungarian_symmetric_for_equal_sizes(pair):
    small, large = pair
    assert mmcs(small, large, "hungarian")[0] == pytest.approx(mmcs(large, small, "hungarian")[0], abs=1e-9)


# The stage ------------------------------------------------------------------------------------------------------


def stage_cfg(tmp_path, layers=(1, 3), top_k=3):
    from irm.config import CacheConfig, DictionariesConfig, RunConfig

    return RunConfig(run_dir=str(tmp_path / "run"), log_dir=str(tmp_path / "tb"), device="cpu",
                     cache=CacheConfig(layers=list(layers)), dictionaries=DictionariesConfig(top_k=top_k))


def write_cache(cfg, layer, d=16, rows=600, seed=0):
    """A cache of `rows` anisotropic, mean-shifted activations (1/k spectrum, a shared mean) at `layer`, documents of
    20 rows whose first rows are 50x off the others (the attention sink the chance level leaves out). Returns the
    rows at positions > 0, as float64."""
    from irm.activations.store import ShardWriter, cache_layer_dir

    rng = np.random.default_rng(100 + seed)
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    acts = (rng.standard_normal((rows, d)) / np.sqrt(np.arange(1, d + 1))) @ q.T + 2.0 * q[:, 0]
    position = np.arange(rows) % 20
    acts[position == 0] *= 50.0
    writer = ShardWriter(cache_layer_dir(cfg.run_dir, layer), d, shard_rows=250)
    writer.add(torch.tensor(acts, dtype=torch.float32), torch.zeros(rows, dtype=torch.int64),
               torch.tensor(np.arange(rows) // 20), torch.tensor(position))
    writer.close(model="test", layer=layer, site="mlp_out", max_length=20)
    return acts.astype(np.float32).astype(np.float64)[position > 0]


def export_pair(cfg, layer, d=16, shared=5, seed=0, n=None, b_dec=None):
    """Export an x1 and an x2 SAE of one layer: n (default d) and 2n features of width d; x2 holds x1's first
    `shared` rows (rescaled) at shuffled positions that never equal the x1 index. Returns (small, large, positions).
    x1's last row is zero (a dead feature)."""
    from irm.sae import SparseAutoencoder, sae_dir, save_sae

    n = d if n is None else n
    rng = np.random.default_rng(seed)
    small, large = SparseAutoencoder(d, n), SparseAutoencoder(d, 2 * n)
    w_small = rng.standard_normal((n, d))
    w_small[-1] = 0.0
    w_large = rng.standard_normal((2 * n, d))
    positions = rng.permutation(np.arange(n, 2 * n))[:shared]
    w_large[positions] = w_small[:shared] * 2.0
    with torch.no_grad():
        small.W_dec.copy_(torch.tensor(w_small))
        large.W_dec.copy_(torch.tensor(w_large))
        if b_dec is not None:  # both SAEs' decoder bias (normalised space) and input scale
            for sae in (small, large):
                sae.b_dec.copy_(torch.as_tensor(b_dec[0], dtype=torch.float32))
                sae.input_scale.fill_(b_dec[1])
    save_sae(small, sae_dir(cfg.run_dir, layer, 1), layer=layer)
    save_sae(large, sae_dir(cfg.run_dir, layer, 2), layer=layer)
    return w_small.astype(np.float32), w_large.astype(np.float32), positions


def test_stage_writes_mmcs_json_tensorboard_and_manifest(tmp_path):
    import json

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from irm.stages.dictionaries import run
    from irm.stages import is_done

    cfg = stage_cfg(tmp_path)
    planted = {layer: export_pair(cfg, layer, seed=layer) for layer in (1, 3)}
    for layer in (1, 3):
        write_cache(cfg, layer, seed=layer)
    run(cfg)
    out = json.loads((tmp_path / "run" / "mmcs.json").read_text())
    assert set(out["layers"]) == {"1", "3"}
    for layer, (small, large, positions) in planted.items():
        rec = out["layers"][str(layer)]
        assert rec["max"] == pytest.approx(brute_max(small, large), abs=1e-9)
        assert rec["hungarian"] <= rec["max"] + 1e-12
        assert rec["sizes"] == [16, 32] and rec["width"] == 16
        assert rec["dictionaries"] == {"small": "x1", "large": "x2"}
        assert rec["zero_rows"] == {"small": 1, "large": 0}
        assert len(rec["pairs"]) == 3
        for p in rec["pairs"]:  # the planted rows are the exact matches; each maps to where it was put
            assert p["cosine"] == pytest.approx(1.0, abs=1e-6)
            assert p["large"] == positions[p["small"]]
        best = brute_cos(small, large).max(axis=1)
        assert rec["max_cosine"]["median"] == pytest.approx(np.median(best), abs=1e-9)
    assert is_done(cfg, "dictionaries")

    events = list((tmp_path / "tb" / "run" / "dictionaries").glob("events.out.tfevents.*"))
    assert events
    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    logged = {e.step: e.value for e in acc.Scalars("mmcs/max")}
    assert logged == pytest.approx({1: out["layers"]["1"]["max"], 3: out["layers"]["3"]["max"]}, abs=1e-6)
    assert {e.step for e in acc.Scalars("mmcs/hungarian")} == {1, 3}


def test_stage_missing_sae_and_single_expansion_are_user_errors(tmp_path):
    from irm.stages.dictionaries import run
    from irm.errors import UserError

    cfg = stage_cfg(tmp_path, layers=(0,))
    with pytest.raises(UserError, match="python -m irm sae"):
        run(cfg)
    export_pair(cfg, 0)
    with pytest.raises(UserError, match="python -m irm cache"):  # the chance level reads the activations
        run(cfg)
    cfg.sae.expansions = [1]
    with pytest.raises(UserError, match="sae.expansions"):
        run(cfg)


# Chance level and firing features ---------------------------------------------------------------------------------


def numpy_max_mmcs(a, b):
    """Paper eq. 2 in plain numpy (rows normalised here)."""
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return float((a @ b.T).max(axis=1).mean())


def test_chance_mmcs_equals_numpy_on_the_same_draws_and_its_distribution():
    from scipy.optimize import linear_sum_assignment

    from irm.sae.comparison import chance_mmcs

    n, m, d, draws = 24, 48, 16, 4
    chance = chance_mmcs(n, m, d, draws=draws, seed=7)
    # The same draws (same generator, same order: the batch's small dictionaries, then its large ones), normalised
    # and scored by numpy / scipy alone.
    g = torch.Generator().manual_seed(7)
    z_small = torch.randn(draws, n, d, generator=g, dtype=torch.float64).numpy()
    z_large = torch.randn(draws, m, d, generator=g, dtype=torch.float64).numpy()
    expected_max, expected_h = [], []
    for i in range(draws):
        a = z_small[i] / np.linalg.norm(z_small[i], axis=1, keepdims=True)
        b = z_large[i] / np.linalg.norm(z_large[i], axis=1, keepdims=True)
        assert np.allclose(np.linalg.norm(a, axis=1), 1) and np.allclose(np.linalg.norm(b, axis=1), 1)
        expected_max.append(numpy_max_mmcs(a, b))
        cos = a @ b.T
        rows, cols = linear_sum_assignment(-cos)
        expected_h.append(cos[rows, cols].mean())
    assert chance["max"]["draws"] == pytest.approx(expected_max, abs=1e-12)
    assert chance["hungarian"]["draws"] == pytest.approx(expected_h, abs=1e-12)
    assert chance["max"]["mean"] == pytest.approx(np.mean(expected_max), abs=1e-12)
    assert chance["max"]["std"] == pytest.approx(np.std(expected_max, ddof=1), abs=1e-12)
    two = chance_mmcs(n, m, d, draws=2, seed=7)["max"]  # a sample std of two values
    assert two["std"] == pytest.approx(abs(two["draws"][0] - two["draws"][1]) / np.sqrt(2), abs=1e-12)
    # Independently drawn numpy dictionaries (Gaussian rows, normalised) land at the same level: the chance level is
    # a property of the shapes, not of one generator.
    rng = np.random.default_rng(0)
    numpy_draws = [numpy_max_mmcs(rng.standard_normal((n, d)), rng.standard_normal((m, d))) for _ in range(200)]
    wide = chance_mmcs(n, m, d, draws=50, seed=1, methods=("max",))["max"]
    spread = np.std(numpy_draws, ddof=1)
    print(f"chance MMCS {n}x{m} in {d} dims: ours {wide['mean']:.4f}, numpy {np.mean(numpy_draws):.4f} +- {spread:.4f}")
    assert abs(wide["mean"] - np.mean(numpy_draws)) < 4 * spread * np.sqrt(1 / 50 + 1 / 200)


def test_activation_moments_equal_numpys_mean_and_covariance_and_factor_reproduces_it():
    from irm.sae.comparison import activation_moments

    rng = np.random.default_rng(8)
    x = rng.standard_normal((500, 6)) @ rng.standard_normal((6, 6)) + 1e4  # a large mean: summed around a shift
    m = activation_moments([x[:3], np.zeros((0, 6)), x[3:200], torch.tensor(x[200:])])
    assert m.rows == 500
    np.testing.assert_allclose(m.mean.numpy(), x.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(m.factor.numpy() @ m.factor.numpy().T, np.cov(x.T), rtol=1e-8, atol=1e-9)
    with pytest.raises(ValueError, match="two rows"):
        activation_moments([x[:1]])


def anisotropic_rows(rng, n, d, mean_scale=0.0):
    """Rows with a 1/k variance spectrum along random axes, shifted by mean_scale along the first axis."""
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    return (rng.standard_normal((n, d)) / np.sqrt(np.arange(1, d + 1))) @ q.T + mean_scale * q[:, 0]


@pytest.mark.parametrize("mean_scale", [0.0, 1.0])
def test_chance_from_moments_matches_numpy_draws_of_the_activations_distribution(mean_scale):
    """Independent check: dictionaries whose rows are numpy's multivariate normals with the activations' mean and
    covariance score what chance_mmcs(moments=...) reads, and both sit far above the isotropic level (issue 22: 1/k
    spectrum, a shared mean)."""
    from irm.sae.comparison import activation_moments, chance_mmcs

    rng = np.random.default_rng(9)
    n, m, d = 32, 64, 32
    acts = anisotropic_rows(rng, 4000, d, mean_scale)
    ours = chance_mmcs(n, m, d, draws=60, seed=2, methods=("max",), moments=activation_moments([acts]))["max"]
    mu, cov = acts.mean(axis=0), np.cov(acts.T)
    numpy_draws = [numpy_max_mmcs(rng.multivariate_normal(mu, cov, n), rng.multivariate_normal(mu, cov, m))
                   for _ in range(200)]
    iso = chance_mmcs(n, m, d, draws=60, seed=2, methods=("max",))["max"]["mean"]
    spread = np.std(numpy_draws, ddof=1)
    print(f"chance {n}x{m} in {d} dims, mean {mean_scale}: ours {ours['mean']:.3f}, numpy {np.mean(numpy_draws):.3f}"
          f" +- {spread:.3f}, isotropic {iso:.3f}")
    assert abs(ours["mean"] - np.mean(numpy_draws)) < 4 * spread * np.sqrt(1 / 60 + 1 / 200)
    assert ours["mean"] > iso + 0.1


def test_a_feature_that_never_fires_is_never_a_shared_feature():
    from irm.sae.comparison import compare_layer

    rng = np.random.default_rng(3)
    small, large = rng.standard_normal((6, 8)), rng.standard_normal((10, 8))
    large[4] = small[0]  # an exact match, but small feature 0 never fires
    large[7] = small[2] * 3.0  # an exact match whose large feature never fires
    large[9] = small[5] + 0.05 * rng.standard_normal(8)  # a near match between firing features
    alive_small = np.array([False, True, True, True, True, True])
    alive_large = np.ones(10, bool)
    alive_large[7] = False
    rec = compare_layer(small, large, top_k=6, alive_small=alive_small, alive_large=alive_large)
    assert rec["max"] == pytest.approx(numpy_max_mmcs(small, large), abs=1e-12)  # the score itself: every feature
    assert rec["firing"] == {"small": 5, "large": 9}
    assert {p["small"] for p in rec["pairs"]} == {1, 2, 3, 4, 5}
    assert all(alive_large[p["large"]] for p in rec["pairs"]) and all(p["large"] != 7 for p in rec["pairs"])
    assert rec["pairs"][0] == {"small": 5, "large": 9, "cosine": pytest.approx(numpy_max_mmcs(small[5:], large[9:]))}
    alive = brute_cos(small[alive_small], large[alive_large]).max(axis=1).mean()
    assert rec["max_firing"] == pytest.approx(alive, abs=1e-12)
    for p in rec["hungarian_pairs"]:
        assert alive_small[p["small"]] and alive_large[p["large"]]


def test_stage_records_chance_init_and_firing_beside_each_mmcs(tmp_path, capsys):
    import json

    from irm.stages.dictionaries import run
    from irm.sae.comparison import activation_moments, chance_mmcs, dictionary_moments
    from irm.sae import sae_dir

    cfg = stage_cfg(tmp_path, layers=(2,), top_k=16)
    small, large, positions = export_pair(cfg, 2)
    acts = write_cache(cfg, 2)
    # The sae stage's held-out frequencies: small feature 0 (planted in x2) never fires.
    freq_small = [0.0] + [0.1] * 15
    (sae_dir(cfg.run_dir, 2, 1) / "metrics.json").write_text(json.dumps({"feature_frequency": freq_small}))
    (sae_dir(cfg.run_dir, 2, 2) / "metrics.json").write_text(json.dumps({"feature_frequency": [0.2] * 32}))
    run(cfg)
    rec = json.loads((tmp_path / "run" / "mmcs.json").read_text())["layers"]["2"]
    # the verdict's chance level: rows with the two dictionaries' own mean and covariance (numpy's, checked below);
    # the reference: rows with the mean and covariance of the cached rows past each document's first
    own = dictionary_moments(small, large)
    unit = [w[np.linalg.norm(w, axis=1) > 0] / np.linalg.norm(w[np.linalg.norm(w, axis=1) > 0], axis=1,
                                                                keepdims=True) for w in (small, large)]
    np.testing.assert_allclose(own.mean.numpy(), np.concatenate(unit).mean(axis=0), atol=1e-6)
    np.testing.assert_allclose((own.factor @ own.factor.T).numpy(), np.cov(np.concatenate(unit).T), atol=1e-6)
    expected = chance_mmcs(16, 32, 16, cfg.dictionaries.chance_draws, seed=cfg.seed * 1000 + 2, moments=own,
                           hungarian_draws=5)
    for method in ("max", "hungarian"):
        assert rec["chance"][method]["draws"] == pytest.approx(expected[method]["draws"], abs=1e-6)
    reference = chance_mmcs(16, 32, 16, 5, seed=cfg.seed * 1000 + 3, methods=("max",),
                            moments=activation_moments([acts]))
    assert rec["chance_activations"]["max"]["draws"] == pytest.approx(reference["max"]["draws"], abs=1e-9)
    assert len(rec["chance"]["max"]["draws"]) == cfg.dictionaries.chance_draws == 99
    assert len(rec["chance"]["hungarian"]["draws"]) == 5 and len(rec["chance_isotropic"]["max"]["draws"]) == 5
    assert rec["chance_rows"] == len(acts) == 570
    assert rec["chance"]["max"]["std"] > 0 and rec["chance_source"] == "dictionary rows"
    # activations with a mean and a steep spectrum: random rows drawn like them agree far more than isotropic ones
    assert rec["chance_activations"]["max"]["mean"] > rec["chance_isotropic"]["max"]["mean"] + 0.2
    assert rec["init"] is None  # exported by hand, not by a fit
    assert rec["firing"] == {"small": 15, "large": 32, "measured": True}
    assert 0 not in {p["small"] for p in rec["pairs"]}
    out = capsys.readouterr().out
    assert f"mean and covariance {expected['max']['mean']:.3f}" in out


def test_findings_row_ranks_mmcs_among_the_activations_chance_draws_and_carries_sae_quality(tmp_path):
    """The verdict is the real MMCS against the chance draws' distribution (a new value's t, scipy), one-sided at the
    table's level (2.5% a tail); a record with isotropic chance only, or none, is a "not tested" row that says why,
    never a missing row."""
    import json

    from irm.findings import ALPHA, NOT_DISTINGUISHABLE, NOT_TESTED, SUPPORTED, dictionaries_share_features

    draws = list(np.random.default_rng(0).normal(0.50, 0.05, 99))  # 99 chance draws
    chance = {"max": {"mean": float(np.mean(draws)), "std": float(np.std(draws, ddof=1)), "draws": draws}}
    base = {"chance": chance, "chance_source": "dictionary rows", "chance_rows": 5000, "max_se": 0.02,
            "chance_isotropic": {"max": {"mean": 0.14}}, "chance_activations": {"max": {"mean": 0.93}},
            "dictionaries": {"small": "x1", "large": "x2"}}
    mmcs_json = {"layers": {
        "3": {**base, "max": 0.75, "max_ci95": [0.58, 0.66], "init": {"max": 0.139},
              "firing": {"small": 570, "large": 1100}},
        "4": {**base, "max": 0.62, "max_ci95": [0.58, 0.62]},  # t about 2.3: p about 0.01, below 0.025
        "5": {**base, "max": 0.58, "max_ci95": [0.55, 0.65]},  # t about 1.5: p about 0.07
        "6": {"max": 0.62, "max_ci95": [0.58, 0.66], "chance": {"max": {"mean": 0.14, "std": 0.01, "draws": [0.14]}},
              "dictionaries": {}},  # isotropic chance only (mmcs.json from before issue 22)
        "7": {"max": 0.10, "max_ci95": [0.09, 0.11], "dictionaries": {}},
        "8": {**base, "max": 0.62, "max_ci95": [0.50, 0.74], "max_se": 0.06},  # layer 4's MMCS, a noisier one
        "9": {**{k: v for k, v in base.items() if k != "max_se"}, "max": 0.75}}}  # mmcs.json without max_se
    (tmp_path / "mmcs.json").write_text(json.dumps(mmcs_json))
    rows = dictionaries_share_features(tmp_path)
    assert [r["verdict"] for r in rows] == [SUPPORTED, SUPPORTED, NOT_DISTINGUISHABLE, NOT_TESTED, NOT_TESTED,
                                            NOT_DISTINGUISHABLE, NOT_TESTED]
    from scipy import stats

    for row, observed, se in zip(rows[:3] + rows[5:6], (0.75, 0.62, 0.58, 0.62), (0.02, 0.02, 0.02, 0.06)):
        # a new value against the draws' distribution: scipy's t, scale sd sqrt(1 + 1/n) and the MMCS's own
        # standard error in quadrature, n - 1 df
        t = (observed - np.mean(draws)) / np.sqrt(np.var(draws, ddof=1) * (1 + 1 / 99) + se ** 2)
        p = stats.t.sf(t, 98)
        assert row["p_value"] == pytest.approx(min(1.0, 2 * p)) and (p < ALPHA / 2) == (row["verdict"] == SUPPORTED)
        assert row["calibration"] == "mmcs"
    assert "isotropic random dictionaries only" in rows[3]["detail"] and "no chance level" in rows[4]["detail"]
    assert "max_se" in rows[6]["detail"] and "--force" in rows[6]["detail"]
    (tmp_path / "sae").mkdir()
    (tmp_path / "sae" / "metrics.json").write_text(json.dumps({"layers": {"3": {"x1": {
        "l0": 31.5, "width": 576, "explained_variance": 0.81, "dead_fraction": 0.02, "ce_loss_recovered": 0.9}}}}))
    row = dictionaries_share_features(tmp_path)[0]
    assert "0.750 [0.580, 0.660]" in row["number"]
    assert f"{np.mean(draws):.3f} ± {np.std(draws, ddof=1):.3f} (99 draws; rows drawn like the activations 0.930, " \
           "isotropic 0.140)" in row["control"]
    assert "x1: L0 31.5 of 576, explained variance 0.810 (n/a without first tokens), dead 2.0%, CE loss recovered " \
           "0.900" in row["detail"]
    assert dictionaries_share_features(tmp_path / "missing") is None


def test_report_and_summary_show_sae_quality_and_each_mmcs_beside_its_chance(tmp_path):
    import json

    from irm.config import RunConfig
    from irm.stages.report import run as report

    cfg = RunConfig(run_dir=str(tmp_path / "run"), log_dir=str(tmp_path / "tb"))
    root = tmp_path / "run"
    (root / "sae").mkdir(parents=True)
    chance = {"max": {"mean": 0.1375, "std": 0.0021, "draws": [0.1375] * 5},
              "hungarian": {"mean": 0.1125, "std": 0.0012, "draws": [0.1125] * 5}}
    (root / "mmcs.json").write_text(json.dumps({"layers": {"20": {
        "max": 0.625, "hungarian": 0.5, "max_firing": 0.65, "sizes": [576, 1152], "chance": chance,
        "init": {"max": 0.1380, "hungarian": 0.1130}, "firing": {"small": 570, "large": 1111, "measured": True}}}}))
    m = {"width": 576, "l0": 31.25, "l0_fraction": 31.25 / 576, "explained_variance": 0.8125,
         "explained_variance_after_first": 0.6875, "dead_fraction": 0.0125, "dead_fraction_all_tokens": 0.00625,
         "ce_loss_recovered": 0.875}
    (root / "sae" / "metrics.json").write_text(json.dumps({
        "layers": {"20": {"x1": m, "x2": {**m, "width": 1152, "l0_fraction": 31.25 / 1152}}},
        "settings": {"activation": "topk", "k": 32, "normalize": True, "revive": "auxk"},
        "heldout": {"cache_val_fraction": 0.05, "ce_documents": 16}}))
    summary = report(cfg)
    assert summary["mmcs"]["20"]["chance"]["max"] == {"mean": 0.1375, "std": 0.0021}
    assert summary["mmcs"]["20"]["init"]["max"] == 0.138
    assert summary["sae"]["20"]["x2"] == {**{k: m[k] for k in m}, "width": 1152, "l0_fraction": 31.25 / 1152}
    md = (root / "report.md").read_text(encoding="utf-8")
    row = next(line for line in md.splitlines() if line.startswith("| 20 | 576 | 1152"))
    assert "0.625" in row and "0.138 ± 0.002" in row and "0.113 ± 0.001" in row and "570 / 1111" in row
    row = next(line for line in md.splitlines() if line.startswith("| 20 | x2 | 1152"))
    assert "31.2 (2.7%)" in row and "0.812" in row and "0.688" in row and "1.2% (0.6%)" in row and "0.875" in row
    assert "TopK (k = 32)" in md


def numpy_bootstrap_ci(best, resamples=20000, seed=0):
    """95% percentile interval of the mean of `best`, features resampled with replacement by numpy's generator, with
    20x the stage's resamples: the stage's interval (scipy.stats.bootstrap, 1000) must agree within its Monte Carlo
    error (`close_to_bootstrap`)."""
    rng = np.random.default_rng(seed)
    means = best[rng.integers(0, len(best), (resamples, len(best)))].mean(axis=1)
    return [float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))]


def close_to_bootstrap(ci, best):
    """`ci` is a 95% bootstrap interval of the mean of `best`: each end within 15% of the reference's width of the
    reference's (1000 resamples put an end about 5% of the width off)."""
    ref = numpy_bootstrap_ci(np.asarray(best, dtype=np.float64))
    return all(abs(a - b) <= 0.15 * (ref[1] - ref[0]) for a, b in zip(ci, ref))


def test_compare_layer_of_unequal_sizes_and_width_against_numpy():
    """6 small features and 10 large ones of width 8 (no size equals another, so a swapped axis shows): sizes, width,
    firing counts without masks, the max-cosine summary and the bootstrap interval, each recomputed in numpy."""
    from irm.sae.comparison import compare_layer

    rng = np.random.default_rng(11)
    small, large = rng.standard_normal((6, 8)), rng.standard_normal((10, 8))
    rec = compare_layer(small, large, top_k=2)
    best = brute_cos(small, large).max(axis=1)
    assert rec["sizes"] == [6, 10] and rec["width"] == 8
    assert rec["firing"] == {"small": 6, "large": 10}
    assert rec["max_cosine"] == pytest.approx({"mean": best.mean(), "median": np.median(best), "min": best.min(),
                                               "max": best.max()}, abs=1e-12)
    assert close_to_bootstrap(rec["max_ci95"], best)
    assert rec["max_ci95"][0] < rec["max"] < rec["max_ci95"][1]
    assert rec["max_se"] == pytest.approx(best.std(ddof=1) / np.sqrt(len(best)), abs=1e-12)
    assert compare_layer(small, large, top_k=2, seed=0)["max_ci95"] == rec["max_ci95"]  # seeded
    assert compare_layer(small, large, top_k=2, seed=1)["max_ci95"] != rec["max_ci95"]
    assert len(rec["pairs"]) == len(rec["hungarian_pairs"]) == 2


def test_no_firing_feature_on_one_side_leaves_max_firing_empty_and_zero_rows_include_the_threshold():
    """When no small (or no large) feature fires there is nothing to share: max_firing is None and there are no
    pairs, while the scores over every feature stand. A row of norm exactly ZERO_NORM (1e-12) counts as a zero row."""
    from irm.sae.comparison import compare_layer, zero_rows
    from irm.sae.mmcs import ZERO_NORM

    rng = np.random.default_rng(12)
    small, large = rng.standard_normal((4, 5)), rng.standard_normal((7, 5))
    for alive_small, alive_large in ((np.zeros(4, bool), np.ones(7, bool)), (np.ones(4, bool), np.zeros(7, bool))):
        rec = compare_layer(small, large, top_k=3, alive_small=alive_small, alive_large=alive_large)
        assert rec["max_firing"] is None and rec["pairs"] == [] and rec["hungarian_pairs"] == []
        assert rec["max"] == pytest.approx(brute_max(small, large), abs=1e-12)
    edge = np.zeros((3, 3))
    edge[0, 0], edge[1, 1] = ZERO_NORM, 2 * ZERO_NORM  # norms exactly 1e-12 and 2e-12
    assert np.linalg.norm(edge[0]) == ZERO_NORM and zero_rows(edge) == 2


def test_stage_on_unequal_sizes_with_one_chance_draw_and_a_seed(tmp_path):
    """The stage with 12 x1 and 24 x2 features of width 8, seed 3 and a single chance draw: every number of the
    layer's record against numpy/scipy (chance draws from the seeded generator, std 0 for one draw; the one-to-one
    matching by scipy on -cos; firing counts from the held-out frequencies)."""
    import json

    from scipy.optimize import linear_sum_assignment

    from irm.stages.dictionaries import run
    from irm.sae.comparison import dictionary_moments
    from irm.sae import sae_dir

    cfg = stage_cfg(tmp_path, layers=(2,), top_k=4)
    cfg.seed, cfg.dictionaries.chance_draws = 3, 1
    small, large, positions = export_pair(cfg, 2, d=8, n=12, seed=4)
    write_cache(cfg, 2, d=8, rows=300, seed=4)
    freq_small = [0.1] * 12
    freq_small[1] = 0.0
    freq_large = [0.3] * 24
    freq_large[positions[0]] = 0.0
    (sae_dir(cfg.run_dir, 2, 1) / "metrics.json").write_text(json.dumps({"feature_frequency": freq_small}))
    (sae_dir(cfg.run_dir, 2, 2) / "metrics.json").write_text(json.dumps({"feature_frequency": freq_large}))
    run(cfg)
    rec = json.loads((tmp_path / "run" / "mmcs.json").read_text())["layers"]["2"]
    cos = brute_cos(small, large)
    assert rec["sizes"] == [12, 24] and rec["width"] == 8
    assert rec["firing"] == {"small": 11, "large": 23, "measured": True}
    assert rec["max"] == pytest.approx(cos.max(axis=1).mean(), abs=1e-6)
    rows, cols = linear_sum_assignment(-cos)
    assert rec["hungarian"] == pytest.approx(cos[rows, cols].mean(), abs=1e-6)
    assert close_to_bootstrap(rec["max_ci95"], cos.max(axis=1))
    alive_s, alive_l = np.array(freq_small) > 0, np.array(freq_large) > 0
    assert rec["max_firing"] == pytest.approx(cos[alive_s][:, alive_l].max(axis=1).mean(), abs=1e-6)
    # planted pairs 2, 3, 4 are exact matches between firing features; pair 0's large feature never fires
    assert {(p["small"], p["large"]) for p in rec["pairs"][:3]} == {(i, int(positions[i])) for i in (2, 3, 4)}
    # the one chance pair: standard normals from the seeded generator, mapped through the dictionaries' own row
    # mean and covariance factor (dictionary_moments, checked against numpy elsewhere), normalised here in numpy
    own = dictionary_moments(small, large)
    mean, factor = own.mean.numpy(), own.factor.numpy()
    g = torch.Generator().manual_seed(3 * 1000 + 2)
    z_small = torch.randn(12, 8, generator=g, dtype=torch.float64).numpy()
    z_large = torch.randn(24, 8, generator=g, dtype=torch.float64).numpy()
    a, b = mean + z_small @ factor.T, mean + z_large @ factor.T
    chance = brute_cos(a, b)
    rows, cols = linear_sum_assignment(-chance)
    # pytest >= 9.2 refuses approx of a dict holding a list: the scalars and the list of draws separately
    assert {k: rec["chance"]["max"][k] for k in ("mean", "std")} == pytest.approx(
        {"mean": chance.max(axis=1).mean(), "std": 0.0}, abs=1e-9)
    assert rec["chance"]["max"]["draws"] == pytest.approx([chance.max(axis=1).mean()], abs=1e-9)
    assert rec["chance"]["hungarian"]["draws"] == pytest.approx([chance[rows, cols].mean()], abs=1e-9)
    assert rec["chance"]["hungarian"]["std"] == 0.0
    # top_k 1 is allowed; without x2's held-out frequencies the firing counts are not measured (all 24 count)
    (sae_dir(cfg.run_dir, 2, 2) / "metrics.json").unlink()
    cfg.dictionaries.top_k = 1
    run(cfg)
    rec = json.loads((tmp_path / "run" / "mmcs.json").read_text())["layers"]["2"]
    assert rec["firing"] == {"small": 11, "large": 24, "measured": False}
    assert len(rec["pairs"]) == 1 and rec["pairs"][0]["cosine"] == pytest.approx(1.0, abs=1e-6)
    assert rec["pairs"][0]["large"] == positions[rec["pairs"][0]["small"]]


def test_seed_pair_trains_a_second_small_sae_and_reports_its_mmcs(tmp_path, capsys):
    """dictionaries.seed_pair: a second x1 SAE of the layer, trained by the sae stage's fit with seed + 1 on the same
    cache (linked into dictionaries/seed-pair), and its MMCS with the first, recomputed here in numpy."""
    import json

    from irm.stages.dictionaries import SEED_PAIR_DIR, run
    from irm.findings import dictionaries_share_features
    from irm.sae import load_sae, sae_dir

    cfg = stage_cfg(tmp_path, layers=(2,), top_k=2)
    cfg.dictionaries.seed_pair = True
    cfg.sae.epochs = 1
    small, _, _ = export_pair(cfg, 2)
    write_cache(cfg, 2, rows=400)
    run(cfg)
    rec = json.loads((tmp_path / "run" / "mmcs.json").read_text())["layers"]["2"]
    twin_dir = sae_dir(tmp_path / "run" / SEED_PAIR_DIR, 2, 1)
    twin = load_sae(twin_dir).dictionary.numpy()
    assert twin.shape == small.shape and rec["seed_pair"]["seed"] == cfg.seed + 1
    assert rec["seed_pair"]["max"] == pytest.approx(brute_max(small, twin), abs=1e-6)
    assert "of another seed" in capsys.readouterr().out
    row = dictionaries_share_features(tmp_path / "run")[0]
    assert f"a second x1 of another seed): MMCS {rec['seed_pair']['max']:.3f}" in row["detail"]


def test_chance_levels_from_the_dictionaries_own_rows_with_the_activations_as_a_reference():
    """`chance`: rows with the dictionaries' own mean and covariance, equal in level to numpy's multivariate normals
    of the rows' law, and high when the rows share a mean; `chance_activations`: rows drawn like the activations."""
    from irm.sae.comparison import activation_moments, chance_levels

    rng = np.random.default_rng(4)
    n, m, d = 16, 32, 16
    acts = anisotropic_rows(rng, 3000, d, mean_scale=3.0)
    for shift in (0.0, 2.0):
        small, large = anisotropic_rows(rng, n, d, shift), anisotropic_rows(rng, m, d, shift)
        got = chance_levels(small, large, activation_moments([acts]), draws=99, seed=0)
        unit = np.concatenate([w / np.linalg.norm(w, axis=1, keepdims=True) for w in (small, large)])
        expected = [numpy_max_mmcs(rng.multivariate_normal(unit.mean(0), np.cov(unit.T), n),
                                   rng.multivariate_normal(unit.mean(0), np.cov(unit.T), m)) for _ in range(300)]
        ours = got["chance"]["max"]
        print(f"rows shifted {shift}: ours {ours['mean']:.3f}, numpy {np.mean(expected):.3f} +- "
              f"{np.std(expected):.3f}; like the activations {got['chance_activations']['max']['mean']:.3f}")
        assert abs(ours["mean"] - np.mean(expected)) < 4 * np.std(expected) * np.sqrt(1 / 99 + 1 / 300)
        if shift:
            assert ours["mean"] > got["chance_isotropic"]["max"]["mean"] + 0.2  # the rows' shared mean
    assert got["chance_activations"]["max"]["mean"] > got["chance_isotropic"]["max"]["mean"] + 0.2
    assert got["chance_rows"] == 3000 and len(got["chance"]["hungarian"]["draws"]) == 5
