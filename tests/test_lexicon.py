"""Lexicon reconstruction maths: a planted linear reward is recovered on held-out words (tau > 0.9) and a shuffled
target gives tau near 0 with a large p-value, through the real regression (DeltaDataModule + IRMRegression) and the
stage's summary; Kendall tau is scipy's on float vectors, never on strings; rescaling, bootstrap, sign agreement."""

import csv
import io
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from scipy.stats import kendalltau

from irm.stages.lexicon import lexicon_csv, sign_agreement, summarise
from irm.readout import apply_mapping, kendall, per_word, raw_threshold, rescale
from irm.config import RegressionConfig
from irm.regression import DeltaDataModule, IRMRegression

torch.set_num_threads(1)


def planted_world(n_words=500, n_features=64, n_contexts=4, seed=0):
    """Words with SAE-like codes, a planted linear reward w* whose values (rounded like VADER's) are the true
    lexicon, and contexts that add the same offset to every word read in them."""
    rng = np.random.default_rng(seed)
    codes_WF = rng.normal(size=(n_words, n_features))
    w_star = rng.normal(size=n_features)
    score = codes_WF @ w_star
    true = np.round(4 * score / np.abs(score).max(), 1)
    contexts_CF = 0.3 * rng.normal(size=(n_contexts, n_features))
    words = [f"w{i:03d}" for i in range(n_words)]
    heldout = set(rng.choice(words, size=n_words // 5, replace=False).tolist())
    return words, codes_WF, w_star, true, contexts_CF, heldout


def fit_r(directory: Path, x, y, epochs=15):
    from irm.artifacts import write_json
    from irm.stages.deltas import MANIFEST, write_shard

    directory.mkdir(parents=True)
    n = len(x)
    shard = write_shard(directory, 0, torch.as_tensor(x), torch.as_tensor(y), torch.arange(n) // 2, torch.ones(n))
    write_json(directory / MANIFEST, {"layers": [0], "width": x.shape[1], "site": "mlp_out", "n_features": x.shape[1],
                                      "n_triples": n // 2, "shards": [shard], "rows": n, "complete": True})
    L.seed_everything(0)
    model = IRMRegression(RegressionConfig(learning_rate=0.05, weight_decay=1e-4), x.shape[1])
    L.Trainer(max_epochs=epochs, accelerator="cpu", logger=False, enable_checkpointing=False,
              enable_progress_bar=False, enable_model_summary=False).fit(
        model, datamodule=DeltaDataModule(str(directory), RegressionConfig(batch_size=64, val_fraction=0.1)))
    return model.linear.weight.detach().double().numpy().ravel(), float(model.linear.bias.detach())


def reconstruct(tmp_path, shuffle_targets):
    words, codes_WF, w_star, true, contexts_CF, heldout = planted_world()
    rng = np.random.default_rng(1)
    seen = [i for i, w in enumerate(words) if w not in heldout]
    # Training rows: seen words only, in every context, target = planted reward + noise.
    x = np.concatenate([codes_WF[seen] + c for c in contexts_CF]).astype(np.float32)
    y = (x @ w_star + 0.1 * rng.normal(size=len(x))).astype(np.float32)
    if shuffle_targets:
        y = rng.permutation(y)
    weight, bias = fit_r(tmp_path / ("shuffled" if shuffle_targets else "planted"), x, y)
    # Lexicon stage maths: R applied to every word in every context, averaged per word.
    rows_x = np.concatenate([codes_WF + c for c in contexts_CF])
    word_of_row = np.tile(np.arange(len(words)), len(contexts_CF))
    raw = per_word(rows_x @ weight + bias, word_of_row, len(words))
    return summarise(words, true, raw, heldout, {words[i] for i in seen}, (10, 90), bootstrap=200, seed=0,
                     sample_size=10)


def test_planted_linear_reward_is_recovered_on_heldout_words(tmp_path):
    rows, report = reconstruct(tmp_path, shuffle_targets=False)
    assert report["heldout"]["n"] == 100
    assert report["heldout"]["tau"] > 0.9 and report["heldout"]["p"] < 1e-10
    assert report["all"]["tau"] > 0.9 and report["negative"]["tau"] > 0.8
    assert report["sign_agreement"] > 0.9
    lo, hi = report["heldout"]["ci95"]
    assert lo <= report["heldout"]["tau"] <= hi


def test_shuffled_target_gives_tau_near_zero_with_large_p(tmp_path):
    _, report = reconstruct(tmp_path, shuffle_targets=True)
    assert abs(report["heldout"]["tau"]) < 0.15
    assert report["heldout"]["p"] > 0.05
    lo, hi = report["heldout"]["ci95"]
    assert lo < 0 < hi


def test_kendall_is_scipys_on_float_vectors_including_ties():
    rng = np.random.default_rng(0)
    true = np.round(rng.uniform(-4, 4, 300), 1)
    pred = true + rng.normal(0, 2, 300)
    pred[:20] = 1.0  # ties in both vectors
    ours = kendall(true.tolist(), pred.tolist())
    ref = kendalltau(true, pred)
    assert ours["tau"] == pytest.approx(ref.statistic, abs=1e-12)
    assert ours["p"] == pytest.approx(ref.pvalue, rel=1e-9)
    assert ours["n"] == 300 and ours["bootstrap"] == 0 and ours["ci95"] is None  # no interval unless asked


def test_kendall_is_defined_from_two_words_and_for_a_range_of_exactly_one():
    """By hand: two words in the same order have tau 1, in opposite order -1; values spanning exactly 1 are not
    constant. A constant vector has no tau."""
    assert kendall([1.0, 2.0], [5.0, 7.0])["tau"] == pytest.approx(1.0)
    assert kendall([1.0, 2.0], [7.0, 5.0])["tau"] == pytest.approx(-1.0)
    assert kendall([0.0, 1.0, 0.5], [0.0, 2.0, 1.0])["tau"] == pytest.approx(1.0)
    assert kendall([0.0, 2.0, 1.0], [0.0, 1.0, 0.5])["tau"] == pytest.approx(1.0)
    assert kendall([1.0, 1.0, 1.0], [0.0, 2.0, 1.0])["tau"] is None


def test_bootstrap_interval_matches_a_numpy_percentile_bootstrap_of_resampled_taus():
    """numpy/scipy alone: words resampled with replacement (pairs kept), scipy's tau of each resample, the 2.5th and
    97.5th percentiles. Different random draws, so the two intervals agree to the bootstrap's own noise."""
    rng = np.random.default_rng(3)
    true = np.round(rng.uniform(-4, 4, 60), 1)
    pred = true + rng.normal(0, 3, 60)
    draws = np.random.default_rng(9)
    taus = []
    for _ in range(3000):
        idx = draws.integers(0, 60, 60)
        taus.append(kendalltau(true[idx], pred[idx]).statistic)
    expected = np.percentile(taus, [2.5, 97.5])
    got = kendall(true, pred, bootstrap=3000, seed=9)["ci95"]
    assert got == pytest.approx(expected.tolist(), abs=0.015)
    assert expected[1] - expected[0] > 0.1  # a real width, not two equal numbers


def test_kendall_refuses_strings_and_handles_degenerate_input():
    with pytest.raises(TypeError, match="never words"):
        kendall(["good", "bad"], [1.0, -1.0])
    assert kendall([1.0], [2.0])["tau"] is None
    assert kendall([1.0, 2.0, 3.0], [5.0, 5.0, 5.0])["tau"] is None
    for a, b in (([1.0, 2.0, 3.0], [1.0, 2.0]), (np.eye(3), np.eye(3))):  # unequal lengths; matrices, not vectors
        with pytest.raises(ValueError, match="two vectors"):
            kendall(a, b)


def test_bootstrap_interval_is_seeded_and_brackets_tau():
    rng = np.random.default_rng(1)
    true = rng.normal(size=80)
    pred = true + rng.normal(size=80)
    a, b = kendall(true, pred, bootstrap=300, seed=5), kendall(true, pred, bootstrap=300, seed=5)
    assert a["ci95"] == b["ci95"] and a["ci95"][0] < a["tau"] < a["ci95"][1]
    assert a["ci95"] != kendall(true, pred, bootstrap=300, seed=6)["ci95"]


def test_rescale_maps_percentiles_onto_plus_minus_four_and_clips():
    raw = np.arange(11, dtype=float)  # percentiles 10 and 90 are 1 and 9
    scaled, mapping = rescale(raw, (10, 90))
    assert mapping["raw_at_percentiles"] == [1.0, 9.0]
    np.testing.assert_allclose(scaled, [-4, -4, -3, -2, -1, 0, 1, 2, 3, 4, 4])
    np.testing.assert_allclose(apply_mapping([5.0, 100.0], mapping), [0.0, 4.0])
    assert apply_mapping([raw_threshold(3.0, mapping)], mapping)[0] == pytest.approx(3.0)
    assert (apply_mapping(np.ones(3), {"raw_at_percentiles": [2.0, 2.0]}) == 0).all()
    assert rescale(raw)[1]["percentiles"] == [10.0, 90.0]  # the authors' default
    from irm.config import RunConfig, check_all
    from irm.errors import UserError

    for bad in ((10, 100.5), (-0.5, 90), (50, 50)):  # refused before any stage runs, so rescale never sees them
        cfg = RunConfig()
        cfg.lexicon.percentiles = list(bad)
        with pytest.raises(UserError, match="lexicon.percentiles"):
            check_all(cfg, ["lexicon"])
    np.testing.assert_allclose(rescale(raw, (0, 100))[0], np.linspace(-4, 4, 11))  # the extremes are allowed


@pytest.mark.parametrize("setting", [("contexts_per_word", 0), ("bootstrap", -1), ("max_words", 1)])
def test_stage_refuses_each_impossible_setting_alone(in_tmp, setting):
    """Through the stage's entry (`python -m irm lexicon`), which validates the config before anything runs."""
    from conftest import TINY_YAML

    from irm.cli import run_stage
    from irm.errors import UserError

    name, value = setting
    with pytest.raises(UserError, match="lexicon.contexts_per_word must be >= 1"):
        run_stage("lexicon", ["--config", str(TINY_YAML), "--run_dir", str(in_tmp / "run"), f"--lexicon.{name}",
                              str(value)])
    assert not (in_tmp / "run").exists()


def test_sign_agreement_and_per_word_mean_hand_worked():
    assert sign_agreement([1.0, -2.0, 3.0, -1.0], [0.5, 0.1, 2.0, 0.0]) == 0.5
    np.testing.assert_allclose(per_word([1.0, 3.0, 10.0, 2.0], np.array([0, 0, 1, 2]), 3), [2.0, 10.0, 2.0])
    with pytest.raises(ValueError):
        per_word([1.0], np.array([0]), 2)


def test_csv_columns_reproduce_the_reported_tau():
    rng = np.random.default_rng(2)
    words = [f"w{i}" for i in range(60)]
    true = np.round(rng.uniform(-4, 4, 60), 1)
    raw = true + rng.normal(0, 1, 60)
    seen = {f"w{i}" for i in range(4, 14)}
    rows, report = summarise(words, true, raw, {"w1", "w2", "w3"}, seen, (10, 90), 0, 0, 5)
    table = list(csv.DictReader(io.StringIO(lexicon_csv(rows))))
    assert {"word", "true", "reconstructed", "heldout"} <= set(table[0])
    t, r = [float(row["true"]) for row in table], [float(row["raw"]) for row in table]
    assert kendalltau(t, r).statistic == pytest.approx(report["all"]["tau"], abs=1e-12)
    assert all(-4 <= float(row["reconstructed"]) <= 4 for row in table)
    assert sum(int(row["heldout"]) for row in table) == report["heldout"]["n"] == 3
    assert [row["word"] for row in table if row["seen"] == "1"] == [f"w{i}" for i in range(4, 14)]
    assert report["seen"]["n"] == 10
    assert report["seen"]["tau"] == pytest.approx(kendalltau(true[4:14], raw[4:14]).statistic, abs=1e-12)
    assert report["heldout"]["tau"] == pytest.approx(kendalltau(true[1:4], raw[1:4]).statistic, abs=1e-12)
    assert len(report["sample"]) == 5 and report["negative"]["n"] == int((true < 0).sum())


def test_per_word_of_feature_rows_is_the_mean_of_each_words_rows():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(50, 7))
    word = rng.integers(0, 6, 50)
    word[:6] = np.arange(6)
    expect = np.stack([x[word == i].mean(axis=0) for i in range(6)])
    np.testing.assert_allclose(per_word(x, word, 6), expect, atol=1e-12)


def test_words_are_read_only_in_the_unseen_contexts_the_triples_stage_kept():
    from irm.errors import UserError
    from irm.readout import unseen_contexts, word_items
    from irm.models import tiny_tokenizer

    phrases = ["the film was ", "the plot is ", "the actors were ", "i think it is ", "the ending was ",
               "the music is ", "the story was ", "the director is ", "this movie is ", "the cast was "]
    info = {"contexts": {"texts": phrases}}
    picked = unseen_contexts(info, 4, seed=0)
    assert len(picked) == 4 and set(picked) <= set(info["contexts"]["texts"])
    assert picked == unseen_contexts(info, 4, seed=0) and picked != unseen_contexts(info, 4, seed=1)
    with pytest.raises(UserError, match="rerun"):
        unseen_contexts({"contexts": {"texts": []}}, 4, seed=0)
    tok = tiny_tokenizer()
    items, word_of_row = word_items(tok, ["good", "bad"], picked)
    assert len(items) == len(word_of_row) == 8  # each word is one token in each of the 4 contexts
    assert word_of_row.tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    for (ids, positions), w in zip(items, word_of_row):
        assert any(ids == tok(c + ["good", "bad"][w])["input_ids"] for c in picked)
        assert tok.decode([ids[p] for p in positions]).strip() == ["good", "bad"][w]


def test_only_single_token_lexicon_words_are_read():
    """By hand, with the tiny word-level tokenizer: good, bad, great are one token each; ':)' is two (':' and ')')
    and is skipped; 'well done' holds a space and is not a word. A sample of 2 is drawn from the three."""
    from irm.readout import lexicon_words
    from irm.models import tiny_tokenizer

    lexicon = {"good": 1.9, "bad": -2.5, ":)": 2.0, "great": 3.1, "well done": 1.0}
    words, counts = lexicon_words(tiny_tokenizer(), lexicon, None, 0)
    assert words == ["bad", "good", "great"]
    assert counts == {"single_token_words": 3, "multi_token_words_skipped": 1}
    sample, _ = lexicon_words(tiny_tokenizer(), lexicon, 2, 0)
    assert len(sample) == 2 and set(sample) <= {"bad", "good", "great"}


def test_a_word_sample_keeps_the_planted_words_up_to_half_and_is_unchanged_for_vader():
    """Words whose sign differs from VADER's are always sampled (up to half the sample, the rest compares them);
    a VADER lexicon draws the same seeded sample as a plain random.sample of its single-token words."""
    import random

    from irm.readout import lexicon_words
    from irm.models import tiny_tokenizer
    from irm.reward import vader_lexicon

    vader = {w: v for w, v in vader_lexicon().items() if w.isalpha() and w == w.lower()}
    everything, _ = lexicon_words(tiny_tokenizer(), vader, None, 0)
    sample, _ = lexicon_words(tiny_tokenizer(), vader, 50, 3)
    assert sample == sorted(random.Random("irm-lexicon-words:3").sample(everything, 50))
    flipped = {**vader, "good": -3.0, "bad": 3.0, "awful": 2.0}
    sample, _ = lexicon_words(tiny_tokenizer(), flipped, 50, 3)
    assert {"good", "bad", "awful"} <= set(sample) and len(sample) == 50
    many = {w: (-v if i % 2 else v) for i, (w, v) in enumerate(vader.items())}
    sample, _ = lexicon_words(tiny_tokenizer(), many, 50, 3)
    assert sum(many[w] != vader[w] for w in sample) == 25


def test_a_word_that_is_not_one_token_in_a_context_is_not_read_there():
    """By hand, with the tiny word-level tokenizer: ':)' is two tokens after any context, so it is never read;
    'great' after 'it is ' is one token at position 2 (ids of 'it', 'is', 'great'); after 'it is' without the space it
    merges into one unknown token that covers the context's last characters too, still one token."""
    from irm.readout import word_items
    from irm.models import tiny_tokenizer

    tok = tiny_tokenizer()
    items, word_of_row = word_items(tok, ["great", ":)"], ["it is ", "the film was "])
    assert word_of_row.tolist() == [0, 0]
    assert items[0] == (tok("it is great")["input_ids"], [2])
    assert items[1] == (tok("the film was great")["input_ids"], [3])
    assert len(tok("it is :)")["input_ids"]) == 4  # the skipped word really is two tokens there


# The stage, on the tiny model -------------------------------------------------------------------------------------

LAYERS = [1, 3]
BIAS = 0.75  # R's intercept: far from 0, so its sign shows in every raw value


def lexicon_run(cfg, contexts):
    """A run directory with what the lexicon stage reads, made with the owners' public functions: the tiny model as
    the tuned policy, 1x SAEs of layers 1 and 3 (random, with biases that make codes fire), R (random weight,
    intercept BIAS) and a triples.json naming held-out and used words and the unseen contexts."""
    from safetensors.torch import save_file

    from irm.artifacts import write_json
    from irm.models import load_model, site_width
    from irm.readers import IRM_EXPORT
    from irm.stages.regression import REGRESSION_DIR
    from irm.sae import SparseAutoencoder, sae_dir, save_sae
    from irm.stages import artifact

    root = Path(cfg.run_dir)
    model, tokenizer = load_model(cfg.model, seed=cfg.seed)
    model.save_pretrained(root / "rlhf" / "policy")
    tokenizer.save_pretrained(root / "rlhf" / "policy")
    width = site_width(model, "mlp_out")
    torch.manual_seed(0)
    for layer in LAYERS:
        sae = SparseAutoencoder(width, width, tied=False)
        with torch.no_grad():
            sae.b_enc.uniform_(0.0, 0.5)
        save_sae(sae, sae_dir(root, layer, 1), layer=layer)
    weight = torch.randn(len(LAYERS) * width, generator=torch.Generator().manual_seed(1))
    (root / REGRESSION_DIR).mkdir(parents=True)
    save_file({"weight": weight, "bias": torch.tensor([BIAS]), "layers": torch.tensor(LAYERS)},
              str(root / REGRESSION_DIR / IRM_EXPORT))
    write_json(artifact(root, "triples_summary"), {"heldout": {"positive": ["good", "great"], "negative": ["bad"]},
                                                   "used": {"positive": ["love"], "negative": ["hate"]},
                                                   "contexts": {"texts": contexts}})
    return weight.double().numpy()


def test_stage_raw_column_is_r_on_the_words_codes_averaged_over_contexts(tiny_cfg):
    """lexicon.csv's `raw` of every word, recomputed one (context + word) text at a time without the stage's batching
    or shared-prefix cache: SAE codes at the word (layer 1 from a plain forward, layer 3 with layer 1's SAE spliced
    in), R = codes . w + b, averaged over the contexts; `true` is VADER's own lexicon value; kendall.json's tau is
    scipy's on those columns."""
    import json

    from test_validate import independent_codes
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    from irm.stages.lexicon import run
    from irm.models import load_pretrained

    contexts = ["the film was ", "i think it is "]
    cfg = tiny_cfg
    cfg.cache.layers = LAYERS
    cfg.lexicon.contexts_per_word, cfg.lexicon.bootstrap, cfg.lexicon.max_words = 1, 0, 2  # the smallest accepted
    weight = lexicon_run(cfg, contexts)
    root = Path(cfg.run_dir)
    run(cfg)
    assert json.loads((root / "kendall.json").read_text())["words_evaluated"] == 2
    cfg.lexicon.contexts_per_word, cfg.lexicon.max_words = 2, 12
    run(cfg)
    table = list(csv.DictReader(open(root / "lexicon.csv")))
    report = json.loads((root / "kendall.json").read_text())
    assert len(table) == report["words_evaluated"] == 12 and report["merged_in_context_skipped"] == 0
    _, tokenizer = load_pretrained(root / "rlhf" / "policy")
    vader = SentimentIntensityAnalyzer().lexicon
    raw, true = [], []
    for row in table:
        r = []
        for prefix in contexts:
            ids = tokenizer(prefix + row["word"])["input_ids"]
            c1, c3 = independent_codes(root, ids, len(ids) - 1)
            r.append(float(torch.cat([c1, c3]).double().numpy() @ weight) + BIAS)
        raw.append(np.mean(r))
        true.append(vader[row["word"]])
    assert [float(row["raw"]) for row in table] == pytest.approx(raw, abs=1e-4)
    assert [float(row["true"]) for row in table] == pytest.approx(true, abs=1e-12)
    assert report["all"]["tau"] == pytest.approx(kendalltau(true, raw).statistic, abs=1e-12)
    assert [int(row["heldout"]) for row in table] == [int(row["word"] in ("good", "great", "bad")) for row in table]


def test_choose_contexts_picks_distinct_non_blank_triple_prefixes_seeded():
    """benchmarks/lexicon_prefix.py's contexts: k of the distinct non-blank prefixes, seeded; [''] when none."""
    from irm.stages.lexicon import choose_contexts

    triples = [{"prefix": p} for p in ("the film was ", "the film was ", "it is ", "  ", "a plot so ")]
    picked = choose_contexts(triples, 2, seed=0)
    assert len(picked) == 2 and set(picked) < {"the film was ", "it is ", "a plot so "}
    assert picked == choose_contexts(triples, 2, seed=0)
    assert sorted(choose_contexts(triples, 10, seed=1)) == ["a plot so ", "it is ", "the film was "]
    assert choose_contexts([{"prefix": " "}], 3, seed=0) == [""]
