"""Base-model control and nulls (irm.stages.control) in planted worlds: base and tuned differ on a known set of words ->
delta_tau's interval is above 0 and the per-word comparison finds those words, moving toward the reward; they do not
differ -> the interval covers 0 and the verdict is "not distinguishable from the control". The permutation null
gives p < 0.01 on planted signal and p > 0.05 when targets carry no sign information. The closed-form ridge is
checked against numpy; the stage end to end on a tiny model whose "tuned" policy is the base model itself."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import kendalltau

from irm.config import ControlConfig
from irm.chains import _inversions, analyse, flipped_signs, kendall_taus, resampled_deltas, word_moves
from irm.findings import NOT_DISTINGUISHABLE, SUPPORTED, build_findings, differs_from_base, verdict_from_interval
from irm.ridge import RidgePath

N_WORDS, N_FEATURES, N_TRIPLES = 300, 24, 200
CC = ControlConfig(permutations=200, bootstrap=400)


def world(changed: int = 0, base_noise: float = 0.0, signal: bool = True, seed: int = 0):
    """Words whose features are true value x a sentiment direction + noise, for the tuned model. The base model's
    features are the tuned ones, except that the first `changed` words carry their sentiment with the wrong sign (and
    `base_noise` adds independent noise to every base feature). Triples: a positive and a negative training word per
    triple, rows x = the word's features, y = +|true| / -|true| (+ noise): the deltas."""
    rng = np.random.default_rng(seed)
    true = np.round(rng.uniform(-4, 4, N_WORDS), 1)
    true[true == 0] = 0.1
    true[:changed] = np.sign(true[:changed]) * rng.uniform(2, 4, changed).round(1)  # moves large enough to see
    words = [f"w{i:03d}" for i in range(N_WORDS)]
    direction = rng.normal(size=N_FEATURES)
    tuned_WF = true[:, None] * direction / 4 + 0.5 * rng.normal(size=(N_WORDS, N_FEATURES))
    base_WF = tuned_WF.copy()
    base_WF[:changed] -= 2 * true[:changed, None] * direction / 4
    base_WF += base_noise * rng.normal(size=base_WF.shape)
    heldout = set(words[-60:])
    train_pos = [i for i in range(N_WORDS - 60) if true[i] > 0]
    train_neg = [i for i in range(N_WORDS - 60) if true[i] < 0]
    pos, neg = rng.choice(train_pos, N_TRIPLES), rng.choice(train_neg, N_TRIPLES)
    rows = np.stack([pos, neg], axis=1).reshape(-1)
    sign = np.tile([1.0, -1.0], N_TRIPLES)
    y = sign * np.abs(true[rows]) + 0.2 * rng.normal(size=len(rows))
    if not signal:
        y = np.abs(y) * rng.choice([-1.0, 1.0], size=len(y))  # signs unrelated to the words
    triple = np.repeat(np.arange(N_TRIPLES), 2)

    def features(words_WF):
        return {"x": words_WF[rows], "x_raw": words_WF[rows] @ rng.normal(size=(N_FEATURES, N_FEATURES)),
                "y": y, "triple": triple, "sign": sign.astype(int), "words": words_WF,
                "words_raw": words_WF @ np.eye(N_FEATURES)}

    seen = {words[i] for i in set(pos) | set(neg)}
    return {"tuned": features(tuned_WF), "base": features(base_WF)}, words, true, heldout, seen


def run_analysis(tmp_path, **kw):
    features, words, true, heldout, seen = world(**kw)
    report, rows = analyse(features, words, true, heldout, seen, CC, (10, 90), 0)
    (tmp_path / "control.json").write_text(json.dumps(report))
    return report, rows, words, true


