"""The explainer's prompts (paper 4.4, E.1, after Bills et al. 2023) and the parsers of their answers.

Four requests per feature: explain it from `token<TAB>activation` records ("the main thing this feature does is
find ..."), label the explanation 1/0 against a plain-language description of the RLHF reward, and score it two ways
after EleutherAI's delphi: detection (say which of a mix of text windows the feature activates on) and fuzzing (say
in which windows the <<highlighted>> tokens are the ones the explanation describes: the tokens that fire, or as many
tokens chosen at random among those that do not). The `read_*` functions invert the formats, for the offline
backend, which answers these prompts without a model.
"""

from __future__ import annotations

import json
import re
from typing import Optional

EXPLAIN_CUE = "the main thing this feature does is find"
START, END = "<start>", "<end>"
FEATURE_LINE = f"Feature: {EXPLAIN_CUE} "
EXAMPLES_HEADER = "Examples:"
LABEL_QUESTION = "Is this feature related to the reward?"
NONZERO_HEADER = "The same texts, only the tokens with non-zero activation:"
FUZZ_HEADER = "Highlighted examples:"
HIGHLIGHT = ("<<", ">>")  # delphi's marks around a run of highlighted tokens

EXPLAIN_SYSTEM = (
    "You are an interpretability researcher studying features of a language model's sparse autoencoder. Each "
    "feature looks for one particular thing in text. You will see short texts with the feature's activation on "
    "every token, and you must say what the feature is looking for.\n\n"
    "Format of the examples: each text is shown between <start> and <end>, one token per line as "
    "token<tab>activation. Activations go from 0 to 10: a non-zero value means the feature found what it looks for, "
    "higher values mean a stronger match, and most tokens have 0. After the texts, the same texts are listed again "
    "with only their non-zero tokens.\n\n"
    "How to answer: look at which tokens activate most and at the words just before them; name the common pattern "
    "(a kind of word, a meaning, a grammatical role, or a context) in one short phrase of at most 15 words that "
    "completes the sentence \"the main thing this feature does is find ...\". Reply with the phrase only: no "
    "preamble, no list of tokens with numbers, no quotation of the examples. If the activating tokens share nothing "
    "you can name, say what the strongest ones are."
)

# One worked example (few-shot, as in the paper), invented for this project.
_EXAMPLE_RECORDS = [
    [("the", 0), ("sequel", 0), ("came", 0), ("out", 0), ("in", 1), ("1987", 10), ("and", 0), ("flopped", 0)],
    [("filmed", 0), ("during", 1), ("the", 0), ("summer", 0), ("of", 2), ("2004", 9), (",", 0), ("it", 0)],
    [("a", 0), ("classic", 0), ("from", 0), ("1950", 7), ("that", 0), ("still", 0), ("holds", 0), ("up", 0)],
]
_EXAMPLE_ANSWER = "years written as four-digit numbers, often release or production dates."

LABEL_SYSTEM = (
    "You decide whether a feature of a language model is related to the reward the model was fine-tuned on with "
    "reinforcement learning. You get a plain-language description of the reward and the explanation of one feature. "
    "The feature is related (1) when what it detects is something the reward depends on: text it finds would raise "
    "or lower the reward, or it tracks the property the reward measures. It is not related (0) when it detects "
    "something the reward ignores (formatting, names, numbers, topics, grammar) even if such text is common in "
    "rewarded outputs. Reply with a single digit, 1 or 0, and nothing else."
)

DETECT_SYSTEM = (
    "You get the explanation of a feature of a language model and a numbered list of texts. The feature activates "
    "on some of the texts and not on others. Going by the explanation, decide for each text whether the feature "
    "activates on it. Reply with only a JSON list of 0s and 1s, exactly one per text, in the texts' order (for 4 "
    "texts, e.g. [0, 1, 1, 0]), and nothing else."
)


FUZZ_SYSTEM = (
    "You get the explanation of a feature of a language model and a numbered list of texts. In every text some "
    "tokens are highlighted between << and >>. In some texts the highlighted tokens are exactly the ones the feature "
    "activates on; in the others they were chosen at random. Going by the explanation, decide for each text whether "
    "its highlighted tokens are the ones the explanation describes. Reply with only a JSON list of 0s and 1s, exactly "
    "one per text, in the texts' order (1: the highlighting matches the explanation, 0: it does not), and nothing "
    "else."
)


