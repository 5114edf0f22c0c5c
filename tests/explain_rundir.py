"""A run directory with just what `python -m irm explain` reads, built by hand so every feature's behaviour is known:
coordinate k of the cached activations is positive exactly where TRIGGERS[k] stands. The small SAE's feature k reads
coordinate k; the large SAE's feature j reads coordinate PERM[j] (its extra features read -e_k and never fire), so
mmcs.json pairs small k with large PERM^-1[k], and a large-dictionary index used on the small dictionary (the
authors' bug) shows the wrong word."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from irm.artifacts import sha256_file

TRIGGERS = ["great", "awful", "camera", "minutes", "love", "two", "boring", "music"]  # 4 VADER words, 4 neutral
FILLER = ["the", "film", "was", "a", "and", "it", "of", "plot", "actor", "scene", "this", "story"]
D = len(TRIGGERS)
PERM = [3, 0, 6, 1, 7, 2, 5, 4]  # large feature j reads coordinate PERM[j]
LAYERS = (1, 2)


def write_cache(layer_dir: Path, acts: np.ndarray, token_ids: np.ndarray, doc_ids: np.ndarray,
                positions: np.ndarray, shard_rows: int) -> None:
    """The documented cache format: shard-NNNNN.safetensors (acts, token_ids, doc_ids, positions) + manifest.json."""
    from safetensors.torch import save_file

    layer_dir.mkdir(parents=True, exist_ok=True)
    shards = []
    for i, lo in enumerate(range(0, len(acts), shard_rows)):
        hi = min(lo + shard_rows, len(acts))
        name = f"shard-{i:05d}.safetensors"
        save_file({"acts": torch.from_numpy(acts[lo:hi]).contiguous(),
                   "token_ids": torch.from_numpy(token_ids[lo:hi]), "doc_ids": torch.from_numpy(doc_ids[lo:hi]),
                   "positions": torch.from_numpy(positions[lo:hi])}, str(layer_dir / name))
        shards.append({"file": name, "rows": hi - lo, "sha256": sha256_file(layer_dir / name)})
    manifest = {"model": "tiny-gpt-neox", "layer": int(layer_dir.name[-2:]), "site": "mlp_out", "dtype": "float32",
                "rows": len(acts), "width": acts.shape[1], "corpus_fingerprint": "test", "shards": shards,
                "complete": True}
    (layer_dir / "manifest.json").write_text(json.dumps(manifest))


def build_run(root: Path, n_docs: int = 40, seed: int = 0, shard_rows: int = 97, p_trigger: float = 0.06) -> dict:
    """Write rlhf/policy (tokenizer), cache/layer-NN, sae/layer-NN/x1|x2 and mmcs.json under `root`; returns the
    raw data {layer: (acts, token_ids, doc_ids, positions)} for independent checks."""
    from irm.models import tiny_tokenizer
    from irm.sae import SparseAutoencoder, sae_dir, save_sae

    tokenizer = tiny_tokenizer()
    tokenizer.save_pretrained(root / "rlhf" / "policy")
    vocab = tokenizer.get_vocab()
    filler = np.array([vocab[w] for w in FILLER])
    trig = np.array([vocab[w] for w in TRIGGERS])
    rng = np.random.default_rng(seed)
    data = {}
    for layer in LAYERS:
        acts, ids, docs, pos = [], [], [], []
        for doc in range(n_docs):
            n = int(rng.integers(9, 30))  # documents of different lengths: windows end at document boundaries
            tok = rng.choice(filler, size=n)
            a = -rng.uniform(0.0, 0.5, size=(n, D))  # below zero: no feature fires on filler
            for p in np.flatnonzero(rng.random(n) < p_trigger):
                k = int(rng.integers(D))
                tok[p] = trig[k]
                a[p, k] = rng.uniform(0.2, 3.0)
            acts.append(a)
            ids.append(tok)
            docs.append(np.full(n, doc))
            pos.append(np.arange(n))
        arrays = (np.concatenate(acts).astype(np.float32),
                  *(np.concatenate(x).astype(np.int64) for x in (ids, docs, pos)))
        write_cache(root / "cache" / f"layer-{layer:02d}", *arrays, shard_rows=shard_rows)
        data[layer] = arrays

        small = SparseAutoencoder(D, D)
        large = SparseAutoencoder(D, 2 * D)
        with torch.no_grad():
            small.W_dec.copy_(torch.eye(D))
            eye = torch.eye(D)
            large.W_dec.copy_(torch.cat([eye[PERM], -eye]))
        save_sae(small, sae_dir(root, layer, 1), layer=layer)
        save_sae(large, sae_dir(root, layer, 2), layer=layer)
    inverse = {k: j for j, k in enumerate(PERM)}
    pairs = [{"small": k, "large": inverse[k], "cosine": 1.0 - 0.01 * k} for k in range(D)]
    mmcs = {"layers": {str(layer): {"max": 1.0, "hungarian": 1.0, "pairs": pairs} for layer in LAYERS}}
    (root / "mmcs.json").write_text(json.dumps(mmcs))
    return data


def codes(acts: np.ndarray, dictionary: str) -> np.ndarray:
    """The SAE codes of the built SAEs computed in numpy, independently of irm.sae: ReLU(acts W_dec^T)."""
    eye = np.eye(D)
    w_dec = eye if dictionary == "x1" else np.concatenate([eye[PERM], -eye])
    return np.maximum(acts @ w_dec.T, 0.0)