def test_planted_difference_is_found_by_delta_tau_and_the_per_word_comparison(tmp_path):
    report, rows, words, true = run_analysis(tmp_path, changed=30)
    d = report["delta_tau"]["all"]
    assert d["ci95"][0] > 0 and d["delta"] > 0.1
    assert report["tuned"]["tau"]["all"]["tau"] > report["base"]["tau"]["all"]["tau"]
    moved = {r["word"] for r in rows if r["moved"]}
    planted = set(words[:30])
    assert len(moved & planted) >= 20 and len(moved - planted) <= 3  # 22 at the shared penalty (27 per chain)
    assert all(r["direction"] == "toward" for r in rows if r["word"] in planted and r["moved"])
    assert report["per_word"]["n_moved_toward"] >= 20 and report["per_word"]["n_moved_away"] <= 3
    [row] = build_findings(tmp_path, [differs_from_base])
    assert row["verdict"] == SUPPORTED


def test_no_difference_gives_an_interval_covering_zero_and_not_distinguishable(tmp_path):
    report, rows, _, _ = run_analysis(tmp_path, changed=0, base_noise=0.05)
    d = report["delta_tau"]["all"]
    assert d["ci95"][0] < 0 < d["ci95"][1]
    assert verdict_from_interval(d["ci95"]) == NOT_DISTINGUISHABLE
    [row] = build_findings(tmp_path, [differs_from_base])
    assert row["verdict"] == NOT_DISTINGUISHABLE
    assert report["per_word"]["n_moved"] <= 0.02 * len(rows)


def test_permutation_null_small_p_on_planted_signal_large_p_without_it(tmp_path):
    report, _, _, _ = run_analysis(tmp_path, changed=0)
    assert report["tuned"]["permutation"]["all"]["p_greater"] < 0.01
    assert report["tuned"]["permutation"]["all"]["n"] == 200
    report, _, _, _ = run_analysis(tmp_path, changed=0, signal=False)
    assert report["tuned"]["permutation"]["all"]["p_greater"] > 0.05
    assert report["base"]["permutation"]["all"]["p_greater"] > 0.05


def chains_world(seed=3, n_words=120, n_contexts=3, n_triples=60, f=6):
    """Two chains (models a, b) whose items are words in contexts; rows two per triple."""
    rng = np.random.default_rng(seed)
    true = rng.normal(size=n_words)
    word_of_item = np.repeat(np.arange(n_words), n_contexts)
    context_of_item = np.tile(np.arange(n_contexts), n_words)
    out = {}
    for label, noise in (("a", 0.5), ("b", 2.0)):
        items = true[word_of_item, None] * np.ones(f) + noise * rng.normal(size=(len(word_of_item), f))
        x = rng.normal(size=(2 * n_triples, f))
        y = x.sum(axis=1) + rng.normal(size=2 * n_triples)
        out[label] = {"x": x, "y": y, "triple": np.repeat(np.arange(n_triples), 2), "items": items,
                      "word_of_item": word_of_item, "context_of_item": context_of_item,
                      "pred": items.reshape(n_words, n_contexts, f).mean(axis=1).sum(axis=1)}
    return out, true


def test_resampled_deltas_point_is_scipys_tau_difference_and_one_draw_is_a_hand_refit():
    feats, true = chains_world()
    masks = {"all": np.ones(len(true), bool)}
    pairs = {"d": (("a", "x"), ("b", "x"))}
    scales = {("a", "x"): 1.0, ("b", "x"): 1.0}
    out = resampled_deltas(feats, true, masks, scales, 0.5, pairs, 200, seed=1)["d"]["all"]
    expect = kendalltau(true, feats["a"]["pred"]).statistic - kendalltau(true, feats["b"]["pred"]).statistic
    assert out["delta"] == pytest.approx(expect, abs=1e-12)
    assert out["ci95"][0] < out["delta"] < out["ci95"][1] and 0 < out["p_value"] < 0.05
    same = resampled_deltas({"a": feats["a"], "b": feats["a"]}, true, masks, scales, 0.5, pairs, 50, 1)["d"]["all"]
    assert same["delta"] == 0.0 and same["ci95"] == [0.0, 0.0] and same["p_value"] == 1.0
    # Forty draws by hand, with the same generator calls: R refitted by numpy on the drawn triples' rows, each
    # word averaged over the drawn contexts, tau over the drawn words; the interval is their percentiles.
    rng = np.random.default_rng(7)
    diffs = []
    for _ in range(40):
        picked = rng.integers(0, 60, 60)
        weight = np.bincount(rng.integers(0, 3, 3), minlength=3)
        drawn = rng.choice(np.arange(len(true)), size=len(true))
        taus = []
        for label in ("a", "b"):
            fa = feats[label]
            rows = np.stack([2 * picked, 2 * picked + 1], axis=1).ravel()
            x, y = fa["x"][rows], fa["y"][rows]
            xc = x - x.mean(0)
            w = np.linalg.solve(xc.T @ xc + 0.5 * np.eye(6), xc.T @ (y - y.mean()))
            item_pred = fa["items"] @ w + y.mean() - x.mean(0) @ w
            wt = weight[fa["context_of_item"]].astype(float)
            with np.errstate(invalid="ignore"):
                word_pred = np.bincount(fa["word_of_item"], wt * item_pred) / np.bincount(fa["word_of_item"], wt)
            taus.append(kendalltau(true[drawn], word_pred[drawn], nan_policy="omit").statistic)
        diffs.append(taus[0] - taus[1])
    out = resampled_deltas(feats, true, masks, scales, 0.5, pairs, 40, seed=7)["d"]["all"]
    np.testing.assert_allclose(out["ci95"], np.percentile(diffs, [2.5, 97.5]), atol=1e-12)