def _show(token: str) -> str:
    """A token on one line of the activation format: tabs and newlines escaped so the format stays parseable."""
    return token.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")


def _unshow(token: str) -> str:
    out, i = [], 0
    while i < len(token):
        if token[i] == "\\" and i + 1 < len(token):
            out.append({"t": "\t", "n": "\n", "r": "\r"}.get(token[i + 1], token[i + 1]))
            i += 2
        else:
            out.append(token[i])
            i += 1
    return "".join(out)


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _activation_block(name: str, records: list[list[tuple[str, int]]]) -> str:
    lines = [f"Feature {name}", "Activations:"]
    for rec in records:
        lines.append(START)
        lines.extend(f"{_show(tok)}\t{act}" for tok, act in rec)
        lines.append(END)
    # SAE features are sparse: repeat just the non-zero tokens (as Bills et al. do for sparse neurons).
    lines.extend(["", NONZERO_HEADER])
    lines.extend(", ".join(f"{_show(tok)} ({act})" for tok, act in rec if act > 0) or "(none)" for rec in records)
    lines.append("")
    lines.append(f"Explanation of feature {name} behaviour: {EXPLAIN_CUE}")
    return "\n".join(lines)


def explanation_messages(records: list[dict]) -> list[dict]:
    """Chat messages asking for an explanation from records with `tokens` and `discrete` (0-10) activations."""
    shown = [list(zip(r["tokens"], r["discrete"])) for r in records]
    return [
        {"role": "system", "content": EXPLAIN_SYSTEM},
        {"role": "user", "content": _activation_block("A", _EXAMPLE_RECORDS)},
        {"role": "assistant", "content": _EXAMPLE_ANSWER},
        {"role": "user", "content": _activation_block("B", shown)},
    ]


# An answer that lists tokens with their activations ("the (2), pleasant (6)") instead of explaining them.
_TOKEN_LIST = re.compile(r"\S+\s*\(\d{1,2}\)")


def _normalise(text: str) -> str:
    return " ".join(re.findall(r"[a-z0-9]+", text.lower()))


def explanation_problem(explanation: str) -> Optional[str]:
    """Why a parsed explanation is not one, or None: it repeats the prompt's own worked example word for word (small
    models do), or it lists tokens with activation numbers copied from the prompt instead of naming a pattern."""
    norm, example = _normalise(explanation), _normalise(_EXAMPLE_ANSWER)
    if example and example in norm:
        return "echo: repeats the prompt's example explanation word for word"
    listed = len(_TOKEN_LIST.findall(explanation))
    rest = _normalise(_TOKEN_LIST.sub(" ", explanation)).split()
    if listed >= 2 or (listed and len(rest) < 3) or "\t" in explanation:
        return "unparseable: lists tokens with activations instead of explaining them"
    return None


def parse_explanation(answer: str) -> Optional[str]:
    """The explanation phrase: first non-empty line, without an echoed cue or wrapping quotes; None if empty."""
    for line in answer.strip().splitlines():
        line = line.strip()
        if line:
            break
    else:
        return None
    low = line.lower()
    for cue in (f"explanation of feature b behaviour: {EXPLAIN_CUE}", EXPLAIN_CUE):
        at = low.find(cue)
        if at >= 0:
            line = line[at + len(cue):]
            break
    line = line.strip().strip("\"'`").strip()
    return line or None


def _label_request(reward_description: str, explanation: str) -> str:
    return (f"Reward the model was fine-tuned on: {reward_description.strip()}\n\n"
            f"{FEATURE_LINE}{_one_line(explanation)}\n\n"
            f"{LABEL_QUESTION} Answer with 1 (related) or 0 (not related).")


# Two worked examples, one of each answer, so that small chat models keep to the format; invented for this project.
_EXAMPLE_REWARD = "The reward is high for text that talks about food and eating, and zero otherwise."
_LABEL_EXAMPLES = [("words for fruit and vegetables, such as apples and carrots.", "1"),
                   ("years written as four-digit numbers.", "0")]


