"""The generated review corpus, the corpus loaders (generated, local files, hub), prompt and prefix tokenisation,
and the corpus fingerprint, checked against independent tokenisations and hand-built files."""

import json
import os
import re
from collections import Counter

import pytest

from irm.config import CorpusConfig
from irm.data import corpus_fingerprint, load_texts, make_prompts, prefixes
from irm.data.generated import LABELS, generate_labelled_reviews, generate_reviews, vocabulary
from irm.errors import UserError
from irm.reward import vader_lexicon

WORD = re.compile(r"\w+")


# --- the generated corpus -------------------------------------------------------------------------------------

def test_same_seed_same_reviews_and_a_larger_n_extends_a_smaller_one():
    assert generate_reviews(300, seed=3, split="train") == generate_reviews(300, seed=3, split="train")
    assert generate_reviews(500, seed=3, split="train")[:300] == generate_reviews(300, seed=3, split="train")
    assert generate_reviews(300, seed=4, split="train") != generate_reviews(300, seed=3, split="train")


def test_splits_are_disjoint_and_reviews_distinct():
    train, test = generate_reviews(4000, 0, "train"), generate_reviews(4000, 0, "test")
    assert len(train) == len(test) == 4000
    assert len(set(train)) == len(set(test)) == 4000
    assert not set(train) & set(test)
    assert not set(generate_reviews(2000, 1, "train")) & set(test)  # another seed's train is disjoint too


def test_reviews_have_two_to_eight_simple_sentences_and_every_label():
    reviews = generate_labelled_reviews(2000, 0, "train")
    counts = Counter(r.label for r in reviews)
    assert set(counts) == set(LABELS) and min(counts.values()) > 100
    for r in reviews:
        assert re.fullmatch(r"[a-z ,.]+", r.text), r.text
        assert 2 <= r.text.count(".") <= 8 and r.text.endswith(".")


def test_vocabulary_covers_every_generated_word_and_nothing_unused():
    used = {w for split in ("train", "test") for t in generate_reviews(4000, 0, split) for w in WORD.findall(t)}
    vocab = vocabulary()
    assert vocab == sorted(set(vocab)) and all(w == w.lower() and WORD.fullmatch(w) for w in vocab)
    assert used <= set(vocab)
    assert len(used) >= 0.98 * len(vocab)  # the list is what the generator emits, not a padded word list


def test_many_distinct_lexicon_words_in_many_contexts_and_neutral_words_too():
    lexicon = vader_lexicon()
    train = generate_reviews(4000, 0, "train")
    words = {w for t in train for w in WORD.findall(t)}
    assert sum(lexicon.get(w, 0) > 0 for w in words) >= 120
    assert sum(lexicon.get(w, 0) < 0 for w in words) >= 90
    assert sum(w not in lexicon for w in words) >= 300
    # Contexts for contrastive triples: each review up to and including its first positive lexicon token.
    contexts = set()
    for text in train:
        tokens = re.findall(r"\w+|[^\w\s]", text)
        first = next((i for i, w in enumerate(tokens) if lexicon.get(w, 0) > 0), None)
        if first is not None:
            contexts.add(tuple(tokens[:first + 1]))
    assert len(contexts) >= 2000


def test_labels_agree_with_the_lexicon_sum():
    lexicon = vader_lexicon()
    by_label = {label: [] for label in LABELS}
    for r in generate_labelled_reviews(2000, 5, "test"):
        by_label[r.label].append(sum(lexicon.get(w, 0.0) for w in WORD.findall(r.text)))
    mean = {label: sum(v) / len(v) for label, v in by_label.items()}
    assert mean["positive"] > 4 and mean["negative"] < -4
    assert abs(mean["neutral"]) < 0.5 and mean["negative"] < mean["mixed"] < mean["positive"]


# --- load_texts -----------------------------------------------------------------------------------------------

def test_generated_source_is_the_generator_capped():
    cfg = CorpusConfig(source="generated", n_documents=120)
    assert load_texts(cfg, "train", seed=2) == generate_reviews(120, 2, "train")
    assert load_texts(cfg, "test", seed=2, n=30) == generate_reviews(30, 2, "test")
    with pytest.raises(UserError, match="splits train and test"):
        load_texts(cfg, "validation")
    with pytest.raises(UserError, match="n_documents"):
        load_texts(cfg, "train", n=0)


TEXTS = [f"review number {i} says the film was {'great' if i % 2 else 'bad'}" for i in range(400)]


