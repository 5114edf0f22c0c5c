"""The RLHF reward (paper eq. 3 and appendix F) against hand-worked sums, an independent tokenisation, VADER's own
lexicon, and a tiny sequence classifier's logits computed directly."""

import math
import re
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import vaderSentiment
from irm.config import RewardConfig
from irm.data.generated import generate_reviews
from irm.errors import UserError
from irm.reward import ClassifierReward, LexiconReward, build_reward, reward_description

torch.set_num_threads(1)

LEXICON_FILE = Path(vaderSentiment.__file__).parent / "vader_lexicon.txt"


def file_value(word: str) -> float:
    """A word's mean rating read straight from the lexicon file's line (the last one if it is listed twice)."""
    values = [float(line.split("\t")[1]) for line in LEXICON_FILE.read_text(encoding="utf-8").splitlines()
              if line.split("\t")[0] == word]
    assert values, word
    return values[-1]


@pytest.fixture(scope="module")
def reward():
    return LexiconReward()


def test_lexicon_is_vaders_own_7506_words(reward):
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    assert len(reward.lexicon) == 7506
    assert reward.lexicon == SentimentIntensityAnalyzer().lexicon


def test_hand_worked_sentence_with_great_and_bad(reward):
    # great 3.1, bad -2.5: (3.1 - 2.5) / 5 = 0.12; "the", "acting", "was", "but", "ending" are not in the lexicon.
    assert (file_value("great"), file_value("bad")) == (3.1, -2.5)
    [r] = reward(["The acting was great but the ending was bad."])
    assert r == pytest.approx(0.12, abs=1e-12)


def test_hand_worked_sentence_with_punctuation_and_contraction(reward):
    # love 3.2 + wonderful 2.7 - terrible 2.1 - no 1.2 = 2.6 -> 0.52. spaCy splits "it's" into "it" "'s" and
    # "film," into "film" ","; none of those pieces is in the lexicon.
    words = {w: file_value(w) for w in ("love", "wonderful", "terrible", "no")}
    assert words == {"love": 3.2, "wonderful": 2.7, "terrible": -2.1, "no": -1.2}
    [r] = reward(["I love this wonderful film, it's terrible... NO!"])
    assert r == pytest.approx(2.6 / 5, abs=1e-12)


def test_texts_without_lexicon_words_score_zero(reward):
    assert reward(["", "the plot follows a sailor", "   "]) == [0.0, 0.0, 0.0]


def test_case_is_ignored(reward):
    lower, upper, mixed = reward(["great film", "GREAT FILM", "GrEaT Film"])
    assert lower == upper == mixed == pytest.approx(3.1 / 5)


def test_many_strong_words_are_clipped(reward):
    # 100 x great = 310 / 5 = 62 -> 10; 100 x hate = -270 / 5 = -54 -> -10; 3 x great = 1.86 stays.
    assert reward(["great " * 100, "hate " * 100, "great " * 3]) == [10.0, -10.0, pytest.approx(1.86)]
    # scale 1, clip 2: great 3.1 -> 2, bad bad -5 -> -2, boring -1.3 stays.
    small = LexiconReward(scale=1.0, clip=2.0)
    assert small(["great", "bad bad", "boring"]) == [2.0, -2.0, pytest.approx(-1.3)]


def test_custom_lexicon_and_scale():
    reward = LexiconReward(scale=2.0, clip=10.0, lexicon={"foo": 2.0, "bar": -1.0})
    assert reward(["Foo foo bar baz great"]) == [pytest.approx((2 + 2 - 1) / 2)]


def regex_reward(text: str, lexicon: dict) -> float:
    """Eq. 3 with a regex tokeniser: words and single punctuation marks, which is how spaCy splits the generated
    reviews (lower-case words, `.` and `,`)."""
    total = sum(lexicon.get(tok, 0.0) for tok in re.findall(r"\w+|[^\w\s]", text.lower()))
    return min(max(total / 5, -10.0), 10.0)


