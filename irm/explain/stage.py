"""`python -m irm explain` (paper 4.4, E.1): explain each shared feature of each layer's two dictionaries from its
top-activating windows, label the explanation 1/0 "related to the RLHF reward", and score it by detection and
fuzzing. Every feature of mmcs.json's pairs gets its feature page data (top and quantile windows, activation density,
histogram, logit effect), explained or not (`explain.max_features` caps only the explanations), also written in
SAEDashboard's Neuronpedia format (irm.explain.neuronpedia).

Resumable and pay-once: every raw answer is appended to `explain/answers.jsonl` (keyed by a hash of backend, model
and messages) the moment it arrives, and every finished feature to `explanations.jsonl`; a rerun skips finished
features and answers repeated questions from disk.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from typing import Optional
from pathlib import Path

import numpy as np
import torch

from irm.artifacts import RunDir, append_jsonl, fingerprint, read_json, read_jsonl, write_json, write_text
from irm.errors import UserError
from irm.explain import EXPLANATIONS, neuronpedia, prompts, scoring
from irm.explain.backends import BackendError, make_backend
from irm.explain.records import (feature_records, read_windows, select_windows, token_gap, token_strings,
                                 window_maxima)
from irm.runtime import progress, start
from irm.stages import EXPLAIN_OPERATIONAL  # how answers are fetched, not what is asked
from irm.stages import artifact, relpath

ANSWERS = "explain/answers.jsonl"
FAILURES = "explain/failures.jsonl"
SCORES = relpath("explain_scores")


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
    """One shared feature to explain: `index` in the dictionary of width `expansion` x d_model."""

    layer: int
    role: str  # "small" | "large": which side of the MMCS pairs
    expansion: int
    index: int
    pair_expansion: int
    pair: int  # its best partner in the other dictionary
    cosine: float
    explain: bool = True  # False: beyond explain.max_features, a feature page without an explanation

    @property
    def dictionary(self) -> str:
        return f"x{self.expansion}"

    @property
    def id(self) -> tuple:
        return (self.layer, self.dictionary, self.index)


def shared_features(cfg) -> dict[int, list[Target]]:
    """Per layer, the shared features of `<run_dir>/mmcs.json`: the pairs' small-dictionary indices in the small
    dictionary and their large-dictionary indices in the large one, best cosine first, each index once; all but the
    first `explain.max_features` of each dictionary have `explain` False (a page, no explanation)."""
    mmcs = read_json(Path(cfg.run_dir) / relpath("mmcs"))
    small, large = cfg.sae.dictionary_pair()
    cap = cfg.explain.max_features
    out: dict[int, list[Target]] = {}
    for layer, entry in sorted(((int(k), v) for k, v in mmcs.get("layers", {}).items())):
        pairs = sorted(entry.get("pairs", []), key=lambda p: -p["cosine"])
        targets = []
        for mine, exp, other, other_exp in (("small", small, "large", large), ("large", large, "small", small)):
            seen: set[int] = set()
            for p in pairs:
                if p[mine] not in seen:
                    targets.append(Target(layer, mine, exp, int(p[mine]), other_exp, int(p[other]),
                                          float(p["cosine"]), explain=cap is None or len(seen) < cap))
                    seen.add(p[mine])
        out[layer] = targets
    if not out:
        raise UserError(f"{cfg.run_dir}/mmcs.json lists no layers; rerun `python -m irm dictionaries`")
    return out


def _tokenizer(root: Path):
    policy = artifact(root, "policy")
    if not policy.is_dir():
        raise UserError(f"missing {policy}: run `python -m irm rlhf` first (windows are decoded with the tuned "
                        f"model's tokenizer)")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(policy)


LOGIT_LENS_TOKENS = 10  # promoted and suppressed tokens shown per feature
NOT_EXPLAINED = "not explained (beyond explain.max_features)"
LINE_FORMAT = 2  # what a line holds (2: fuzzing, density, quantile bins): a line of another format is redone
HISTOGRAM_BINS = 20


def _unembedding(root: Path, device) -> tuple[Optional[torch.Tensor], str]:
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


def _logit_lenses(directions_FD: torch.Tensor, w_VD: Optional[torch.Tensor], how: str, decode_token) -> list[dict]:
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


def _histogram(maxima_W: np.ndarray, window: int) -> dict:
    """Distribution of a feature's largest activation per window, over the windows where it fires."""
    active = maxima_W[maxima_W > 0]
    counts, edges = np.histogram(active, bins=HISTOGRAM_BINS, range=(0.0, float(active.max()) if len(active) else 1.0))
    return {"of": f"largest activation per {window}-token window, windows where the feature fires",
            "edges": edges.tolist(), "counts": counts.tolist(), "windows_active": int(len(active)),
            "windows": int(len(maxima_W))}