def _write(path, fmt, texts, column="text"):
    rows = [{column: t, "label": i % 2} for i, t in enumerate(texts)]
    if fmt == "json":
        path.write_text(json.dumps(rows), encoding="utf-8")
    elif fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    elif fmt == "csv":
        import csv

        with open(path, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=[column, "label"])
            writer.writeheader()
            writer.writerows(rows)
    elif fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        path.write_text("\n".join(texts) + "\n", encoding="utf-8")
    return path


@pytest.mark.parametrize("fmt", ["json", "jsonl", "csv", "parquet", "txt"])
def test_local_files_split_ninety_ten_without_overlap(tmp_path, fmt):
    path = _write(tmp_path / f"reviews.{fmt}", fmt, TEXTS)
    cfg = CorpusConfig(source=str(path), n_documents=10_000)
    train, test = load_texts(cfg, "train"), load_texts(cfg, "test")
    assert sorted(train + test) == sorted(TEXTS)
    assert not set(train) & set(test)
    assert 0.04 * len(TEXTS) <= len(test) <= 0.18 * len(TEXTS)
    assert load_texts(cfg, "train") == train  # deterministic
    assert load_texts(cfg, "train", seed=1) != train and sorted(load_texts(cfg, "train", seed=1)) == sorted(train)
    assert len(load_texts(cfg, "train", n=25)) == 25


def test_csv_with_a_named_text_column_commas_quotes_and_newlines(tmp_path):
    texts = ['a "quoted", comma text', "two\nlines", "plain"]
    path = _write(tmp_path / "r.csv", "csv", texts * 20, column="review")
    got = load_texts(CorpusConfig(source=str(path), text_column="review"), "train") + \
        load_texts(CorpusConfig(source=str(path), text_column="review"), "test")
    assert Counter(got) == Counter(texts * 20)


def test_data_files_and_split_directories(tmp_path):
    a = _write(tmp_path / "a.jsonl", "jsonl", TEXTS[:200])
    b = _write(tmp_path / "b.parquet", "parquet", TEXTS[200:])
    cfg = CorpusConfig(data_files=[str(a), str(b)], n_documents=10_000)
    assert sorted(load_texts(cfg, "train") + load_texts(cfg, "test")) == sorted(TEXTS)
    folder = tmp_path / "imdb"
    (folder / "data").mkdir(parents=True)
    _write(folder / "data" / "train-00000-of-00001.parquet", "parquet", TEXTS[:300])
    _write(folder / "test.csv", "csv", TEXTS[300:])
    cfg = CorpusConfig(source=str(folder), n_documents=10_000)
    assert sorted(load_texts(cfg, "train")) == sorted(TEXTS[:300])
    assert sorted(load_texts(cfg, "test")) == sorted(TEXTS[300:])
    with pytest.raises(UserError, match=r"splits \['test', 'train'\].*'validation'"):
        load_texts(cfg, "validation")
    glob_cfg = CorpusConfig(source=str(tmp_path / "*.jsonl"), n_documents=10_000)
    assert sorted(load_texts(glob_cfg, "train") + load_texts(glob_cfg, "test")) == sorted(TEXTS[:200])


def test_bad_corpora_are_one_line_user_errors(tmp_path):
    def error(**cfg) -> str:
        with pytest.raises(UserError) as info:
            load_texts(CorpusConfig(**cfg), "train")
        message = str(info.value)
        assert "\n" not in message
        return message

    assert "reviews.csv not found" in error(source=str(tmp_path / "nope" / "reviews.csv"))
    assert "missing.jsonl not found" in error(data_files=[str(tmp_path / "missing.jsonl")])
    (tmp_path / "empty.csv").write_text("text,label\n", encoding="utf-8")
    assert "no non-empty texts" in error(source=str(tmp_path / "empty.csv"))
    _write(tmp_path / "named.json", "json", TEXTS, column="review")
    assert "no column 'text' (columns: review, label)" in error(source=str(tmp_path / "named.json"))
    _write(tmp_path / "named.parquet", "parquet", TEXTS, column="body")
    assert "columns: body, label" in error(source=str(tmp_path / "named.parquet"))
    (tmp_path / "latin1.txt").write_bytes("un film tr\u00e8s r\u00e9ussi\n".encode("latin-1"))
    assert "not UTF-8" in error(source=str(tmp_path / "latin1.txt"))
    (tmp_path / "broken.jsonl").write_text('{"text": "fine"}\n{"text": oops}\n', encoding="utf-8")
    assert "line 2 is not valid JSON" in error(source=str(tmp_path / "broken.jsonl"))
    (tmp_path / "numbers.json").write_text(json.dumps([{"text": 1}, {"text": 2}]), encoding="utf-8")
    assert "holds int values, not text" in error(source=str(tmp_path / "numbers.json"))
    (tmp_path / "notes.xml").write_text("<a/>", encoding="utf-8")
    assert "unsupported extension" in error(data_files=[str(tmp_path / "notes.xml")])
    assert "no data files" in error(source=str(tmp_path / "*.tsv"))
    with pytest.raises(UserError, match="only the 90/10 train/test split"):
        load_texts(CorpusConfig(source=str(_write(tmp_path / "r.txt", "txt", TEXTS))), "validation")