def test_agrees_with_an_independent_tokenisation_on_generated_reviews(reward):
    import spacy

    texts = generate_reviews(500, seed=7, split="test")
    nlp = spacy.blank("en")
    # The premise of the comparison: on these texts both tokenisers produce the same tokens.
    for text in texts[:50]:
        assert [t.text for t in nlp(text)] == re.findall(r"\w+|[^\w\s]", text)
    lexicon = {}
    for line in LEXICON_FILE.read_text(encoding="utf-8").splitlines():
        word, mean = line.split("\t")[:2]
        lexicon[word] = float(mean)
    expected = [regex_reward(t, lexicon) for t in texts]
    assert reward(texts) == pytest.approx(expected, abs=1e-12)
    assert sum(v != 0 for v in expected) > 400  # the comparison is not between zeros


def test_agrees_with_spacy_tokens_summed_directly_on_free_text(reward):
    import spacy

    texts = ["Wasn't it AWFUL?! I'd say it's GOOD, even great :) but so-so...", "Ugh. Horrible/terrible (sad)."]
    nlp = spacy.blank("en")
    expected = [sum(reward.lexicon.get(t.text.lower(), 0.0) for t in nlp(text)) / 5 for text in texts]
    assert reward(texts) == pytest.approx(expected)
    assert all(e != 0 for e in expected)


_DEFAULT = LexiconReward()
_TIGHT = LexiconReward(scale=0.1, clip=0.5)  # hits the bounds on most texts with any lexicon word


@settings(max_examples=150, deadline=None)
@given(st.text(max_size=300))
def test_any_unicode_text_gives_a_finite_reward_within_the_clip(text):
    r_default, r_tight = _DEFAULT([text])[0], _TIGHT([text])[0]
    assert math.isfinite(r_default) and -10.0 <= r_default <= 10.0
    assert math.isfinite(r_tight) and -0.5 <= r_tight <= 0.5


def test_bad_settings_are_user_errors():
    with pytest.raises(UserError, match="scale"):
        LexiconReward(scale=0)
    with pytest.raises(UserError, match="clip"):
        LexiconReward(clip=float("nan"))
    with pytest.raises(UserError, match="clip"):
        LexiconReward(clip=0)  # a zero bound would clip every reward to 0
    with pytest.raises(UserError, match="not installed.*blank:en"):
        LexiconReward(spacy_pipeline="en_core_web_md_not_here")
    with pytest.raises(UserError, match="no language"):
        LexiconReward(spacy_pipeline="blank:zz")
    with pytest.raises(TypeError):
        _DEFAULT("one string, not a list")


def test_build_reward_lexicon_uses_the_config():
    reward = build_reward(RewardConfig(kind="lexicon", scale=2.0, clip=1.0))
    assert isinstance(reward, LexiconReward)
    assert reward(["bad", "great great"]) == [pytest.approx(-1.0), 1.0]


def test_build_reward_classifier_needs_a_name():
    with pytest.raises(UserError, match="reward.classifier"):
        build_reward(RewardConfig(kind="classifier"))


def test_reward_description():
    text = reward_description(RewardConfig())
    assert "VADER" in text and "positive" in text and "negative" in text and "divided by 5" in text
    assert reward_description(RewardConfig(description="Rewards mentions of cats.")) == "Rewards mentions of cats."
    classifier = reward_description(RewardConfig(kind="classifier", classifier="someone/sentiment-model"))
    assert "someone/sentiment-model" in classifier and "positive" in classifier


# --- appendix F: a sequence classifier's positive logit -------------------------------------------------------

WORDS = ["great", "bad", "film", "the", "was", "plot", "boring", "a", "lovely", "ending", "and", "."]


def _word_tokenizer(specials: dict):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(list(specials.values()) + WORDS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token=specials["unk_token"]))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, model_max_length=32, **specials)


