"""The explainer's prompts (paper 4.4, E.1, after Bills et al. 2023) and the parsers of their answers.

Three requests per feature: explain it from `token<TAB>activation` records ("the main thing this feature does is
find ..."), label the explanation 1/0 against a plain-language description of the RLHF reward, and (detection
scoring, after EleutherAI's delphi) say which of a mix of text windows the feature activates on. The `read_*`
functions invert the formats, for the offline backend, which answers these prompts without a model.
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

EXPLAIN_SYSTEM = (
    "We are studying features of a language model. Each feature looks for one particular thing in short texts. "
    "Look at the tokens where the feature activates and say in one short phrase what it is looking for. Do not list "
    "every example word; name the common pattern.\n\n"
    "Each text is shown between <start> and <end>, one token per line as token<tab>activation. Activations go from "
    "0 to 10: a non-zero value means the feature found what it looks for, and higher values mean a stronger match. "
    "Most tokens have activation 0."
)

# One worked example (few-shot, as in the paper), invented for this project.
_EXAMPLE_RECORDS = [
    [("the", 0), ("sequel", 0), ("came", 0), ("out", 0), ("in", 1), ("1987", 10), ("and", 0), ("flopped", 0)],
    [("filmed", 0), ("during", 1), ("the", 0), ("summer", 0), ("of", 2), ("2004", 9), (",", 0), ("it", 0)],
    [("a", 0), ("classic", 0), ("from", 0), ("1950", 7), ("that", 0), ("still", 0), ("holds", 0), ("up", 0)],
]
_EXAMPLE_ANSWER = "years written as four-digit numbers, often release or production dates."

LABEL_SYSTEM = (
    "You decide whether a feature of a language model is related to the reward the model was fine-tuned on. "
    "Reply with a single digit: 1 if the feature is related to the reward, 0 if it is not."
)

DETECT_SYSTEM = (
    "You get the explanation of a feature of a language model and a numbered list of texts. The feature activates "
    "on some of the texts and not on others. Going by the explanation, decide for each text whether the feature "
    "activates on it. Reply with only a JSON list of 0s and 1s, one per text, in order."
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


def _detection_request(explanation: str, texts: list[str]) -> str:
    n = len(texts)
    lines = [f"{FEATURE_LINE}{_one_line(explanation)}", "", EXAMPLES_HEADER]
    lines.extend(f"Example {i}: {_one_line(t)}" for i, t in enumerate(texts, 1))
    lines.append("")
    lines.append(f"For each of the {n} examples, does the feature activate on it? Reply with a list of {n} digits, "
                 "1 for yes and 0 for no.")
    return "\n".join(lines)


_DETECT_EXAMPLE = (_EXAMPLE_ANSWER, ["it was released in 1994 to great acclaim", "the cast is superb",
                                     "from 2003 until now the show ran"], "[1, 0, 1]")


def detection_messages(explanation: str, texts: list[str]) -> list[dict]:
    example, example_texts, answer = _DETECT_EXAMPLE
    return [{"role": "system", "content": DETECT_SYSTEM},
            {"role": "user", "content": _detection_request(example, example_texts)},
            {"role": "assistant", "content": answer},
            {"role": "user", "content": _detection_request(explanation, texts)}]


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
    """Which of this module's requests `messages` is: "explain", "label", "detect", or None (not ours)."""
    text = messages[-1]["content"] if messages else ""
    if text.rstrip().endswith(EXPLAIN_CUE) and START in text:
        return "explain"
    if LABEL_QUESTION in text and FEATURE_LINE in text:
        return "label"
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