def _rng(cfg, t: Target, *stream: int) -> np.random.Generator:
    """A feature's own random stream (window samples, detection order); `stream` (1: fuzzing) gives another."""
    return np.random.default_rng([cfg.seed, t.layer, t.expansion, t.index, *stream])


def _held_out_density(directory: Path) -> Optional[np.ndarray]:
    """Each feature's firing density on the SAE's held-out tokens, from the sparsity file the sae stage wrote beside
    it (log10 density, SAELens's convention); None when there is none."""
    from irm.sae.export import SPARSITY_FILE

    path = directory / SPARSITY_FILE
    if not path.is_file():
        return None
    from safetensors.numpy import load_file

    return np.power(10.0, load_file(str(path))["sparsity"].astype(np.float64))


def _density(active: int, rows: int, hist: dict, held_out: Optional[float]) -> dict:
    return {"tokens": active / rows if rows else 0.0, "tokens_active": int(active), "tokens_total": int(rows),
            "windows": hist["windows_active"] / hist["windows"] if hist["windows"] else 0.0,
            "held_out": held_out,
            "of": "fraction of cached tokens (and of windows) where the feature is above zero; held_out: the sae "
                  "stage's held-out tokens (sparsity.safetensors)"}


def _layer_jobs(cfg, layer: int, targets: list[Target], tokenizer, device, unembed=(None, "")) -> list[dict]:
    """Records, detection and fuzzing texts and feature page data (activation density, histogram, logit lens through
    `unembed`) for `targets` of one layer, from one pass over its cache with both SAEs."""
    from irm.activations import ActivationCache, cache_layer_dir
    from irm.sae import load_sae, sae_dir

    root = Path(cfg.run_dir)
    cache = ActivationCache(cache_layer_dir(root, layer))
    if cache.rows == 0:
        raise UserError(f"the activation cache of layer {layer} is empty; rerun `python -m irm cache` with documents")
    roles = sorted({(t.role, t.expansion) for t in targets})
    saes, held_out = {}, {}
    for role, exp in roles:
        sae = load_sae(sae_dir(root, layer, exp), d_in=cache.width, device=device)
        held_out[role] = _held_out_density(sae_dir(root, layer, exp))
        width = sae.dictionary.shape[0]
        idx = [t.index for t in targets if t.role == role]
        bad = [i for i in idx if not 0 <= i < width]
        if bad:
            raise UserError(f"mmcs.json names feature {bad[0]} of layer {layer}'s x{exp} dictionary, which has "
                            f"{width} features; rerun `python -m irm dictionaries` after `python -m irm sae`")
        saes[role] = (sae, torch.tensor(idx, device=device))
    order = [t for role, _ in roles for t in targets if t.role == role]  # column c of encode()'s codes

    def encode(acts_BD: torch.Tensor) -> torch.Tensor:
        acts_BD = acts_BD.to(device)
        return torch.cat([sae.encode(acts_BD)[:, idx] for sae, idx in saes.values()], dim=1)

    wins, maxima, active = window_maxima(cache, encode, cfg.explain.window, desc=f"explain: layer {layer} maxima")
    # a feature with a page only (beyond explain.max_features) needs no scoring windows
    sels = [select_windows(maxima[:, c], cfg.explain.n_top, cfg.explain.n_quantile,
                           cfg.explain.n_score if t.explain else 0, _rng(cfg, t)) for c, t in enumerate(order)]
    windows = read_windows(cache, encode, wins, [w for s in sels for w in s.top + s.quantile + s.active + s.inactive])
    decode_token = functools.lru_cache(maxsize=None)(lambda i: tokenizer.decode([i]))
    text = lambda w: tokenizer.decode(windows[w][0].tolist())  # noqa: E731
    window_tokens = functools.lru_cache(maxsize=None)(lambda w: tuple(token_strings(tokenizer, windows[w][0].tolist())))
    lenses = _logit_lenses(torch.stack([saes[t.role][0].dictionary[t.index].detach() for t in order]), *unembed,
                           decode_token)
    jobs = []
    for c, (t, sel) in enumerate(zip(order, sels)):
        texts, truth = scoring.detection_set([text(w) for w in sel.active], [text(w) for w in sel.inactive],
                                             _rng(cfg, t))
        records = feature_records(sel, c, wins, windows, window_tokens)
        fuzz = [(list(window_tokens(w)), windows[w][1][:, c]) for w in sel.active]
        fuzz_texts, fuzz_truth = scoring.fuzz_set(fuzz, _rng(cfg, t, 1), token_gap(r["tokens"] for r in records))
        hist = _histogram(maxima[:, c], cfg.explain.window)
        dens = held_out[t.role]
        jobs.append({"target": t, "records": records,
                     "max_activation": float(maxima[:, c].max()),
                     "detect": (texts, truth), "fuzz": (fuzz_texts, fuzz_truth),
                     "histogram": hist,
                     "density": _density(int(active[c]), cache.rows, hist,
                                         None if dens is None else float(dens[t.index])),
                     "logit_lens": lenses[c]})
    return jobs


