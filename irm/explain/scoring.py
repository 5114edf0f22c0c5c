"""Scoring of explanations (after EleutherAI's delphi), two ways, each a balanced binary task for the LLM given only
the explanation:
- detection: a shuffled mix of windows where the feature activates and windows where it does not; which activate?
- fuzzing: the activating windows twice, once with the tokens that fire highlighted and once with as many tokens
  highlighted at random among those that do not; in which is the highlighting the one the explanation describes?
Accuracy, precision, recall and F1 (positive class: activates / correctly highlighted) per feature through
torchmetrics, with a Clopper-Pearson interval of the accuracy over the feature's texts, and their means over the
features scored with a t interval over features. A score whose interval holds 0.5, what guessing gets on a balanced
set, is marked at chance.
"""

from __future__ import annotations

from typing import Callable, Optional

import numpy as np

from irm.explain import prompts

METRICS = ("accuracy", "precision", "recall", "f1")
CHANCE = 0.5  # accuracy of a guess on a balanced set
METHODS = {
    "detect": "detection (delphi-style): the LLM marks which windows activate, given the explanation",
    "fuzz": "fuzzing (delphi-style): the LLM marks which windows have the firing tokens highlighted rather than as "
            "many random non-firing ones, given the explanation",
}
# explanation line key -> scoring task
SCORES = {"score": "detect", "fuzz": "fuzz"}


def detection_set(active: list[str], inactive: list[str], rng: np.random.Generator) -> tuple[list[str], list[int]]:
    """Texts in a random order and whether each one activates the feature (1) or not (0)."""
    texts = active + inactive
    truth = [1] * len(active) + [0] * len(inactive)
    order = rng.permutation(len(texts)).tolist()
    return [texts[i] for i in order], [truth[i] for i in order]


def fuzz_set(windows: list[tuple[list[str], np.ndarray]], rng: np.random.Generator,
             gap: str = "") -> tuple[list[str], list[int]]:
    """Fuzzing texts from activating windows, each (tokens, activations): every window once with its firing tokens
    (activation > 0) highlighted (truth 1) and once with min(firing, not firing) tokens drawn at random among those
    that do not fire (truth 0), in a random order. A window that fires on every token cannot be fuzzed: left out."""
    texts, truth = [], []
    for tokens, acts in windows:
        fires = np.asarray(acts) > 0
        quiet = np.flatnonzero(~fires)
        if not fires.any() or not len(quiet):
            continue
        wrong = np.zeros(len(tokens), dtype=bool)
        wrong[rng.choice(quiet, size=min(int(fires.sum()), len(quiet)), replace=False)] = True
        texts += [prompts.highlight(tokens, fires.tolist(), gap), prompts.highlight(tokens, wrong.tolist(), gap)]
        truth += [1, 0]
    order = rng.permutation(len(texts)).tolist()
    return [texts[i] for i in order], [truth[i] for i in order]


def metrics(pred: list[int], truth: list[int]) -> dict:
    """Binary classification scores (torchmetrics); a ratio with nothing to count (e.g. precision with no positive
    guess) is 0. torchmetrics returns float32: rounded to 6 decimals, so 9 of 10 reads 0.9."""
    import torch
    from torchmetrics.functional.classification import (binary_accuracy, binary_f1_score, binary_precision,
                                                        binary_recall)

    p, t = torch.tensor(pred), torch.tensor(truth)
    return {name: round(float(fn(p, t)), 6) for name, fn in (("accuracy", binary_accuracy), ("precision", binary_precision),
                                                   ("recall", binary_recall), ("f1", binary_f1_score))}


def chance_interval(correct: int, n: int) -> dict:
    """95% Clopper-Pearson interval of an accuracy of `correct` out of `n` (scipy's binomtest) and whether it holds
    0.5, what guessing gets on a balanced set."""
    from scipy.stats import binomtest

    ci = binomtest(correct, n).proportion_ci(confidence_level=0.95, method="exact")
    lo, hi = float(ci.low), float(ci.high)
    return {"ci95": [lo, hi], "interval": "Clopper-Pearson over the feature's texts", "at_chance": lo <= CHANCE <= hi}