def _save_tiny_classifier(tmp_path, family: str) -> Path:
    from transformers import BertConfig, BertForSequenceClassification, GPTNeoXConfig, GPTNeoXForSequenceClassification

    torch.manual_seed(0)
    if family == "bert":
        tokenizer = _word_tokenizer({"pad_token": "[PAD]", "unk_token": "[UNK]"})
        model = BertForSequenceClassification(BertConfig(
            vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
            intermediate_size=32, max_position_embeddings=64, num_labels=2, pad_token_id=0))
    else:  # a decoder classifier with no pad token: the reward must add one and read the last real token
        tokenizer = _word_tokenizer({"eos_token": "<eos>", "unk_token": "<unk>"})
        model = GPTNeoXForSequenceClassification(GPTNeoXConfig(
            vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
            intermediate_size=32, max_position_embeddings=64, num_labels=3, eos_token_id=0, bos_token_id=0))
        model.config.pad_token_id = None
    path = tmp_path / family
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.mark.parametrize("family,label", [("bert", 1), ("gpt-neox", 2)])
def test_classifier_reward_is_the_positive_logit(tmp_path, family, label):
    from transformers import AutoModelForSequenceClassification

    path = _save_tiny_classifier(tmp_path, family)
    texts = ["great film", "the plot was boring and the ending was bad .", "lovely", "a great great film ."]
    reward = ClassifierReward(str(path), positive_label=label, device="cpu", batch_size=3)  # pads within a batch
    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    vocab = reward.tokenizer.get_vocab()
    expected = []
    with torch.no_grad():
        for text in texts:  # one unpadded text at a time, ids looked up by hand
            ids = torch.tensor([[vocab[w] for w in text.split()]])
            expected.append(model(input_ids=ids).logits[0, label].item())
    assert reward(texts) == pytest.approx(expected, abs=1e-5)
    assert len(set(round(e, 4) for e in expected)) == len(texts)  # a random model still tells the texts apart


def test_classifier_reward_bad_inputs_are_user_errors(tmp_path):
    path = _save_tiny_classifier(tmp_path, "bert")
    with pytest.raises(UserError, match="positive_label 5"):
        ClassifierReward(str(path), positive_label=5, device="cpu")
    with pytest.raises(UserError, match="could not load the reward classifier"):
        ClassifierReward(str(tmp_path / "missing-dir"), device="cpu")


def test_build_reward_classifier_and_its_label_name(tmp_path):
    import json

    path = _save_tiny_classifier(tmp_path, "bert")
    config = json.loads((path / "config.json").read_text())
    config["id2label"] = {"0": "NEGATIVE", "1": "POSITIVE"}
    (path / "config.json").write_text(json.dumps(config))
    cfg = RewardConfig(kind="classifier", classifier=str(path), positive_label=1)
    reward = build_reward(cfg, device="cpu")
    assert isinstance(reward, ClassifierReward) and len(reward(["great film", "bad"])) == 2
    assert "'POSITIVE' label" in reward_description(cfg)


# ---------------------------------------------------------------------------------------------------------------
# reward.lexicon: the user's own lexicon file, read by every consumer through reference_lexicon


from irm.reward_lexicon import read_lexicon  # noqa: E402
from irm.reward import (probe_values, reference_lexicon, planted_words,  # noqa: E402
                        vader_lexicon)


