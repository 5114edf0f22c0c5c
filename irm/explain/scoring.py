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
    """Ask for predictions on `texts`; the metrics, the predictions and the raw answer (predictions and metrics
    None when the answer cannot be parsed). None without both activating and inactive texts: a test with one
    class only cannot tell a good explanation from one that says "everything" or "nothing"."""
    if not 0 < sum(truth) < len(truth):
        return None
    answer = ask(prompts.detection_messages(explanation, texts))
    pred = prompts.parse_detection(answer, len(texts))
    result = {"n_active": sum(truth), "n_inactive": len(truth) - sum(truth), "texts": texts, "truth": truth,
              "predictions": pred, "answer": answer}
    result.update(metrics(pred, truth) if pred is not None else dict.fromkeys(METRICS))
    return result


def summarise(lines: list[dict]) -> dict:
    """Per-feature scores of the explanation lines and their means over the features with a parsed answer."""
    features, unparsed = [], 0
    for line in lines:
        s = line.get("score")
        if not s:
            continue
        if s["accuracy"] is None:
            unparsed += 1
        features.append({"layer": line["layer"], "dictionary": line["dictionary"], "index": line["index"],
                         **{k: s[k] for k in METRICS}, "n_active": s["n_active"], "n_inactive": s["n_inactive"]})
    scored = [f for f in features if f["accuracy"] is not None]
    mean = {k: (float(np.mean([f[k] for f in scored])) if scored else None) for k in METRICS}
    return {"method": "detection (delphi-style): the LLM marks which windows activate, given the explanation",
            "mean": mean, "n_scored": len(scored), "n_unparsed": unparsed, "features": features}