def test_resampled_deltas_on_two_threads_are_those_of_one():
    """The bootstrap's draws run on `irm.runtime.worker_threads()` threads (torch's thread count); every draw's
    random numbers are drawn first, in one order, so the draws and the interval do not depend on the count."""
    import torch

    feats, true = chains_world()
    args = (feats, true, {"all": np.ones(len(true), bool)}, {("a", "x"): 1.0, ("b", "x"): 1.0}, 0.5,
            {"d": (("a", "x"), ("b", "x"))}, 60)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = resampled_deltas(*args, seed=3)
        torch.set_num_threads(2)
        two = resampled_deltas(*args, seed=3)
    finally:
        torch.set_num_threads(before)
    assert one == two and one["d"]["all"]["ci95"] is not None


def scipy_taus(true, pred_KN) -> np.ndarray:
    """scipy.stats.kendalltau row by row, NaN pairs left out (its warnings on too few values silenced)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return np.array([kendalltau(true, row, nan_policy="omit").statistic for row in pred_KN])


@pytest.mark.parametrize("n", [2, 3, 201, 257, 800, 1000])
@pytest.mark.parametrize("k", [1, 7])
def test_kendall_taus_equal_scipys_tau_b_with_ties_nans_and_constant_rows(n, k):
    """kendall_taus (all rows at once, merge-sort inversions) against scipy row by row: values from 5 levels (heavy
    ties in both), continuous rows (no ties), NaNs in `true` (dropped for every row) and in some rows (pairs left
    out), constant and all-NaN rows (NaN, as scipy), at 1e-12."""
    rng = np.random.default_rng(100 * n + k)
    true = rng.integers(0, 5, n).astype(float)
    pred = rng.integers(0, 5, (k, n)).astype(float)
    if k > 1:
        pred[1] = rng.normal(size=n)
        pred[2] = 3.0
        pred[3, : max(1, n // 10)] = np.nan
        pred[4, rng.random(n) < 0.3] = np.nan
        pred[5] = np.nan
    np.testing.assert_allclose(kendall_taus(true, pred), scipy_taus(true, pred), rtol=0, atol=1e-12)
    if n > 3:
        true[rng.choice(n, n // 10, replace=False)] = np.nan
        got, ref = kendall_taus(true, pred), scipy_taus(true, pred)
        np.testing.assert_allclose(got, ref, rtol=0, atol=1e-12)
        assert np.isfinite(got).sum() == (k - 2 if k > 1 else 1)  # only the constant and the all-NaN row undefined
    np.testing.assert_allclose(kendall_taus(np.full(n, 1.5), pred), np.full(k, np.nan))  # constant true


def test_kendall_taus_small_and_continuous_cases_and_inversions_by_all_pairs():
    rng = np.random.default_rng(3)
    for n in (2, 3, 4, 5, 17, 64, 150):  # sizes the all-pairs branch took before
        true, pred = rng.normal(size=n), rng.normal(size=(4, n))
        pred[0] = true  # tau 1
        pred[1] = -true  # tau -1
        np.testing.assert_allclose(kendall_taus(true, pred), scipy_taus(true, pred), rtol=0, atol=1e-12)
        np.testing.assert_allclose(kendall_taus(true, pred)[:2], [1.0, -1.0], rtol=0, atol=1e-12)
    assert kendall_taus([1.0, np.nan, 2.0, 3.0], [[np.nan, 5.0, 2.0, 3.0]])[0] == 1.0  # the two complete pairs
    assert np.isnan(kendall_taus([1.0, np.nan, 2.0], [[np.nan, 1.0, 2.0]])[0])  # one complete pair: undefined
    assert kendall_taus([1.0, 2.0, 3.0], [3.0, 1.0, 2.0]).shape == (1,)  # one row as a vector
    with pytest.raises(ValueError):
        kendall_taus([1.0, 2.0, 3.0], np.zeros((2, 4)))
    for n in (1, 2, 7, 8, 9, 33, 100):
        seq = rng.integers(0, 6, (3, n))
        brute = [sum(int(r[i] > r[j]) for i in range(n) for j in range(i + 1, n)) for r in seq]
        np.testing.assert_array_equal(_inversions(seq, 6), brute)


def test_flipped_signs_flip_both_rows_of_half_the_triples():
    triple = np.repeat(np.arange(1000), 2)
    s = flipped_signs(triple, np.random.default_rng(0))
    assert set(np.unique(s)) == {-1.0, 1.0}
    assert (s[0::2] == s[1::2]).all()  # a triple's two rows together
    assert 0.45 < (s[0::2] < 0).mean() < 0.55


def test_word_moves_hand_worked():
    rows, summary = word_moves(["a", "b", "c", "d", "e"], [2, -2, 1, 1, 1], [2, -2, 1, 1, 3.0],
                               [2, -2, 1, 1, -3.0], {"e"}, z=3.0)
    assert rows[0]["word"] == "e" and rows[0]["moved"] and rows[0]["direction"] == "toward"
    assert rows[0]["move"] == 6.0 and rows[0]["heldout"]
    assert summary["n_moved"] == 1 and summary["n_moved_toward"] == 1 and summary["n_toward"] == 1


def test_ridge_path_equals_numpys_solve_and_chooses_the_loo_best_penalty():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(80, 30))
    y = x @ rng.normal(size=30) + 2.0 + 0.5 * rng.normal(size=80)
    path = RidgePath(x, alphas=(1e-3, 1e-1, 10.0))
    w, b, multiple = path.fit(y)
    alpha = multiple * np.mean(np.linalg.svd(x - x.mean(0), compute_uv=False) ** 2)
    xc = x - x.mean(0)
    w_ref = np.linalg.solve(xc.T @ xc + alpha * np.eye(30), xc.T @ (y - y.mean()))
    np.testing.assert_allclose(w, w_ref, atol=1e-9)
    assert b == pytest.approx(y.mean() - x.mean(0) @ w_ref)

    def loo(a):  # brute force: refit without each row
        errs = []
        for i in range(len(y)):
            m = np.arange(len(y)) != i
            xm, ym = x[m], y[m]
            xmc = xm - xm.mean(0)
            wi = np.linalg.solve(xmc.T @ xmc + a * np.eye(30), xmc.T @ (ym - ym.mean()))
            errs.append(y[i] - (x[i] @ wi + ym.mean() - xm.mean(0) @ wi))
        return np.mean(np.square(errs))

    s2 = np.mean(np.linalg.svd(xc, compute_uv=False) ** 2)
    best = min((1e-3, 1e-1, 10.0), key=lambda m: loo(m * s2))
    assert multiple == best


def test_ridge_leave_one_triple_out_equals_refits_without_each_triple_and_one_penalty_serves_both_chains():
    from irm.ridge import shared_multiple

    rng = np.random.default_rng(1)
    x, groups = rng.normal(size=(40, 8)), np.repeat(np.arange(20), 2)
    y = x @ rng.normal(size=8) + rng.normal(size=40)
    path = RidgePath(x, alphas=(1e-2, 1e-1, 1.0, 10.0), groups=groups)

    def brute(multiple):  # refit without each triple's two rows, at the full data's penalty scale
        errs = []
        for g in range(20):
            keep = groups != g
            xm, ym = x[keep], y[keep]
            xmc = xm - xm.mean(0)
            w = np.linalg.solve(xmc.T @ xmc + multiple * path.scale * np.eye(8), xmc.T @ (ym - ym.mean()))
            errs.extend(y[~keep] - (x[~keep] @ w + ym.mean() - xm.mean(0) @ w))
        return np.mean(np.square(errs))

    np.testing.assert_allclose(path.loo_error(y), [brute(m) for m in path.multiples], rtol=1e-10)
    other = RidgePath(x + rng.normal(size=x.shape), alphas=path.multiples, groups=groups)
    total = path.loo_error(y) / y.var() + other.loo_error(2 * y) / (2 * y).var()
    assert shared_multiple([path, other], [y, 2 * y]) == path.multiples[int(np.argmin(total))]


def test_stage_on_a_tiny_model_whose_tuned_policy_is_the_base_model(tiny_cfg, capsys):
    """With M_RLHF == M_base the two chains are the same computation: delta_tau is exactly 0, no word moves, and the
    verdict is "not distinguishable". The codes read through the wrapped SAEs equal the deltas stage's rows."""
    from safetensors.torch import load_file
    from test_validate import TINY_YAML, build_upstream

    from irm.cli import main

    build_upstream(tiny_cfg)
    root = Path(tiny_cfg.run_dir)
    args = ["--config", str(TINY_YAML), "--run_dir", tiny_cfg.run_dir, "--cache.layers", "[1, 3]", "--triples.n",
            "40", "--control.max_words", "200", "--control.permutations", "20", "--control.bootstrap", "50",
            "--lexicon.contexts_per_word", "2", "--control.base_saes", "tuned"]
    for stage in ("triples", "deltas", "control"):
        main([stage, *args])
    out = capsys.readouterr().out
    report = json.loads((root / "control.json").read_text())
    assert "delta_tau" in out and report["n_triples"] == 40
    assert report["tuned"]["tau"]["all"]["tau"] == report["base"]["tau"]["all"]["tau"]
    d = report["delta_tau"]["all"]
    assert d["delta"] == 0.0 and d["ci95"] == [0.0, 0.0]
    assert report["per_word"]["n_moved"] == 0
    assert report["sae_fit"]["nmse_at_sentiment_tokens"]["tuned"] == report["sae_fit"]["nmse_at_sentiment_tokens"][
        "base"]
    rows = list(csv.DictReader(open(root / "control_words.csv")))
    assert len(rows) == report["n_words"] and all(float(r["move"]) == 0 for r in rows)
    row = next(r for r in build_findings(root) if r["claim"].startswith("RLHF moved"))
    assert row["verdict"] == NOT_DISTINGUISHABLE
    # The tuned chain took its triple rows from the deltas stage's shards (the base chain read its own, and the
    # equalities above say the two agree); they equal a fresh read through the same model and SAEs.
    from irm.stages.control import tuned_rows
    from irm.delta_rows import triple_rows
    from irm.sae.splice import load_saes
    from irm.models import load_tuned
    from irm.readers import read_triples

    shard = load_file(str(root / "deltas" / "shard-00000.safetensors"))
    assert shard["x"].shape[0] == 80 and shard["x_raw"].shape == (80, 2 * 64)
    stored = tuned_rows(root, 40)
    assert stored is not None
    model, tokenizer = load_tuned(tiny_cfg)
    saes = load_saes(root, [1, 3], model, tiny_cfg.cache.site, 1)
    fresh = triple_rows(model, saes, read_triples(root), tokenizer.pad_token_id, 8, tiny_cfg.cache.site,
                        "tuned")
    for key in ("x", "x_raw", "y", "sign", "triple"):
        np.testing.assert_allclose(stored[key].numpy(), fresh[key].numpy(), rtol=1e-5, atol=1e-6)