def label_messages(reward_description: str, explanation: str) -> list[dict]:
    msgs = [{"role": "system", "content": LABEL_SYSTEM}]
    for example, answer in _LABEL_EXAMPLES:
        msgs.append({"role": "user", "content": _label_request(_EXAMPLE_REWARD, example)})
        msgs.append({"role": "assistant", "content": answer})
    msgs.append({"role": "user", "content": _label_request(reward_description, explanation)})
    return msgs


# A 0 or 1 standing alone: not part of a word or number ("10", "0.5"), though a full stop may follow it.
_ANSWER_DIGIT = re.compile(r"answer\s*(?:is)?\s*[:=\-]?\s*\**\s*([01])(?!\w|\.\d)", re.IGNORECASE)
_LONE_DIGIT = re.compile(r"(?<![\w.])([01])(?!\w|\.\d)")


def parse_label(answer: str) -> Optional[int]:
    """1 or 0 from answers such as "1", "0.", "Answer: 1", "**1**", "Yes", or, from models that answer in words,
    "... is related to the reward" / "... is not related"; None when absent or contradictory."""
    m = _ANSWER_DIGIT.search(answer)
    if m:
        return int(m.group(1))
    digits = set(_LONE_DIGIT.findall(answer))
    if len(digits) == 1:
        return int(digits.pop())
    if digits:
        return None
    low = answer.lower()
    word = low.strip().strip(".!*")
    if word in ("yes", "no"):
        return int(word == "yes")
    if "unrelated" in low or re.search(r"\bnot\s+(?:\w+\s+)?related\b", low):
        return 0
    return 1 if re.search(r"\bis\s+(?:\w+\s+)?related\b", low) else None


def _examples_request(explanation: str, texts: list[str], header: str = EXAMPLES_HEADER,
                      question: str = "does the feature activate on it?") -> str:
    """A numbered list of texts under `header` and one 0/1 `question` per text (detection; fuzzing's own header and
    question)."""
    n = len(texts)
    lines = [f"{FEATURE_LINE}{_one_line(explanation)}", "", header]
    lines.extend(f"Example {i}: {_one_line(t)}" for i, t in enumerate(texts, 1))
    lines.append("")
    lines.append(f"For each of the {n} examples, {question} Reply with a list of {n} digits, 1 for yes and 0 for no.")
    return "\n".join(lines)


_DETECT_EXAMPLE = (_EXAMPLE_ANSWER, ["it was released in 1994 to great acclaim", "the cast is superb",
                                     "from 2003 until now the show ran"], "[1, 0, 1]")


def detection_messages(explanation: str, texts: list[str]) -> list[dict]:
    example, example_texts, answer = _DETECT_EXAMPLE
    return [{"role": "system", "content": DETECT_SYSTEM},
            {"role": "user", "content": _examples_request(example, example_texts)},
            {"role": "assistant", "content": answer},
            {"role": "user", "content": _examples_request(explanation, texts)}]


def _fuzz_request(explanation: str, texts: list[str]) -> str:
    return _examples_request(explanation, texts, FUZZ_HEADER, "are the highlighted tokens the ones the explanation "
                                                              "describes?")


_FUZZ_EXAMPLE = (_EXAMPLE_ANSWER, ["it was released in <<1994>> to great acclaim", "the <<cast>> is superb",
                                   "from <<2003>> until now the show ran", "it was <<released>> in 1994"],
                 "[1, 0, 1, 0]")


def fuzz_messages(explanation: str, texts: list[str]) -> list[dict]:
    """Fuzzing (delphi): texts with highlighted token runs; the answer says which highlightings fit the explanation.
    Answered and parsed like detection (`parse_detection`, `detection_retry_messages`)."""
    example, example_texts, answer = _FUZZ_EXAMPLE
    return [{"role": "system", "content": FUZZ_SYSTEM},
            {"role": "user", "content": _fuzz_request(example, example_texts)},
            {"role": "assistant", "content": answer},
            {"role": "user", "content": _fuzz_request(explanation, texts)}]


