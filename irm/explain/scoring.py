"""Detection scoring of explanations (after EleutherAI's delphi): shown only the explanation and a shuffled mix of
windows where the feature activates and windows where it does not, the LLM says which activate. Accuracy,
precision, recall and F1 (activating = positive class) per feature, and their means over the features scored.
"""

from __future__ import annotations

from typing import Callable, Optional

import numpy as np

from irm.explain import prompts

METRICS = ("accuracy", "precision", "recall", "f1")


def detection_set(active: list[str], inactive: list[str], rng: np.random.Generator) -> tuple[list[str], list[int]]:
    """Texts in a random order and whether each one activates the feature (1) or not (0)."""
    texts = active + inactive
    truth = [1] * len(active) + [0] * len(inactive)
    order = rng.permutation(len(texts)).tolist()
    return [texts[i] for i in order], [truth[i] for i in order]


def metrics(pred: list[int], truth: list[int]) -> dict:
    """Binary classification scores; a ratio with nothing to count (e.g. precision with no positive guess) is 0."""
    p, t = np.asarray(pred), np.asarray(truth)
    tp = int(((p == 1) & (t == 1)).sum())
    fp = int(((p == 1) & (t == 0)).sum())
    fn = int(((p == 0) & (t == 1)).sum())
    ratio = lambda a, b: a / b if b else 0.0  # noqa: E731
    return {
        "accuracy": ratio(int((p == t).sum()), len(t)),
        "precision": ratio(tp, tp + fp),
        "recall": ratio(tp, tp + fn),
        "f1": ratio(2 * tp, 2 * tp + fp + fn),
    }


def score(ask: Callable[[list[dict]], str], explanation: str, texts: list[str], truth: list[int]) -> Optional[dict]:
    """Ask for predictions on `texts`; the metrics, the predictions and the raw answer. An answer that is not one
    verdict per text is asked once more with a stricter format (the retry's answer kept beside the first); if that
    fails too, predictions and metrics are None and `unscored_reason` says why. None without both activating and
    inactive texts: a test with one class only cannot tell a good explanation from one that says "everything"."""
    if not 0 < sum(truth) < len(truth):
        return None
    n = len(texts)
    messages = prompts.detection_messages(explanation, texts)
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
    result.update(metrics(pred, truth) if pred is not None else dict.fromkeys(METRICS))
    return result


def summarise(lines: list[dict]) -> dict:
    """Per-feature scores of the explanation lines and their means over the features with a parsed answer."""
    features, unparsed, retried = [], 0, 0
    for line in lines:
        s = line.get("score")
        if not s:
            continue
        unparsed += s["accuracy"] is None
        retried += bool(s.get("retried"))
        features.append({"layer": line["layer"], "dictionary": line["dictionary"], "index": line["index"],
                         **{k: s[k] for k in METRICS}, "n_active": s["n_active"], "n_inactive": s["n_inactive"],
                         **({"unscored_reason": s["unscored_reason"]} if "unscored_reason" in s else {})})
    scored = [f for f in features if f["accuracy"] is not None]
    mean = {k: (float(np.mean([f[k] for f in scored])) if scored else None) for k in METRICS}
    statuses: dict[str, int] = {}
    for line in lines:
        status = line.get("status", "ok")
        statuses[status] = statuses.get(status, 0) + 1
    return {"method": "detection (delphi-style): the LLM marks which windows activate, given the explanation",
            "mean": mean, "n_scored": len(scored), "n_unparsed": unparsed, "n_retried": retried,
            "explanations": statuses, "features": features}
