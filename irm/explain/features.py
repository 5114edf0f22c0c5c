"""What explaining one feature takes, for any dictionary (the explain stage's SAE features, irm.diff's crosscoder
latents): a pay-once answer cache, the feature's windows, records, detection and fuzzing texts and page data from one
pass over an activation cache (`feature_jobs`), its explanation, label and scores (`explain_feature`), and a pool
that asks for many features at once (`ask_all`)."""

from __future__ import annotations

import functools
import hashlib
import json
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from irm.artifacts import append_jsonl, read_jsonl
from irm.explain import prompts, scoring
from irm.explain.backends import BackendError
from irm.explain.records import (feature_records, read_windows, select_windows, token_gap, token_strings,
                                 window_maxima)
from irm.runtime import progress
from irm.stages import artifact


class AnswerCache:
    """Raw answers on disk keyed by a hash of (backend, model, generation parameters, messages), appended and
    fsynced as each arrives: a rerun, or a second feature asking the same question (two identical explanations get
    identical label prompts), never sends it again, even while the first request is still in flight."""

    def __init__(self, path: Path, backend):
        self.path = path
        self.backend = backend
        self._answers = {r["key"]: r["answer"] for r in read_jsonl(path) if "key" in r and "answer" in r}
        self._pending: dict[str, Future] = {}
        self._lock = threading.Lock()
        self.sent = 0  # requests that went to the backend in this run
        self.reused = 0

    def key(self, messages: list[dict]) -> str:
        blob = json.dumps({"backend": self.backend.name, "model": self.backend.model, "params": self.backend.params,
                           "messages": messages}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()

    def ask(self, messages: list[dict], **about) -> str:
        key = self.key(messages)
        with self._lock:
            if key in self._answers:
                self.reused += 1
                return self._answers[key]
            waiting = self._pending.get(key)
            if waiting is None:
                mine = self._pending[key] = Future()
        if waiting is not None:
            return waiting.result()
        try:
            with self._lock:
                self.sent += 1
            answer = self.backend.chat(messages)
        except BaseException as e:
            with self._lock:
                del self._pending[key]
            mine.set_exception(e)
            raise
        with self._lock:
            append_jsonl(self.path, {"key": key, "backend": self.backend.name, "model": self.backend.model, **about,
                                     "answer": answer, "time": time.time()})
            self._answers[key] = answer
            del self._pending[key]
        mine.set_result(answer)
        return answer


@dataclass
class Target:
    """One feature to explain: `index` in the dictionary of width `expansion` x d_model. A shared SAE feature has
    its best partner in the other dictionary (`pair`); a crosscoder latent (irm.diff) has none and its dictionary's
    `name`."""

    layer: int
    role: str  # "small" | "large": which side of the MMCS pairs; "tuned-specific": a crosscoder latent's class
    expansion: int
    index: int
    pair_expansion: Optional[int] = None
    pair: Optional[int] = None  # its best partner in the other dictionary
    cosine: Optional[float] = None
    explain: bool = True  # False: beyond explain.max_features, a feature page without an explanation
    name: Optional[str] = None  # the dictionary's name when it is not an SAE's "x<expansion>"

    @property
    def dictionary(self) -> str:
        return self.name or f"x{self.expansion}"

    @property
    def id(self) -> tuple:
        return (self.layer, self.dictionary, self.index)

    @property
    def stream(self) -> tuple[int, ...]:
        """What seeds its random windows: an SAE feature's (layer, expansion, index), another dictionary's with its
        name's hash after them."""
        own = (self.layer, self.expansion, self.index)
        return own if self.name is None else own + (int(hashlib.sha256(self.name.encode()).hexdigest()[:8], 16),)


LOGIT_LENS_TOKENS = 10  # promoted and suppressed tokens shown per feature
NOT_EXPLAINED = "not explained (beyond explain.max_features)"
HISTOGRAM_BINS = 20


def unembedding(root: Path, device) -> tuple[Optional[torch.Tensor], str]:
    """The tuned model's unembedding W_U [vocab, d_model] with its final norm's gain folded in (as TransformerLens'
    fold_ln does for the logit lens), and a line saying what it is; None and the reason when it cannot be had."""
    policy = artifact(root, "policy")
    if not (policy / "config.json").is_file():
        return None, f"no tuned model weights in {policy}"
    from irm.models import load_pretrained

    model, _ = load_pretrained(policy, device=device)
    w_VD = model.get_output_embeddings().weight.detach().float()
    base = getattr(model, model.base_model_prefix, model)
    for name in ("norm", "final_layer_norm", "ln_f"):
        gain = getattr(getattr(base, name, None), "weight", None)
        if gain is not None:
            return w_VD * gain.detach().float()[None, :], f"W_U (final {name} gain folded in) @ unit decoder row"
    return w_VD, "W_U @ unit decoder row"


LENS_CHUNK = 256  # decoder rows per product with the unembedding: [vocab, 256] float32 is 50 MB at vocab 49k


def logit_lenses(directions_FD: torch.Tensor, w_VD: Optional[torch.Tensor], how: str, decode_token) -> list[dict]:
    """For each decoder direction, the tokens it promotes and suppresses directly through the unembedding and the
    histogram of its effect on every logit. One product per chunk of directions: W_U is read once per chunk, not once
    per feature (a [vocab, d] matrix-vector product per feature took 25 ms at vocab 49k)."""
    n, width = directions_FD.shape
    if w_VD is None:
        return [{"method": None, "note": how} for _ in range(n)]
    if width != w_VD.shape[1]:
        return [{"method": None, "note": f"the decoder rows live in a {width}-wide site (not the residual stream's "
                                         f"{w_VD.shape[1]}): no direct path to the unembedding"} for _ in range(n)]
    out = []
    for lo in range(0, n, LENS_CHUNK):
        d_FD = directions_FD[lo:lo + LENS_CHUNK].float().to(w_VD.device)
        logits_VF = w_VD @ (d_FD / d_FD.norm(dim=1, keepdim=True).clamp_min(1e-12)).T
        top, bottom = torch.topk(logits_VF, LOGIT_LENS_TOKENS, dim=0), torch.topk(-logits_VF, LOGIT_LENS_TOKENS, dim=0)
        for f, logits_V in enumerate(logits_VF.T.cpu().numpy()):
            counts, edges = np.histogram(logits_V, bins=HISTOGRAM_BINS)
            out.append({"method": how,
                        "promoted": [[decode_token(int(i)), float(v)]
                                     for v, i in zip(top.values[:, f], top.indices[:, f])],
                        "suppressed": [[decode_token(int(i)), float(-v)]
                                       for v, i in zip(bottom.values[:, f], bottom.indices[:, f])],
                        "histogram": {"of": "the effect on every token's logit", "edges": edges.tolist(),
                                      "counts": counts.tolist()}})
    return out


def histogram(maxima_W: np.ndarray, window: int) -> dict:
    """Distribution of a feature's largest activation per window, over the windows where it fires."""
    active = maxima_W[maxima_W > 0]
    counts, edges = np.histogram(active, bins=HISTOGRAM_BINS, range=(0.0, float(active.max()) if len(active) else 1.0))
    return {"of": f"largest activation per {window}-token window, windows where the feature fires",
            "edges": edges.tolist(), "counts": counts.tolist(), "windows_active": int(len(active)),
            "windows": int(len(maxima_W))}


def _rng(seed: int, t: Target, *stream: int) -> np.random.Generator:
    """A feature's own random stream (window samples, detection order); `stream` (1: fuzzing) gives another."""
    return np.random.default_rng([seed, *t.stream, *stream])


SAE_HELD_OUT = "the sae stage's held-out tokens (sparsity.safetensors)"


def density(active: int, rows: int, hist: dict, held_out: Optional[float], held_out_of: str = SAE_HELD_OUT) -> dict:
    """A feature's activation density; `held_out_of` says where `held_out` was counted (kept as its own field, for
    the feature page, when it is not the SAE's held-out tokens)."""
    other = {} if held_out_of == SAE_HELD_OUT else {"held_out_of": held_out_of}
    return {"tokens": active / rows if rows else 0.0, "tokens_active": int(active), "tokens_total": int(rows),
            "windows": hist["windows_active"] / hist["windows"] if hist["windows"] else 0.0,
            "held_out": held_out, **other,
            "of": "fraction of cached tokens (and of windows) where the feature is above zero; held_out: "
                  + held_out_of}


def feature_jobs(ex, seed: int, cache, encode, order: list[Target], directions_FD: torch.Tensor,
                 held_out: list[Optional[float]], tokenizer, unembed=(None, ""), desc: str = "feature maxima",
                 held_out_of: str = SAE_HELD_OUT) -> list[dict]:
    """What `explain_feature` needs for each feature of `order` under explain section `ex`: records, detection and
    fuzzing texts and the feature page data (activation density, `held_out` its density on `held_out_of`, histogram,
    the logit lens of its decoder direction `directions_FD` through `unembed`), from one pass of `encode(acts) ->
    codes` (column c: order[c]) over `cache` (anything with `rows`, `iter_batches` and `read_rows`, as an activation
    cache)."""
    wins, maxima, active = window_maxima(cache, encode, ex.window, desc=desc)
    # a feature with a page only (beyond explain.max_features) needs no scoring windows
    sels = [select_windows(maxima[:, c], ex.n_top, ex.n_quantile, ex.n_score if t.explain else 0, _rng(seed, t))
            for c, t in enumerate(order)]
    windows = read_windows(cache, encode, wins, [w for s in sels for w in s.top + s.quantile + s.active + s.inactive])
    decode_token = functools.lru_cache(maxsize=None)(lambda i: tokenizer.decode([i]))
    text = lambda w: tokenizer.decode(windows[w][0].tolist())  # noqa: E731
    window_tokens = functools.lru_cache(maxsize=None)(lambda w: tuple(token_strings(tokenizer, windows[w][0].tolist())))
    lenses = logit_lenses(directions_FD, *unembed, decode_token)
    jobs = []
    for c, (t, sel) in enumerate(zip(order, sels)):
        texts, truth = scoring.detection_set([text(w) for w in sel.active], [text(w) for w in sel.inactive],
                                             _rng(seed, t))
        records = feature_records(sel, c, wins, windows, window_tokens)
        fuzz = [(list(window_tokens(w)), windows[w][1][:, c]) for w in sel.active]
        fuzz_texts, fuzz_truth = scoring.fuzz_set(fuzz, _rng(seed, t, 1), token_gap(r["tokens"] for r in records))
        hist = histogram(maxima[:, c], ex.window)
        jobs.append({"target": t, "records": records,
                     "max_activation": float(maxima[:, c].max()),
                     "detect": (texts, truth), "fuzz": (fuzz_texts, fuzz_truth),
                     "histogram": hist,
                     "density": density(int(active[c]), cache.rows, hist, held_out[c], held_out_of),
                     "logit_lens": lenses[c]})
    return jobs


def explain_feature(job: dict, answers: AnswerCache, description: str, score: bool, made_from: str) -> dict:
    """One feature's line: explanation, label, detection and fuzzing scores, the records shown and its page data. An
    unparseable answer gives a null with the raw answer kept beside it; a feature beyond explain.max_features gets
    its page data only."""
    t: Target = job["target"]
    about = {"layer": t.layer, "dictionary": t.dictionary, "index": t.index}
    pair = {} if t.pair is None else {"pair": {"dictionary": f"x{t.pair_expansion}", "index": t.pair,
                                               "cosine": t.cosine}}
    line = {"layer": t.layer, "dictionary": t.dictionary, "role": t.role, "index": t.index, **pair,
            "explanation": None, "label": None, "score": None, "max_activation": job["max_activation"],
            "records": job["records"], "histogram": job.get("histogram"), "logit_lens": job.get("logit_lens"),
            "density": job.get("density"),
            "backend": answers.backend.name, "model": answers.backend.model, "made_from": made_from}
    if not t.explain:
        line["status"] = NOT_EXPLAINED
        return line
    if job["max_activation"] <= 0:
        line["note"] = "never active in the cache: nothing to explain"
        line["status"] = "never active"
        return line
    raw = answers.ask(prompts.explanation_messages(job["records"]), task="explain", **about)
    line["explanation_answer"] = raw
    parsed = prompts.parse_explanation(raw)
    problem = "unparseable: empty answer" if parsed is None else prompts.explanation_problem(parsed)
    if problem:
        # Not an explanation: never labelled (so never "related"), never scored, shown as what it is.
        line["status"] = problem
        line["rejected_explanation"] = parsed
        return line
    line["explanation"] = parsed
    raw = answers.ask(prompts.label_messages(description, parsed), task="label", **about)
    line["label_answer"] = raw
    line["label"] = prompts.parse_label(raw)
    line["status"] = "ok" if line["label"] is not None else "label unparseable"
    line["label_method"] = getattr(answers.backend, "label_method", "LLM judgement of the explanation")
    if score:
        for key, task in scoring.SCORES.items():
            texts, truth = job[task]
            ask = lambda m, task=task: answers.ask(m, task=task, **about)  # noqa: E731
            line[key] = scoring.score(ask, line["explanation"], texts, truth, task)
    return line


def ask_all(ex, jobs, answers, description, made_from, done, path: Path, failures_path: Path,
            desc: str = "explain") -> list[str]:
    """Run the features' requests on a pool of `ex.concurrency` threads (ex: the explain section); each finished
    feature's line is appended to `path` at once and put in `done` under its id. Returns the failures (features to
    retry on a rerun), each also appended to `failures_path`."""
    failures = []
    with ThreadPoolExecutor(max_workers=max(1, ex.concurrency)) as pool:
        futures = {pool.submit(explain_feature, job, answers, description, ex.score, made_from): job["target"]
                   for job in jobs}
        try:
            for fut in progress(as_completed(futures), desc=desc, total=len(futures), unit="feature"):
                t = futures[fut]
                try:
                    line = fut.result()
                except BackendError as e:
                    msg = f"layer {t.layer} {t.dictionary} feature {t.index}: {e}"
                    print(f"{desc}: no answer for {msg}", file=sys.stderr, flush=True)
                    append_jsonl(failures_path, {"layer": t.layer, "dictionary": t.dictionary, "index": t.index,
                                                 "error": str(e), "time": time.time()})
                    failures.append(msg)
                    continue
                append_jsonl(path, line)
                done[t.id] = line
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)  # a refused key or Ctrl-C: stop asking
            raise
    return failures