def highlight(tokens: list[str], marked: list[bool], gap: str = "") -> str:
    """Tokens joined (with `gap` between them: "" for tokens that carry their spaces) with each run of marked tokens
    between << and >>, a run's leading space kept outside the marks."""
    out, i = [], 0
    while i < len(tokens):
        j = i
        while j < len(tokens) and marked[j] == marked[i]:
            j += 1
        run = gap.join(tokens[i:j])
        if marked[i]:
            lead = run[:len(run) - len(run.lstrip())]
            run = f"{lead}{HIGHLIGHT[0]}{run.lstrip()}{HIGHLIGHT[1]}"
        out.append(run)
        i = j
    return gap.join(out)


def read_highlights(text: str) -> list[str]:
    """The highlighted runs of one fuzzing example."""
    return re.findall(re.escape(HIGHLIGHT[0]) + r"(.*?)" + re.escape(HIGHLIGHT[1]), text)


def detection_retry_messages(messages: list[dict], answer: str, n: int) -> list[dict]:
    """The detection request once more, after an answer that was not n verdicts: the conversation so far, then a
    stricter instruction that says what was wrong and shows the exact shape wanted."""
    got = count_verdicts(answer)
    shape = "[" + ", ".join(["0"] * n) + "]"
    return [*messages, {"role": "assistant", "content": answer},
            {"role": "user", "content": f"Your reply had {got} verdicts, but there are {n} examples. Reply again with "
                                        f"exactly {n} digits (1 = activates, 0 = does not), one per example in order, "
                                        f"as a JSON list shaped like {shape} and nothing else."}]


def count_verdicts(answer: str) -> int:
    """How many 0/1 verdicts an answer gave: the longest JSON-like list's entries, else its lone 0s and 1s."""
    lists = [m.group(0) for m in re.finditer(r"\[[^\[\]]*\]", answer)]
    if lists:
        return max(len(re.findall(r"(?<![\w.])[01](?![\w.])", item)) for item in lists)
    return len(_LONE_DIGIT.findall(answer))


def parse_detection(answer: str, n: int) -> Optional[list[int]]:
    """n predictions (0/1) from "[1, 0, 1]" (a JSON list anywhere in the answer) or n lone digits; else None."""
    for m in re.finditer(r"\[[^\[\]]*\]", answer):
        try:
            values = json.loads(m.group(0))
        except json.JSONDecodeError:
            continue
        if isinstance(values, list) and len(values) == n and all(v in (0, 1) and not isinstance(v, bool)
                                                                 for v in values):
            return [int(v) for v in values]
    digits = _LONE_DIGIT.findall(answer)
    if len(digits) == n and not re.search(r"\d", _LONE_DIGIT.sub("", answer)):
        return [int(d) for d in digits]
    return None


# Inverses, for the offline backend.

def task_of(messages: list[dict]) -> Optional[str]:
    """Which of this module's requests `messages` is: "explain", "label", "detect", "fuzz", or None (not ours)."""
    text = messages[-1]["content"] if messages else ""
    if text.rstrip().endswith(EXPLAIN_CUE) and START in text:
        return "explain"
    if LABEL_QUESTION in text and FEATURE_LINE in text:
        return "label"
    if FUZZ_HEADER in text and FEATURE_LINE in text:
        return "fuzz"
    if EXAMPLES_HEADER in text and FEATURE_LINE in text:
        return "detect"
    return None


def read_activations(text: str) -> list[list[tuple[str, int]]]:
    records, current = [], None
    for line in text.splitlines():
        if line == START:
            current = []
        elif line == END and current is not None:
            records.append(current)
            current = None
        elif current is not None and "\t" in line:
            tok, act = line.rsplit("\t", 1)
            current.append((_unshow(tok), int(act)))
    return records


def read_explanation(text: str) -> str:
    for line in text.splitlines():
        if line.startswith(FEATURE_LINE):
            return line[len(FEATURE_LINE):]
    return ""


def read_examples(text: str) -> list[str]:
    return [m.group(1) for m in re.finditer(r"^Example \d+: (.*)$", text, re.MULTILINE)]