def score(ask: Callable[[list[dict]], str], explanation: str, texts: list[str], truth: list[int],
          task: str = "detect") -> Optional[dict]:
    """Ask for predictions on `texts` (`task` "detect" or "fuzz"); the metrics, the accuracy's interval and whether
    it is at chance, the predictions and the raw answer. An answer that is not one verdict per text is asked once
    more with a stricter format (the retry's answer kept beside the first); if that fails too, predictions and
    metrics are None and `unscored_reason` says why. None without both classes: a test with one class only cannot
    tell a good explanation from one that says "everything"."""
    if not 0 < sum(truth) < len(truth):
        return None
    n = len(texts)
    messages = (prompts.fuzz_messages if task == "fuzz" else prompts.detection_messages)(explanation, texts)
    answer = ask(messages)
    pred = prompts.parse_detection(answer, n)
    result = {"n_active": sum(truth), "n_inactive": n - sum(truth), "texts": texts, "truth": truth,
              "predictions": pred, "answer": answer, "retried": pred is None}
    if pred is None:
        retry = ask(prompts.detection_retry_messages(messages, answer, n))
        result["retry_answer"] = retry
        pred = result["predictions"] = prompts.parse_detection(retry, n)
        if pred is None:
            result["unscored_reason"] = (f"answers were not {n} verdicts (first: {prompts.count_verdicts(answer)}, "
                                         f"after one retry with a stricter format: {prompts.count_verdicts(retry)})")
    if pred is None:
        result.update(dict.fromkeys(METRICS))
        return result
    result.update(metrics(pred, truth))
    result.update(chance_interval(sum(int(p == t) for p, t in zip(pred, truth)), n))
    return result


def _summary(lines: list[dict], key: str) -> dict:
    """One scoring method over the explanation lines: per-feature scores and the mean over features with a parsed
    answer, with a t interval over features and whether it holds 0.5."""
    from irm.stats import mean_ci

    features, unparsed, retried = [], 0, 0
    for line in lines:
        s = line.get(key)
        if not s:
            continue
        unparsed += s["accuracy"] is None
        retried += bool(s.get("retried"))
        features.append({"layer": line["layer"], "dictionary": line["dictionary"], "index": line["index"],
                         **{k: s[k] for k in METRICS}, "n_active": s["n_active"], "n_inactive": s["n_inactive"],
                         **{k: s[k] for k in ("ci95", "at_chance", "unscored_reason") if k in s}})
    scored = [f for f in features if f["accuracy"] is not None]
    mean = {k: (float(np.mean([f[k] for f in scored])) if scored else None) for k in METRICS}
    ci = mean_ci([f["accuracy"] for f in scored])["ci95"] if scored else None
    return {"method": METHODS[SCORES[key]], "mean": mean,
            "accuracy_ci95": ci, "interval": "t interval of the mean accuracy over the features scored",
            "at_chance": None if ci is None else bool(ci[0] <= CHANCE <= ci[1]),
            "n_at_chance": sum(bool(f.get("at_chance")) for f in scored),
            "n_scored": len(scored), "n_unparsed": unparsed, "n_retried": retried, "features": features}


def summarise(lines: list[dict]) -> dict:
    """Per-feature scores of the explanation lines and their means: detection at the top level (as before fuzzing
    came), fuzzing under "fuzz"; "explanations" counts the lines by status."""
    statuses: dict[str, int] = {}
    for line in lines:
        status = line.get("status", "ok")
        statuses[status] = statuses.get(status, 0) + 1
    return {**_summary(lines, "score"), "fuzz": _summary(lines, "fuzz"), "explanations": statuses}