@pytest.mark.parametrize("name,text", [
    ("lex.tsv", "word\tvalue\nGreat\t-2\nboring\t3.5\ntable\t0\n"),
    ("lex.csv", "great,-2\nboring,3.5\ntable,0\ngreat,-2\n"),  # a repeated line with the same value is kept once
    ("lex.json", '{"great": -2, "Boring": 3.5, "table": 0}'),
])
def test_lexicon_files_in_every_format_read_the_same(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    assert read_lexicon(path) == {"great": -2.0, "boring": 3.5, "table": 0.0}


@pytest.mark.parametrize("name,text,problem", [
    ("missing.tsv", None, "does not exist"),
    ("lex.txt", "great\t1\n", "not a .csv, .tsv or .json"),
    ("lex.tsv", "great\t1\nbad\tvery\n", "line 2: value 'very' of 'bad' is not a finite number"),
    ("lex.tsv", "word\tvalue\n", "no word with a non-zero value"),
    ("lex.csv", "great,1\nbad,nan\n", "not a finite number"),
    ("lex.tsv", "great\t1\nGREAT\t2\n", "'great' is listed twice with different values (1 and 2)"),
    ("lex.json", "[1, 2]", "not an object"),
    ("lex.json", '{"great": 1, "great": 2}', "'great' is listed twice with different values (1 and 2)"),
    ("lex.json", "{great: 1", "not valid JSON"),
])
def test_bad_lexicon_files_are_one_line_with_the_fix(tmp_path, name, text, problem):
    path = tmp_path / name
    if text is not None:
        path.write_text(text, encoding="utf-8")
    with pytest.raises(UserError) as e:
        read_lexicon(path)
    msg = str(e.value)
    assert problem in msg and "\n" not in msg and ("; " in msg)


def test_the_reward_scores_with_the_configured_lexicon(tmp_path):
    path = tmp_path / "lex.tsv"
    path.write_text("great\t-3\nchair\t2\n", encoding="utf-8")
    reward = build_reward(RewardConfig(lexicon=str(path), scale=1.0))
    # great is +3.1 in VADER, bad -2.5: here great is -3, chair +2 and bad is not in the lexicon.
    assert reward(["A great chair, a bad chair."]) == [pytest.approx(-3 + 2 + 2)]
    assert reference_lexicon(RewardConfig(lexicon=str(path))) == {"great": -3.0, "chair": 2.0}
    assert reference_lexicon(RewardConfig()) == vader_lexicon()


def test_planted_words_are_those_whose_sign_differs_from_vader():
    lexicon = {"great": -3.1, "bad": -2.5, "chair": 1.0, "table": 0.0, "awful": 0.0}
    assert planted_words(lexicon) == {"great": -3.1, "chair": 1.0, "awful": 0.0}


def test_a_probe_of_the_lexicon_reward_gives_its_lexicon_values():
    """The probe that measures a classifier's word values, applied to the lexicon reward, returns each word's lexicon
    value / scale (neutral contexts and fillers score 0): the two references agree by construction of the rule."""
    vader = vader_lexicon()
    words = ["great", "bad", "love", "horrible", "okay", "table", "mess"]
    values, fillers = probe_values(LexiconReward(scale=5.0), words)
    assert fillers == [0.0] * len(fillers)
    assert values == pytest.approx([vader.get(w, 0.0) / 5.0 for w in words], abs=1e-12)


def test_a_classifiers_reference_is_its_probed_word_values(tmp_path, monkeypatch):
    """reward.kind classifier: the reference lexicon is PROBE_RULE applied to the classifier, recomputed here one
    text at a time from its logits (unknown words read as [UNK], like the fillers, so they score exactly 0 and are
    left out); the largest |value| is 4; the result is cached on disk and read back the same."""
    from transformers import AutoModelForSequenceClassification

    from irm.reward import PROBE_CONTEXTS, PROBE_FILLERS, classifier_lexicon

    monkeypatch.setenv("IRM_CACHE_DIR", str(tmp_path / "cache"))
    path = _save_tiny_classifier(tmp_path, "bert")
    cfg = RewardConfig(kind="classifier", classifier=str(path), positive_label=1)
    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    vocab = ClassifierReward(str(path), device="cpu").tokenizer.get_vocab()

    def logit(text: str) -> float:
        ids = [vocab.get(w, vocab["[UNK]"]) for w in text.replace(".", " .").split()]
        with torch.no_grad():
            return model(input_ids=torch.tensor([ids])).logits[0, 1].item()

    def mean_over_contexts(word: str) -> float:
        return sum(logit(c.format(word)) for c in PROBE_CONTEXTS) / len(PROBE_CONTEXTS)

    baseline = sum(mean_over_contexts(f) for f in PROBE_FILLERS) / len(PROBE_FILLERS)
    noise = max(abs(mean_over_contexts(f) - baseline) for f in PROBE_FILLERS)
    known = [w for w in vader_lexicon() if w.isalpha() and w in vocab]
    values = {w: mean_over_contexts(w) - baseline for w in known}
    kept = {w: v for w, v in values.items() if abs(v) > noise + 1e-6}
    top = max(abs(v) for v in kept.values())
    expected = {w: 4.0 * v / top for w, v in kept.items()}

    got = classifier_lexicon(cfg)
    assert got.keys() == expected.keys() and len(got) >= 2
    assert [got[w] for w in sorted(got)] == pytest.approx([expected[w] for w in sorted(got)], abs=1e-4)
    assert reference_lexicon(cfg) == got  # the one function every consumer reads
    assert list((tmp_path / "cache" / "probes").glob("*.json"))