def test_unreachable_hub_dataset_is_a_user_error_naming_it(monkeypatch):
    import datasets.config
    import huggingface_hub.constants

    # Offline mode makes the failure immediate instead of minutes of connection retries.
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(UserError, match="could not load corpus 'irm-test/no-such-dataset'"):
        load_texts(CorpusConfig(source="irm-test/no-such-dataset"), "train")


# --- prompts and prefixes -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def word_tokenizer():
    """A word-level tokenizer over the generated vocabulary, left padding as the models use."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<pad>", "<unk>", ".", ","] + vocabulary())}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>",
                                   padding_side="left")


def _ids_by_hand(text, tokenizer):
    vocab = tokenizer.get_vocab()
    return [vocab[w] for w in re.findall(r"\w+|[^\w\s]", text)]


def test_prompts_are_seeded_random_length_truncations(word_tokenizer):
    texts = generate_reviews(400, 0, "train") + ["great", "very good"]  # one text shorter than min_tokens
    prompts = make_prompts(texts, word_tokenizer, 2, 10, seed=0)
    assert len(prompts) == len(texts) - 1
    lengths = Counter(len(p) for p in prompts)
    assert set(lengths) == set(range(2, 11))  # every length in [2, 10] occurs
    for text, prompt in zip([t for t in texts if t != "great"], prompts):
        assert prompt == _ids_by_hand(text, word_tokenizer)[:len(prompt)]
    assert make_prompts(texts, word_tokenizer, 2, 10, seed=0) == prompts
    assert make_prompts(texts, word_tokenizer, 2, 10, seed=1) != prompts
    assert [len(p) for p in make_prompts(texts[:50], word_tokenizer, 4, 4, seed=3)] == [4] * 50
    with pytest.raises(UserError, match="prompt_min_tokens"):
        make_prompts(texts, word_tokenizer, 5, 3, seed=0)


def test_prefixes_keep_exactly_n_tokens_of_long_enough_texts(word_tokenizer):
    texts = generate_reviews(300, 1, "test")
    by_hand = [_ids_by_hand(t, word_tokenizer) for t in texts]
    expected = [ids[:30] for ids in by_hand if len(ids) >= 30]
    assert 0 < len(expected) < len(texts)  # some reviews are too short: the filter is exercised
    assert prefixes(texts, word_tokenizer, 30) == expected
    assert prefixes([], word_tokenizer, 30) == []


# --- fingerprint ----------------------------------------------------------------------------------------------

def test_fingerprint_tracks_config_split_seed_and_file_content(tmp_path):
    base = CorpusConfig(n_documents=100)
    fp = corpus_fingerprint(base, "train", 0)
    assert fp == corpus_fingerprint(CorpusConfig(n_documents=100), "train", 0)
    others = {corpus_fingerprint(base, "test", 0), corpus_fingerprint(base, "train", 1),
              corpus_fingerprint(CorpusConfig(n_documents=101), "train", 0)}
    assert fp not in others and len(others) == 3
    path = _write(tmp_path / "r.txt", "txt", TEXTS)
    cfg = CorpusConfig(source=str(path))
    before = corpus_fingerprint(cfg, "train", 0)
    stat = path.stat()
    data = bytearray(path.read_bytes())
    data[0:6] = b"REVIEW"  # same size, and the old mtime restored: only the content can tell
    path.write_bytes(bytes(data))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert corpus_fingerprint(cfg, "train", 0) != before


def test_a_capped_sample_of_a_label_sorted_file_holds_both_labels(tmp_path):
    # IMDb's files list all negative reviews first: the first n rows would be one label only.
    texts = [f"bad film number {i}" for i in range(300)] + [f"great film number {i}" for i in range(300)]
    path = _write(tmp_path / "sorted.jsonl", "jsonl", texts)
    sample = load_texts(CorpusConfig(source=str(path), n_documents=60), "train", seed=0)
    assert len(sample) == 60
    assert 15 <= sum(t.startswith("great") for t in sample) <= 45