def test_report_opens_with_findings_and_summary_names_the_control_numbers(tmp_path):
    from irm.stages.control import words_csv
    from irm.report import Doc, ReportInputs, build_summary, control_section, findings_section

    features, words, true, heldout, seen = world(changed=30)
    report, rows = analyse(features, words, true, heldout, seen, CC, (10, 90), 0)
    report.update({"sae_choice": "tuned SAEs", "n_words": len(words), "n_contexts": 2, "n_triples": N_TRIPLES,
                   "sae_fit": {"nmse_at_sentiment_tokens": {"tuned": 0.1, "base": 0.12}}})
    (tmp_path / "control.json").write_text(json.dumps(report))
    (tmp_path / "control_words.csv").write_text(words_csv(rows))
    (tmp_path / "reward_eval.json").write_text(json.dumps(
        {"difference": {"mean": 0.3, "ci95": [0.2, 0.4], "p_value": 1e-5, "n": 256}}))
    inputs = ReportInputs.read(None, tmp_path, tmp_path)
    doc, summary = Doc(), build_summary(inputs)
    findings_section(doc, inputs)
    control_section(doc, inputs)
    assert doc.md[0].startswith("## Findings") and (tmp_path / "control.png").exists()
    verdicts = {r["claim"].split(" (")[0]: r["verdict"] for r in summary["findings"]}
    assert verdicts["RLHF raised the reward"] == SUPPORTED
    assert verdicts["RLHF moved the implicit reward toward the training reward"] == SUPPORTED
    s = summary["control"]
    assert s["delta_tau_tuned_minus_base"]["delta"] == pytest.approx(s["tau_tuned"] - s["tau_base"])
    assert s["delta_tau_tuned_minus_base"]["ci95"] == report["delta_tau"]["all"]["ci95"]
    assert s["permutation_p_tuned"] < 0.01 and s["raw_activation_tau_tuned"] is not None
    assert summary["reward"]["paired_difference_tuned_minus_base"]["ci95"] == [0.2, 0.4]
    text = "\n".join(doc.md)
    assert "delta_tau" in text and "Words that moved" in text


