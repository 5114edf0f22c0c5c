"""Explanations and feature pages of the crosscoder's tuned-specific latents (README "Model diffing"): what fine-tuning
added, read as the explain stage reads an SAE feature (irm.explain.features). A latent's windows are the paired
cache's token windows scored by its crosscoder code, which reads both models' activations at once; its logit effect
is its tuned decoder direction through the tuned model's unembedding; its held-out density is its firing count on
the held-out rows Latent Scaling read. Explained by the configured explainer (`explain.backend`), labelled "related
to the reward" and scored by detection and fuzzing, with `explain.max_features` capping the explanations per layer
(the most often firing latents first; the rest get a page only).

Lines in the stage's `diff_explanations` artifact (the explain stage's line format, dictionary "crosscoder"); raw
answers beside them in `answers.jsonl`, pay-once as the explain stage's: a rerun of the diff stage asks nothing
twice."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from irm.errors import UserError

DICTIONARY = "crosscoder"
ROLE = "tuned-specific"
ANSWERS = "answers.jsonl"  # beside the explanations
FAILURES = "explain-failures.jsonl"


@dataclass
class LayerLatents:
    """One layer's tuned-specific latents to explain: the paired cache they are read from, the crosscoder, their
    indices and held-out firing counts over `held_out_rows` rows."""

    layer: int
    paired: object  # irm.diff.data.PairedCache
    crosscoder: torch.nn.Module
    expansion: int
    latents: list[int]
    fired: np.ndarray  # held-out firing count of every latent
    held_out_rows: int


def load_crosscoder(path: Path, d, device="cpu"):
    """The crosscoder a layer's crosscoder.safetensors holds, built under diff section `d` (its activation and k)."""
    from safetensors.torch import load_file

    from irm.diff.model import Crosscoder

    t = load_file(str(path))
    f, m, width = t["W_dec"].shape
    cc = Crosscoder(width, f, m, d.activation, d.k)
    cc.load_state_dict({k: v for k, v in t.items() if k in cc.state_dict()})
    return cc.to(device).eval()


def targets(layer: LayerLatents, cap: Optional[int]):
    """The layer's latents as explain targets, most often firing on the held-out rows first; beyond `cap` a page
    only."""
    from irm.explain.features import Target

    order = sorted(layer.latents, key=lambda j: (-int(layer.fired[j]), j))
    return [Target(layer.layer, ROLE, layer.expansion, j, explain=cap is None or n < cap, name=DICTIONARY)
            for n, j in enumerate(order)]


def layer_jobs(ex, seed: int, layer: LayerLatents, tokenizer, device, unembed) -> list[dict]:
    """The explain jobs of one layer's latents (irm.explain.features.feature_jobs over its paired cache)."""
    from irm.diff.model import TUNED
    from irm.explain.features import feature_jobs

    order = targets(layer, ex.max_features)
    idx = torch.tensor([t.index for t in order], device=device)
    cc = layer.crosscoder.to(device)

    def encode(acts_BMD: torch.Tensor) -> torch.Tensor:
        return cc.encode(acts_BMD.to(device))[:, idx]

    directions = cc.W_dec.detach()[idx, TUNED]
    held_out = [int(layer.fired[t.index]) / layer.held_out_rows if layer.held_out_rows else None for t in order]
    return feature_jobs(ex, seed, layer.paired, encode, order, directions, held_out, tokenizer, unembed,
                        desc=f"diff: layer {layer.layer} latent maxima",
                        held_out_of="the crosscoder's held-out rows (where Latent Scaling read it)")


def explain_latents(ex, seed: int, layers: list[LayerLatents], tokenizer, device, unembed, backend,
                    description: str, path: Path) -> dict:
    """Explain every layer's tuned-specific latents; writes their lines to `path` (the stage's diff_explanations),
    raw answers beside it. Returns diff.json's record: how many were explained and labelled related to the reward,
    the scores' summary, the backend."""
    from irm.artifacts import fingerprint, write_text
    from irm.explain import scoring
    from irm.explain.features import NOT_EXPLAINED, AnswerCache, ask_all

    root = path.parent
    jobs = [job for layer in layers for job in layer_jobs(ex, seed, layer, tokenizer, device, unembed)]
    answers = AnswerCache(root / ANSWERS, backend)
    made_from = fingerprint(DICTIONARY, description, backend.name, backend.model)
    done: dict[tuple, dict] = {}
    write_text(path, "")  # lines of an earlier crosscoder describe other latents
    failures = ask_all(ex, jobs, answers, description, made_from, done, path, root / FAILURES, desc="diff: explain")
    if failures:
        raise UserError(f"{len(failures)} of {len(jobs)} tuned-specific latents got no explanation after retries "
                        f"(first: {failures[0]}); rerun `python -m irm diff --force`: answers already received are "
                        f"kept in {root / ANSWERS} and not asked again")
    lines = [done[job["target"].id] for job in jobs]
    write_text(path, "".join(json.dumps(ln) + "\n" for ln in lines))
    scores = scoring.summarise(lines)
    explained = [ln for ln in lines if ln.get("status") != NOT_EXPLAINED]
    return {"latents": len(lines), "explained": len(explained),
            "related": sum(1 for ln in explained if ln.get("label") == 1),
            "labelled": sum(1 for ln in explained if ln.get("label") is not None),
            "backend": backend.name, "model": backend.model, "scores": scores,
            "sent": answers.sent, "reused": answers.reused}
