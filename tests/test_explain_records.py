"""Top-activating records: window maxima from one pass match a brute-force numpy computation for any batch size,
the selection is what it says, and 0-10 activations are scaled by the feature's maximum over all its records."""

import numpy as np
import pytest
from explain_rundir import build_run, codes
from irm.explain.records import (discretise, feature_records, read_windows, select_windows, token_strings,
                                 window_maxima)

WINDOW = 8


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    return root, build_run(root, n_docs=80)


def _cache(root, layer=1):
    from irm.activations import ActivationCache

    return ActivationCache(root / "cache" / f"layer-{layer:02d}")


def _brute_force(acts, docs, pos, dictionary):
    """Per (document, position // WINDOW) group, in row order: the max of each feature's code."""
    c = codes(acts, dictionary)
    keys = list(zip(docs.tolist(), (pos // WINDOW).tolist()))
    groups: dict = {}
    for row, key in enumerate(keys):
        groups.setdefault(key, []).append(row)
    order = sorted(groups, key=lambda k: groups[k][0])
    return order, np.stack([c[groups[k]].max(0) for k in order]), [groups[k][0] for k in order]


@pytest.mark.parametrize("batch_rows", [13, 100_000])  # 13: batches end mid-window and mid-shard
def test_window_maxima_match_brute_force_for_any_batch_size(built, batch_rows):
    root, data = built
    acts, _, docs, pos = data[1]
    from irm.sae import load_sae, sae_dir

    sae = load_sae(sae_dir(root, 1, 2))
    wins, maxima, _ = window_maxima(_cache(root), sae.encode, WINDOW, batch_rows=batch_rows)
    order, expect, first_rows = _brute_force(acts, docs, pos, "x2")
    assert len(wins) == len(order)
    np.testing.assert_array_equal(wins.row, first_rows)
    np.testing.assert_array_equal(wins.doc, [k[0] for k in order])
    assert (wins.length <= WINDOW).all() and wins.length.sum() == len(acts)
    np.testing.assert_allclose(maxima, expect, rtol=1e-6, atol=1e-6)


def test_select_windows_takes_the_top_then_one_per_lower_quantile_bin_and_holds_out_the_rest():
    rng = np.random.default_rng(0)
    maxima = np.concatenate([np.linspace(10, 1, 20), np.zeros(15)])  # 20 activating windows (descending), 15 dead
    perm = rng.permutation(len(maxima))
    m = maxima[perm]
    sel = select_windows(m, n_top=5, n_quantile=3, n_score=4, rng=np.random.default_rng(1))
    assert sorted(m[sel.top].tolist(), reverse=True) == maxima[:5].tolist()
    assert m[sel.top].tolist() == sorted(m[sel.top].tolist(), reverse=True)  # strongest first
    # the 15 remaining activating windows, split in 3 bins of 5 by rank: one sample from each, strongest bin first
    rest = maxima[5:20]
    for q, bin_values in zip(sel.quantile, (rest[:5], rest[5:10], rest[10:])):
        assert m[q] in bin_values
    shown = set(sel.top) | set(sel.quantile)
    assert len(sel.active) == 4 and not shown & set(sel.active) and (m[sel.active] > 0).all()
    assert len(sel.inactive) == 4 and (m[sel.inactive] == 0).all()


def test_select_windows_of_a_feature_that_rarely_fires_shows_what_there_is():
    m = np.array([0.0, 2.0, 0.0, 0.0, 1.0])
    sel = select_windows(m, n_top=5, n_quantile=3, n_score=2, rng=np.random.default_rng(0))
    assert sel.top == [1, 4] and sel.quantile == [] and sel.active == []
    assert sorted(sel.inactive) == sel.inactive and set(sel.inactive) <= {0, 2, 3}


def test_discretise_hand_worked():
    # max over all records is 4: 1 -> 2.5 -> 3 (half up), 2 -> 5, 4 -> 10, negative -> 0
    assert discretise([np.array([0.0, 1.0, 2.0]), np.array([-1.0, 4.0])], 4.0) == [[0, 3, 5], [0, 10]]
    assert discretise([np.array([0.0, 0.0])], 0.0) == [[0, 0]]


def test_records_are_scaled_by_the_feature_max_over_all_records_not_per_record(built):
    from irm.sae import load_sae, sae_dir
    from irm.models import tiny_tokenizer

    root, data = built
    acts, token_ids, docs, pos = data[1]
    sae = load_sae(sae_dir(root, 1, 1))
    wins, maxima, _ = window_maxima(_cache(root), sae.encode, WINDOW)
    feature = 2
    sel = select_windows(maxima[:, feature], n_top=3, n_quantile=3, n_score=2, rng=np.random.default_rng(0))
    windows = read_windows(_cache(root), sae.encode, wins, sel.top + sel.quantile)
    tok = tiny_tokenizer()
    recs = feature_records(sel, feature, wins, windows, lambda w: token_strings(tok, windows[w][0].tolist()))
    assert [r["kind"] for r in recs] == ["top"] * len(sel.top) + ["quantile"] * len(sel.quantile)
    c = codes(acts, "x1")[:, feature]
    global_max = c.max()  # the feature's maximum over the whole cache is in its top window
    for r, w in zip(recs, sel.top + sel.quantile):
        rows = np.arange(wins.row[w], wins.row[w] + wins.length[w])
        np.testing.assert_allclose(r["activations"], c[rows], rtol=1e-6)
        assert r["token_ids"] == token_ids[rows].tolist()
        assert "".join(r["tokens"]) == tok.decode(token_ids[rows].tolist()) and len(r["tokens"]) == len(rows)
        assert r["discrete"] == np.floor(10 * np.maximum(c[rows], 0) / global_max + 0.5).astype(int).tolist()
    # per-record scaling would give every record a 10; a weaker one must not have one
    assert max(recs[0]["discrete"]) == 10
    weakest = min(recs, key=lambda r: max(r["activations"]))
    assert max(weakest["activations"]) < 0.9 * global_max and max(weakest["discrete"]) < 10


def test_token_strings_keep_a_character_split_over_byte_level_tokens_whole():
    """A byte-level BPE (GPT-2/SmolLM2 style) spells "é" and "😀" in two or more byte tokens: decoding each token
    alone shows U+FFFD parts; the streaming decode gives the character to the token that completes it, and the
    tokens joined spell the text back."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(["a fine day", "fine words"] * 20, trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe)
    text = " café 😀 fine"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    alone = [tok.decode([i]) for i in ids]
    assert any("\ufffd" in t for t in alone)  # the case this guards
    strings = token_strings(tok, ids)
    assert len(strings) == len(ids) and "".join(strings) == tok.decode(ids) == text
    assert not any("\ufffd" in t for t in strings)