def _explain(job: dict, answers: AnswerCache, description: str, score: bool, made_from: str) -> dict:
    """One feature's line: explanation, label, detection and fuzzing scores, the records shown and its page data. An
    unparseable answer gives a null with the raw answer kept beside it; a feature beyond explain.max_features gets
    its page data only."""
    t: Target = job["target"]
    about = {"layer": t.layer, "dictionary": t.dictionary, "index": t.index}
    line = {"layer": t.layer, "dictionary": t.dictionary, "role": t.role, "index": t.index,
            "pair": {"dictionary": f"x{t.pair_expansion}", "index": t.pair, "cosine": t.cosine},
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


def _made_from(cfg, backend, description: str) -> str:
    """What a finished feature's answer depends on: a line made from anything else is stale."""
    rd = RunDir(cfg.run_dir)
    stamps = {s: (rd.stage_record(s) or {}).get("completed_at") for s in ("cache", "sae", "dictionaries")}
    content = {k: v for k, v in dataclasses.asdict(cfg.explain).items() if k not in EXPLAIN_OPERATIONAL}
    return fingerprint(content, description, cfg.seed, sorted(cfg.sae.expansions), backend.name, backend.model,
                       stamps, LINE_FORMAT)


def _finished(path: Path, made_from: str) -> dict[tuple, dict]:
    """Finished lines made from the current inputs; the file is rewritten without any others."""
    lines = read_jsonl(path)
    keep = {(ln["layer"], ln["dictionary"], ln["index"]): ln for ln in lines if ln.get("made_from") == made_from}
    if len(keep) != len(lines) or (path.exists() and not path.read_text(encoding="utf-8").endswith("\n")):
        write_text(path, "".join(json.dumps(ln) + "\n" for ln in keep.values()))
    return keep


def _reward_description(cfg) -> str:
    if cfg.reward.description:
        return cfg.reward.description
    from irm.reward import reward_description

    return reward_description(cfg.reward)


def run(cfg) -> None:
    from irm.stages import mark_done

    device = start(cfg.seed, cfg.device)
    root = Path(cfg.run_dir)
    targets = shared_features(cfg)
    backend = make_backend(cfg.explain, device=device, reward_cfg=cfg.reward)
    description = _reward_description(cfg)
    made_from = _made_from(cfg, backend, description)
    done = _finished(root / EXPLANATIONS, made_from)
    todo = {layer: [t for t in ts if t.id not in done] for layer, ts in targets.items()}
    todo = {layer: ts for layer, ts in todo.items() if ts}
    answers = AnswerCache(root / ANSWERS, backend)
    failures = []
    if todo:
        tokenizer = _tokenizer(root)
        unembed = _unembedding(root, device)
        jobs = [job for layer, ts in todo.items()
                for job in _layer_jobs(cfg, layer, ts, tokenizer, device, unembed)]
        failures = _ask_all(cfg, jobs, answers, description, made_from, done)
    if failures:
        raise UserError(f"{len(failures)} of {sum(map(len, targets.values()))} features got no answer after retries "
                        f"(first: {failures[0]}); rerun `python -m irm explain` to ask for just those")
    wanted = [t.id for ts in targets.values() for t in ts]
    lines = [done[i] for i in sorted(wanted)]
    write_text(root / EXPLANATIONS, "".join(json.dumps(ln) + "\n" for ln in lines))
    scores = scoring.summarise(lines)
    write_json(root / SCORES, {"backend": backend.name, "model": backend.model, **scores})
    pages = neuronpedia.write(cfg, lines)
    mark_done(cfg, "explain", [EXPLANATIONS, SCORES, pages], backend=backend.name, model=backend.model)
    related = sum(1 for ln in lines if ln["label"] == 1)
    offline = " (offline backend: top-token summaries and a lexicon rule, no LLM)" if backend.name == "offline" else ""
    pages_only = scores["explanations"].get(NOT_EXPLAINED, 0)
    not_ok = {k: v for k, v in scores["explanations"].items() if k not in ("ok", NOT_EXPLAINED)}

    def mean(s: dict) -> str:
        acc = s["mean"]["accuracy"]
        return (f"{'n/a' if acc is None else f'{acc:.2f}'}{' (at chance)' if s['at_chance'] else ''} over "
                f"{s['n_scored']} scored, {s['n_at_chance']} of them at chance")

    print(f"explain: {len(lines) - pages_only} features explained by {backend.name}/{backend.model}{offline} "
          f"({pages_only} more shared features with a page only, beyond explain.max_features): {related} related to "
          f"the reward; mean detection accuracy {mean(scores)}, fuzzing {mean(scores['fuzz'])} "
          f"({scores['n_unparsed'] + scores['fuzz']['n_unparsed']} unscored, "
          f"{scores['n_retried'] + scores['fuzz']['n_retried']} retried); {answers.sent} requests sent, "
          f"{answers.reused} answered from {root / ANSWERS}; feature pages for SAEDashboard/Neuronpedia in {pages}",
          flush=True)
    if not_ok:
        print("  not usable: " + "; ".join(f"{n} {status}" for status, n in sorted(not_ok.items())), flush=True)


def _ask_all(cfg, jobs, answers, description, made_from, done) -> list[str]:
    """Run the features' requests on a pool of `explain.concurrency` threads; each finished feature is appended to
    explanations.jsonl at once. Returns the failures (features to retry on a rerun)."""
    path = Path(cfg.run_dir) / EXPLANATIONS
    failures = []
    with ThreadPoolExecutor(max_workers=max(1, cfg.explain.concurrency)) as pool:
        futures = {pool.submit(_explain, job, answers, description, cfg.explain.score, made_from): job["target"]
                   for job in jobs}
        try:
            for fut in progress(as_completed(futures), desc="explain", total=len(futures), unit="feature"):
                t = futures[fut]
                try:
                    line = fut.result()
                except BackendError as e:
                    msg = f"layer {t.layer} {t.dictionary} feature {t.index}: {e}"
                    print(f"explain: no answer for {msg}", file=sys.stderr, flush=True)
                    append_jsonl(Path(cfg.run_dir) / FAILURES, {"layer": t.layer, "dictionary": t.dictionary,
                                                                "index": t.index, "error": str(e), "time": time.time()})
                    failures.append(msg)
                    continue
                append_jsonl(path, line)
                done[t.id] = line
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)  # a refused key or Ctrl-C: stop asking
            raise
    return failures
