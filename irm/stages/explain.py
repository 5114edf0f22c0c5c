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
import json
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from irm.artifacts import RunDir, fingerprint, read_json, read_jsonl, write_json, write_text
from irm.errors import UserError
from irm.explain import EXPLANATIONS, neuronpedia, scoring
from irm.explain.backends import make_backend
from irm.explain.features import NOT_EXPLAINED, AnswerCache, Target, ask_all, feature_jobs, unembedding
from irm.runtime import start
from irm.stages import EXPLAIN_OPERATIONAL  # how answers are fetched, not what is asked
from irm.stages import artifact, relpath

LINE_FORMAT = 2  # what a line holds (2: fuzzing, density, quantile bins): a line of another format is redone
ANSWERS = "explain/answers.jsonl"
FAILURES = "explain/failures.jsonl"
SCORES = relpath("explain_scores")


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


def _held_out_density(directory: Path) -> Optional[np.ndarray]:
    """Each feature's firing density on the SAE's held-out tokens, from the sparsity file the sae stage wrote beside
    it (log10 density, SAELens's convention); None when there is none."""
    from irm.sae.export import SPARSITY_FILE

    path = directory / SPARSITY_FILE
    if not path.is_file():
        return None
    from safetensors.numpy import load_file

    return np.power(10.0, load_file(str(path))["sparsity"].astype(np.float64))


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

    directions = torch.stack([saes[t.role][0].dictionary[t.index].detach() for t in order])
    density = [None if held_out[t.role] is None else float(held_out[t.role][t.index]) for t in order]
    return feature_jobs(cfg.explain, cfg.seed, cache, encode, order, directions, density, tokenizer, unembed,
                        desc=f"explain: layer {layer} maxima")


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


def run(cfg) -> None:
    from irm.reward import reward_description
    from irm.stages import mark_done

    device = start(cfg.seed, cfg.device)
    root = Path(cfg.run_dir)
    targets = shared_features(cfg)
    backend = make_backend(cfg.explain, device=device, reward_cfg=cfg.reward)
    description = reward_description(cfg.reward)
    made_from = _made_from(cfg, backend, description)
    done = _finished(root / EXPLANATIONS, made_from)
    todo = {layer: [t for t in ts if t.id not in done] for layer, ts in targets.items()}
    todo = {layer: ts for layer, ts in todo.items() if ts}
    answers = AnswerCache(root / ANSWERS, backend)
    failures = []
    if todo:
        tokenizer = _tokenizer(root)
        unembed = unembedding(root, device)
        jobs = [job for layer, ts in todo.items()
                for job in _layer_jobs(cfg, layer, ts, tokenizer, device, unembed)]
        failures = ask_all(cfg.explain, jobs, answers, description, made_from, done, root / EXPLANATIONS,
                           root / FAILURES)
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