def test_findings_flag_a_control_whose_dictionary_does_not_fit_the_base_model(tmp_path):
    report, _, _, _ = run_analysis(tmp_path, changed=0)
    for nmse, flagged in (({"tuned": 0.2, "base": 0.25}, False), ({"tuned": 0.2, "base": 26000.0}, True)):
        report["sae_fit"] = {"nmse_at_sentiment_tokens": nmse}
        (tmp_path / "control.json").write_text(json.dumps(report))
        [row] = build_findings(tmp_path, [differs_from_base])
        assert ("CAUTION" in row["detail"]) == flagged


def test_base_chain_with_its_own_saes_trains_them_on_the_base_model(tiny_cfg, capsys):
    """control.base_saes: base runs the cache and sae stages on a sub-run whose policy is M_base and reads the base
    chain through those SAEs: here they were trained on the model's activations, the tuned ones are untrained, so
    the base chain's SAEs reconstruct better."""
    from test_validate import TINY_YAML, build_upstream

    from irm.cli import main

    build_upstream(tiny_cfg)
    root = Path(tiny_cfg.run_dir)
    args = ["--config", str(TINY_YAML), "--run_dir", tiny_cfg.run_dir, "--cache.layers", "[1, 3]", "--triples.n",
            "40", "--control.max_words", "200", "--control.permutations", "20", "--control.bootstrap", "50",
            "--control.base_saes", "base", "--sae.epochs", "1", "--cache.n_documents", "100"]
    for stage in ("triples", "control"):
        main([stage, *args])
    report = json.loads((root / "control.json").read_text())
    assert "own SAEs" in report["sae_choice"]
    for layer in (1, 3):
        assert (root / "control" / "base-run" / "sae" / f"layer-{layer:02d}" / "x1" / "cfg.json").is_file()
    fit = report["sae_fit"]["nmse_at_sentiment_tokens"]
    assert fit["base"] < fit["tuned"]
