"""Prompts and answer parsing: labels and detection lists parsed robustly (and refused when ambiguous), the
activation format survives odd tokens, the offline backend's answers follow the lexicon, and the detection metrics
match hand-worked values."""

import numpy as np
import pytest

from irm.errors import UserError
from irm.explain import prompts, scoring
from irm.explain.backends import OfflineBackend


@pytest.mark.parametrize("answer, label", [
    ("1", 1), ("0", 0), ("0.", 0), ("Answer: 1", 1), ("answer:0", 0), ("**1**", 1), ("The answer is 1.", 1),
    ("1\n\nThe feature detects praise, which the reward favours.", 1), ("Yes", 1), ("no.", 0),
    ("Answer: 0 (not 1)", 0), ("The feature is related to the reward.", 1),
    ("This feature is not directly related to the reward", 0), ("Unrelated: it finds dates.", 0),
    ("1 or 0", None), ("10", None), ("0.5", None), ("maybe", None), ("", None), ("I can't tell.", None),
])
def test_parse_label(answer, label):
    assert prompts.parse_label(answer) == label


@pytest.mark.parametrize("answer, n, pred", [
    ("[1, 0, 1]", 3, [1, 0, 1]), ("Here you go: [0,0,1] as asked", 3, [0, 0, 1]), ("1 0 1", 3, [1, 0, 1]),
    ("[1, 0]", 3, None), ("[1, 2, 0]", 3, None), ("[true, false, true]", 3, None), ("1. yes 2. no", 2, None),
    ("Example 1: 1", 1, None), ("no idea", 2, None),
])
def test_parse_detection(answer, n, pred):
    assert prompts.parse_detection(answer, n) == pred


@pytest.mark.parametrize("answer, explanation", [
    ("words of praise.", "words of praise."),
    ("The main thing this feature does is find dates", "dates"),
    ('\n  "negative adjectives"\nmore text', "negative adjectives"),
    ("   \n", None),
])
def test_parse_explanation(answer, explanation):
    assert prompts.parse_explanation(answer) == explanation


def test_activation_format_round_trips_tokens_with_tabs_newlines_and_backslashes():
    records = [{"tokens": ["a\tb", "\n", "back\\slash", " great"], "discrete": [0, 3, 10, 7]},
               {"tokens": ["<end>", "x"], "discrete": [1, 0]}]
    msgs = prompts.explanation_messages(records)
    assert msgs[-1]["content"].rstrip().endswith(prompts.EXPLAIN_CUE)
    assert prompts.read_activations(msgs[-1]["content"]) == [list(zip(r["tokens"], r["discrete"])) for r in records]
    assert prompts.task_of(msgs) == "explain"


def lexicon():
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    return SentimentIntensityAnalyzer().lexicon


def test_offline_explanation_names_the_tokens_with_most_activation_and_says_it_is_offline():
    records = [{"tokens": ["the", " Great", " film"], "discrete": [0, 10, 2]},
               {"tokens": ["a", " great", " plot", " film"], "discrete": [0, 8, 0, 3]}]
    answer = OfflineBackend().chat(prompts.explanation_messages(records))
    # weights: great 18, film 5; "the"/"a"/"plot" never activate
    assert answer.startswith('top-activating tokens "great" (78%), "film" (22%)') and "no LLM" in answer
    assert '"plot"' not in answer


def test_offline_explanation_names_whole_words_not_their_sub_word_tokens():
    # " l" + "ame" spell "lame", " odd" + "ly" "oddly"; "." after a word and a word after "." stay apart
    records = [{"tokens": [" it", " was", " l", "ame", ".", "the", " end"], "discrete": [0, 0, 9, 1, 4, 0, 0]},
               {"tokens": [" odd", "ly", " l", "ame"], "discrete": [3, 3, 6, 0]}]
    answer = OfflineBackend().chat(prompts.explanation_messages(records))
    # lame 9 + 1 + 6 = 16, oddly 6, "." 4 (of 26)
    assert answer.startswith('top-activating tokens "lame" (62%), "oddly" (23%), "." (15%)'), answer
    assert '"l"' not in answer and '"ame"' not in answer
    # a word-level tokenizer's tokens carry no spaces and are words already: nothing is joined
    words = [{"tokens": ["it", "was", "lame", "minutes"], "discrete": [0, 0, 9, 3]}]
    assert OfflineBackend().chat(prompts.explanation_messages(words)).startswith(
        'top-activating tokens "lame" (75%), "minutes" (25%)')


@pytest.mark.parametrize("word", ["great", "awful", "camera", "minutes"])
def test_offline_label_is_lexicon_overlap(word):
    msgs = prompts.label_messages("any reward", f'the tokens "{word}" (offline summary)')
    answer = OfflineBackend().chat(msgs)
    assert prompts.parse_label(answer) == int(word in lexicon()) and "offline" in answer


def test_offline_detection_marks_texts_sharing_a_word_with_the_explanation():
    texts = ["what a great film", "the plot was slow", "GREAT acting", "nothing here"]
    answer = OfflineBackend().chat(prompts.detection_messages('the tokens "great"', texts))
    assert prompts.parse_detection(answer, 4) == [1, 0, 1, 0] and "offline" in answer


def test_offline_backend_refuses_prompts_it_cannot_answer():
    with pytest.raises(UserError, match="explain.backend"):
        OfflineBackend().chat([{"role": "user", "content": "Give me a negative word for 'good'."}])


