"""Contrastive triples: truncation at the first positive lexicon token, substitution rules, held-out words, token
positions (checked by decoding), multi-token words skipped or pooled, determinism."""

import re

import pytest

from irm.config import TriplesConfig
from irm.data.generated import generate_reviews
from irm.errors import UserError
from irm.models import tiny_tokenizer
from irm.reward import spacy_tokenizer, vader_lexicon
from irm.stages.triples import build_triples, fit_prefix, parse_llm_answer
from irm.words import family, heldout_words, locate, token_counts

LEXICON = vader_lexicon()
NLP = spacy_tokenizer("blank:en")
TEXTS = generate_reviews(300, seed=0, split="train")


def bpe_tokenizer(vocab_size=1000):
    """A byte-level BPE trained on a few reviews: small enough that most lexicon words split into pieces."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=True)
    tok.train_from_iterator(TEXTS[:100], trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>"],
                                                             initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", padding_side="left")


@pytest.fixture(scope="module")
def tiny():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def made(tiny):
    return build_triples(TEXTS, LEXICON, tiny, TriplesConfig(n=80, max_length=32), 0, NLP)


def words_of(text):
    return re.findall(r"[a-z']+", text.lower())


def test_truncated_at_first_positive_word_with_lexicon_substitutes(made):
    triples, summary = made
    assert len(triples) == summary["n_triples"] == 80
    for t in triples:
        pos, neu, neg = (t["words"][v] for v in ("positive", "neutral", "negative"))
        original = TEXTS[t["doc_id"]]
        # The positive variant is a piece of the source text ending at its first positive lexicon word.
        before = original[: original.index(t["texts"]["positive"]) + len(t["prefix"])]
        assert not any(LEXICON.get(w, 0) > 0 for w in words_of(before)), before
        assert LEXICON[pos.lower()] > 0
        assert neu.lower() not in LEXICON
        assert LEXICON[neg.lower()] < 0
        assert t["values"] == {"positive": LEXICON[pos.lower()], "negative": LEXICON[neg.lower()]}
        for v in ("positive", "neutral", "negative"):
            assert t["texts"][v] == t["prefix"] + t["words"][v]


def test_negative_substitute_has_comparable_magnitude(made):
    triples, _ = made
    negatives = sorted(v for v in LEXICON.values() if v < 0)
    gaps = [abs(abs(t["values"]["negative"]) - t["values"]["positive"]) for t in triples]
    # Against a negative drawn at random from the lexicon the mean gap would be about 1 (checked: > 0.8).
    import random

    rng = random.Random(0)
    random_gaps = [abs(abs(rng.choice(negatives)) - t["values"]["positive"]) for t in triples]
    assert sum(random_gaps) / len(random_gaps) > 0.8
    assert sum(gaps) / len(gaps) < 0.35


def test_positions_point_at_the_substituted_word(made, tiny):
    triples, _ = made
    for t in triples:
        for v in ("positive", "neutral", "negative"):
            ids, (p,) = t["ids"][v], t["positions"][v]
            assert tiny.decode([ids[p]]) == t["words"][v].lower()
            assert p == len(ids) - 1  # the text ends with the word
            assert ids == tiny(t["texts"][v])["input_ids"]
            assert len(ids) <= 32


def test_heldout_words_never_used_and_counted(made):
    triples, summary = made
    held = summary["heldout"]
    families = {family(w) for w, v in LEXICON.items() if v != 0}
    assert len(held["families"]) == round(0.2 * len(families))
    # whole families: every signed lexicon word of a held-out family is held out, and nothing else
    expected = {w for w, v in LEXICON.items() if v != 0 and family(w) in set(held["families"])}
    assert set(held["positive"]) | set(held["negative"]) == expected
    assert held["n_positive"] == len(held["positive"]) > 0 and held["n_negative"] == len(held["negative"]) > 0
    banned = set(held["positive"]) | set(held["negative"])
    for t in triples:
        assert t["words"]["positive"].lower() not in banned
        assert t["words"]["negative"].lower() not in banned
    assert summary["skipped"]["heldout_positive"] > 0
    assert summary["texts_scanned"] == 80 + sum(summary["skipped"].values())
    assert summary["words_used"]["positive"] == len({t["words"]["positive"].lower() for t in triples})


def test_no_heldout_word_shares_a_lemma_family_with_a_training_word_or_context(made):
    """Held out means unseen: no word of a triple (positive, neutral or negative substitute) and no word of a triple's
    prefix is in a held-out family; the lexicon's contexts are none of the triples' contexts and come from texts no
    triple was built from."""
    triples, summary = made
    held = set(summary["heldout"]["families"])
    held_words = set(summary["heldout"]["positive"]) | set(summary["heldout"]["negative"])
    for t in triples:
        for w in t["words"].values():
            assert family(w) not in held and w.lower() not in held_words
        assert not any(family(w) in held for w in re.findall(r"[a-z]+", t["prefix"].lower()))
    assert summary["skipped"]["heldout_in_prefix"] > 0
    contexts = summary["contexts"]["texts"]
    training = {t["prefix"].strip().lower() for t in triples}
    assert len(contexts) >= 5 and not training & {c.strip().lower() for c in contexts}
    sources = {t["doc_id"] for t in triples}
    for c in contexts:  # each context is the start of a text no triple came from
        assert any(text.startswith(c.rstrip()) or c.rstrip() in text for i, text in enumerate(TEXTS)
                   if i not in sources)
    # the family rule groups inflections and derivations of one word
    assert len({family(w) for w in ("love", "loved", "loves", "loving", "lovely")}) == 1
    assert len({family(w) for w in ("happy", "happily", "happiness")}) == 1
    assert family("good") != family("bad")


def test_deterministic_from_seed(tiny, made):
    again, _ = build_triples(TEXTS, LEXICON, tiny, TriplesConfig(n=80, max_length=32), 0, NLP)
    assert again == made[0]
    other, other_summary = build_triples(TEXTS, LEXICON, tiny, TriplesConfig(n=80, max_length=32), 1, NLP)
    assert other != made[0]
    assert other_summary["heldout"]["positive"] != made[1]["heldout"]["positive"]
    assert heldout_words(LEXICON, 0.2, 0) == heldout_words(LEXICON, 0.2, 0)


def test_max_length_cuts_the_prefix_from_the_left(tiny):
    triples, _ = build_triples(TEXTS, LEXICON, tiny, TriplesConfig(n=40, max_length=4), 0, NLP)
    assert any(TEXTS[t["doc_id"]].index(t["texts"]["positive"]) > 0 for t in triples)
    for t in triples:
        for v in ("positive", "neutral", "negative"):
            assert len(t["ids"][v]) <= 4
            assert t["positions"][v] == [len(t["ids"][v]) - 1]


def test_multi_token_words_skipped_or_pooled():
    bpe = bpe_tokenizer()
    counts = token_counts(bpe, ["wonderful", "the", "masterpiece"])
    assert counts["the"] == 1 and counts["masterpiece"] > 1
    skipped, s_summary = build_triples(TEXTS, LEXICON, bpe, TriplesConfig(n=30, multi_token="skip"), 0, NLP)
    assert all(len(p) == 1 for t in skipped for p in t["positions"].values())
    assert s_summary["skipped"]["multi_token"] > 0
    listed = s_summary["multi_token_words_skipped"]
    assert len(listed) == s_summary["n_multi_token_words_skipped"] > 0
    assert all(n > 1 for n in token_counts(bpe, listed).values())
    pooled, p_summary = build_triples(TEXTS, LEXICON, bpe, TriplesConfig(n=30, multi_token="pool"), 0, NLP)
    assert any(len(p) > 1 for t in pooled for p in t["positions"].values())
    assert "multi_token" not in p_summary["skipped"] and p_summary["n_multi_token_words_skipped"] == 0
    for t in pooled:
        for v in ("positive", "neutral", "negative"):
            ids, positions = t["ids"][v], t["positions"][v]
            assert positions == list(range(positions[0], len(ids)))  # contiguous, at the end
            assert bpe.decode([ids[p] for p in positions]).strip() == t["words"][v]


def test_locate_with_offsets_and_special_tokens(tiny):
    ids, positions = locate(tiny, "the plot is good", 12, 16)
    assert positions == [3] and tiny.decode([ids[3]]) == "good"
    assert fit_prefix(tiny, "a b c d e ", ["good"], 3) == "d e "


def test_llm_answers_parsed_or_rejected():
    assert parse_llm_answer('Sure! {"neutral": "Okay.", "negative": "bad"}') == ("okay", "bad")
    assert parse_llm_answer("no json here") == (None, None)
    assert parse_llm_answer('{"neutral": "two words", "negative": 3}') == (None, None)


def test_heldout_words_hold_their_families_out_whatever_the_seed(tiny):
    """triples.heldout_words: every lexicon word of each listed word's lemma family is held out at every seed, on top
    of a seeded draw of round(fraction x families) among the other families; an empty list is the plain seeded draw
    (the same families as before the knob: checked against random.sample written out)."""
    import random

    always = ["good", "no", "loved"]
    forced = {family(w) for w in always}
    keys = sorted({family(w) for w, v in LEXICON.items() if v != 0})
    assert heldout_words(LEXICON, 0.2, 0)["families"] == sorted(
        random.Random("irm-heldout-families:0").sample(keys, round(0.2 * len(keys))))
    for seed in (0, 1, 2):
        held = heldout_words(LEXICON, 0.2, seed, always)
        assert forced <= set(held["families"]) and len(held["families"]) == len(forced) + round(0.2 * len(keys))
        words = set(held["positive"]) | set(held["negative"])
        assert {"good", "goodness", "no", "love", "loves", "lovely"} <= words
    assert heldout_words(LEXICON, 0.0, 0, always)["families"] == sorted(forced)
    assert heldout_words(LEXICON, 0.2, 0, ["zzzqx"]) == heldout_words(LEXICON, 0.2, 0)  # a family with no word
    triples, summary = build_triples(TEXTS, LEXICON, tiny, TriplesConfig(n=40, max_length=32, heldout_words=always),
                                     0, NLP)
    assert summary["heldout"]["always"] == always and forced <= set(summary["heldout"]["families"])
    for t in triples:
        assert not any(family(w) in forced for w in re.findall(r"[a-z]+", t["texts"]["negative"].lower()))
        assert not any(family(w) in forced for w in re.findall(r"[a-z]+", t["texts"]["positive"].lower()))


def test_bad_settings_are_user_errors():
    """Refused by the config check every stage entry runs first (irm.config.check_all)."""
    from irm.config import RunConfig, check_all

    with pytest.raises(UserError, match="heldout_fraction"):
        check_all(RunConfig(triples=TriplesConfig(heldout_fraction=1.0)), ["triples"])
    with pytest.raises(UserError, match="triples.n"):
        check_all(RunConfig(triples=TriplesConfig(n=0)), ["triples"])
    with pytest.raises(UserError, match="triples.heldout_words"):
        check_all(RunConfig(triples=TriplesConfig(heldout_words=["good", " "])), ["triples"])


def test_llm_substitution_uses_valid_proposals_falls_back_on_bad_ones_and_caches(tiny, tmp_path, monkeypatch):
    """The explain stage's openai backend against a chat server on loopback (tests/explain_server.py)."""
    from explain_server import ChatServer

    from irm.artifacts import read_jsonl
    from irm.config import RunConfig
    from irm.stages.triples import _LLM

    held = set(heldout_words(LEXICON, 0.2, 0)["negative"])
    negative = next(w for w in ("awful", "terrible", "horrible", "dreadful") if w not in held)

    def responder(messages):
        word = re.search(r'The last word, "(\w+)"', messages[-1]["content"]).group(1)
        if len(word) % 2 == 0:
            return f'{{"neutral": "plot", "negative": "{negative}"}}'
        return '{"neutral": "good", "negative": "nice"}'  # a lexicon word as neutral, a positive as negative

    monkeypatch.setenv("IRM_TEST_TRIPLES_KEY", "sk-test")
    with ChatServer(responder) as server:
        cfg = RunConfig(run_dir=str(tmp_path))
        cfg.explain.backend, cfg.explain.model, cfg.explain.base_url = "openai", "test-model", server.url
        cfg.explain.api_key_env = "IRM_TEST_TRIPLES_KEY"
        tc = TriplesConfig(n=20, substitution="llm")
        llm = _LLM(cfg, tmp_path / "answers.jsonl")
        triples, summary = build_triples(TEXTS, LEXICON, tiny, tc, 0, NLP, llm)
        asked = len(server.log)
        again, _ = build_triples(TEXTS, LEXICON, tiny, tc, 0, NLP, _LLM(cfg, tmp_path / "answers.jsonl"))
        assert len(server.log) == asked  # the rerun asked nothing: every answer came from disk
    assert 0 < asked == len(read_jsonl(tmp_path / "answers.jsonl")) <= 20
    assert again == triples
    odd = [t for t in triples if len(t["words"]["positive"]) % 2]
    even = [t for t in triples if not len(t["words"]["positive"]) % 2]
    assert odd and even
    assert all(t["words"]["neutral"] == "plot" and t["words"]["negative"] == negative for t in even)
    assert all(t["words"]["neutral"] != "good" and LEXICON[t["words"]["negative"]] < 0 for t in odd)
    assert summary["llm_fallback"] == {"neutral": len(odd), "negative": len(odd)}
    assert all(t["substitution"] == "llm" for t in triples)