def test_detection_metrics_hand_worked():
    # tp=1 (0), fp=1 (1), fn=1 (2), tn=1 (3)
    m = scoring.metrics([1, 1, 0, 0], [1, 0, 1, 0])
    assert m == {"accuracy": 0.5, "precision": 0.5, "recall": 0.5, "f1": 0.5}
    # tp=2, fp=0, fn=1, tn=2: precision 1, recall 2/3, f1 = 2*2/(2*2+0+1) = 0.8
    m = scoring.metrics([1, 1, 0, 0, 0], [1, 1, 1, 0, 0])
    assert m == pytest.approx({"accuracy": 0.8, "precision": 1.0, "recall": 2 / 3, "f1": 0.8})
    # nothing predicted positive: precision and f1 count as 0, not NaN
    assert scoring.metrics([0, 0], [1, 0]) == {"accuracy": 0.5, "precision": 0.0, "recall": 0.0, "f1": 0.0}


def test_detection_set_shuffles_texts_with_their_truth():
    texts, truth = scoring.detection_set(["a1", "a2", "a3"], ["n1", "n2"], np.random.default_rng(0))
    assert sorted(texts) == ["a1", "a2", "a3", "n1", "n2"]
    assert all((t[0] == "a") == bool(y) for t, y in zip(texts, truth))


def test_a_score_needs_both_classes_and_keeps_an_unparsed_answer():
    assert scoring.score(lambda m: "[1]", "x", ["t"], [1]) is None
    s = scoring.score(lambda m: "cannot say", "x", ["t", "u"], [1, 0])
    assert s["predictions"] is None and s["accuracy"] is None and s["answer"] == "cannot say"
    summary = scoring.summarise([{"layer": 1, "dictionary": "x1", "index": 0, "score": s},
                                 {"layer": 1, "dictionary": "x1", "index": 1,
                                  "score": scoring.score(lambda m: "[1, 1]", "x", ["t", "u"], [1, 0])}])
    assert summary["n_scored"] == 1 and summary["n_unparsed"] == 1
    assert summary["mean"]["accuracy"] == 0.5 and summary["mean"]["f1"] == pytest.approx(2 / 3)


def test_offline_label_rule_needs_lexicon_tokens_to_carry_half_the_named_activation():
    backend = OfflineBackend()

    def label(explanation):
        return prompts.parse_label(backend.chat(prompts.label_messages("any reward", explanation)))

    assert "great" in lexicon() and "film" not in lexicon() and "the" not in lexicon()
    assert label('top-activating tokens "great" (60%), "film" (40%)') == 1
    assert label('top-activating tokens "film" (70%), "great" (30%)') == 0  # a lexicon word, but not the feature's
    assert label('top-activating tokens "the" (50%), "great" (50%)') == 1
    assert "rule" in backend.label_method and "no LLM" in backend.label_method


@pytest.mark.parametrize("answer, problem", [
    ("years written as four-digit numbers, often release or production dates.", "echo"),
    ("Years written as four-digit numbers, often release or production dates", "echo"),
    ("the (2),  pleasant (6),  first (2), ...", "unparseable"),
    ("the movie (10)", "unparseable"),
    ("words of praise such as great and superb", None),
    ("numbers in parentheses such as (1) that mark list items", None),
    ("years", None),
])
def test_explanation_problems_are_caught(answer, problem):
    parsed = prompts.parse_explanation(answer)
    got = prompts.explanation_problem(parsed)
    assert (got is None) if problem is None else got.startswith(problem)


def test_the_echo_check_uses_the_example_the_prompt_really_shows():
    msgs = prompts.explanation_messages([{"tokens": ["a"], "discrete": [1]}])
    example = next(m["content"] for m in msgs if m["role"] == "assistant")
    assert prompts.explanation_problem(example).startswith("echo")


def test_wrong_length_detection_is_retried_once_with_a_stricter_format_then_unscored_with_the_reason():
    asked = []

    def ask(messages):
        asked.append(messages)
        return "[1, 0, 1]"  # three verdicts for six texts, every time

    texts, truth = ["a", "b", "c", "d", "e", "f"], [1, 0, 1, 0, 1, 0]
    s = scoring.score(ask, "x", texts, truth)
    assert len(asked) == 2
    retry = asked[1]
    assert retry[:-2] == asked[0] and retry[-2] == {"role": "assistant", "content": "[1, 0, 1]"}
    assert "exactly 6" in retry[-1]["content"] and "had 3 verdicts" in retry[-1]["content"]
    assert s["accuracy"] is None and s["predictions"] is None and s["retried"]
    assert "first: 3" in s["unscored_reason"] and "retry" in s["unscored_reason"]
    summary = scoring.summarise([{"layer": 1, "dictionary": "x1", "index": 0, "score": s}])
    assert summary["n_unparsed"] == 1 and summary["n_retried"] == 1 and summary["n_scored"] == 0
    assert "unscored_reason" in summary["features"][0]

    # A retry that answers properly is scored from the retry's answer.
    answers = iter(["1 0 1", "[1, 1, 1, 0, 0, 0]"])
    s = scoring.score(lambda m: next(answers), "x", texts, truth)
    assert s["predictions"] == [1, 1, 1, 0, 0, 0] and s["accuracy"] == pytest.approx(4 / 6)
    assert s["retried"] and "unscored_reason" not in s
    # A right first answer is not asked twice.
    calls = []
    s = scoring.score(lambda m: calls.append(m) or "[1, 0, 1, 0, 1, 0]", "x", texts, truth)
    assert len(calls) == 1 and s["accuracy"] == 1.0 and not s["retried"]
