"""The spliced-SAE reader: the SAE codes of chosen layers read with the SAEs spliced into the model (each layer's
output replaced by its SAE's reconstruction), as deltas, lexicon, validate and control read them. `load_saes`,
`codes_at` (shared-prefix reads, below), `iter_codes` and `full_forward_codes_at` (one whole forward pass per
sequence, the reference), `n_codes`.

Shared-prefix reads: the SAE codes at chosen token positions of many sequences that begin alike (a lexicon word
appended to a few contexts, the three variants of a triple), with each shared beginning run through the model once.

`codes_at` answers exactly what `full_forward_codes_at` answers (each item's codes at its positions, averaged
over them, with every SAE in `saes` spliced in) but computes it differently:

1. Each sequence is cut after its last read position (a causal model's codes there never see later tokens).
2. `prefix_groups` sorts the cut sequences and groups runs of them that share leading tokens, with the fewest
   token-forwards: a group's prefix is the tokens all its members share.
3. The prefixes of a batch of groups run once, left-padded, with the SAEs spliced in and a key/value cache kept:
   a spliced SAE at layer L changes the residual stream every later layer (and later position) sees, so the cache
   holds the keys and values of the spliced model. Codes read inside a prefix come from this pass.
4. The rest of every member (its continuation, usually one token) runs against its group's cache, copied along the
   batch (one cache row per member), with explicit position ids (the prefix's real length onwards) and the
   prefix's padding mask in front of the continuation's, the SAEs spliced in again.

Nothing after the last spliced block runs in either pass. A group of one is a plain forward pass of its sequence.
The SAEs are called through their own `encode`/`decode`, so anything they do to the activations (a normalisation)
happens here as in the full-forward path.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Iterator, Optional, Sequence

from irm.errors import UserError

# Continuation rows per forward: up to CONTINUATION_ROWS x batch_size (one-token continuations are thin matrix
# products; more rows use the cores better), while their copied cache holds at most CACHED_TOKENS x batch_size
# prefix tokens (a full-forward batch of 64-token sequences, four times over).
CONTINUATION_ROWS = 16
CACHED_TOKENS = 256


def _lcp(a: Sequence[int], b: Sequence[int], limit: int) -> int:
    n = min(limit, len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def prefix_groups(sequences: Sequence[Sequence[int]]) -> list[tuple[int, list[int]]]:
    """Groups of the sequences (indices) that run one shared prefix: [(prefix length, members)], every index in
    exactly one group, every member starting with the group's prefix, with the fewest token-forwards (each group's
    prefix once plus every member's rest). Exact over groups that are runs of the sorted sequences: a run whose
    members all share p tokens either opens a group of prefix p, which each of its sub-runs (split where neighbours
    share exactly p) joins or opens a deeper group inside, or leaves its sub-runs to an enclosing group or their
    own. (A greedy merge of neighbours is not enough: it put 642 of the quickstart's 1800 triple variants into one
    group on the single shared token "the", leaving each triple's own long prefix unshared.) A group of one has
    the whole sequence as its prefix."""
    order = sorted(range(len(sequences)), key=lambda i: tuple(sequences[i]))
    seqs = [sequences[i] for i in order]
    shared = [_lcp(a, b, len(a)) for a, b in zip(seqs, seqs[1:])]  # shared[k]: tokens seqs[k] and seqs[k+1] share
    best: dict[tuple[int, int, int], tuple[int, int]] = {}  # (start, stop, open depth) -> (cost, depth opened or 0)

    def runs(i: int, j: int, p: int) -> list[tuple[int, int]]:
        bounds = [i, *(k + 1 for k in range(i, j - 1) if shared[k] == p), j]
        return list(zip(bounds, bounds[1:]))

    def cost(i: int, j: int, d: int) -> tuple[int, int]:
        """Fewest token-forwards for seqs[i:j] when each may join an open group of prefix d (0: none open)."""
        if (i, j, d) not in best:
            if j - i == 1:
                best[i, j, d] = (len(seqs[i]) - d, 0)  # joins the open group, or (d = 0) runs whole on its own
            else:
                p = min(shared[i: j - 1])
                apart = sum(cost(a, b, d)[0] for a, b in runs(i, j, p))
                opened = p + sum(cost(a, b, p)[0] for a, b in runs(i, j, p)) if p > d else apart
                best[i, j, d] = (opened, p) if opened < apart else (apart, 0)  # strict: ties stay apart
        return best[i, j, d]

    groups: list[tuple[int, list[int]]] = []

    def collect(i: int, j: int, d: int, members: list[int]) -> None:
        if j - i == 1:
            if d:
                members.append(order[i])
            else:
                groups.append((len(seqs[i]), [order[i]]))
            return
        p = cost(i, j, d)[1]
        inner: list[int] = [] if p else members
        for a, b in runs(i, j, min(shared[i: j - 1])):
            collect(a, b, p or d, inner)
        if p:
            groups.append((p, inner))

    if seqs:
        collect(0, len(seqs), 0, [])
    return groups


def _select_rows(cache, index):
    """A copy of a key/value cache whose batch row r is row index[r] of `cache` (the original is left as it is:
    a cache layer's update replaces its tensors, it never writes into them)."""
    out = copy.copy(cache)
    out.layers = []
    for layer in cache.layers:
        new = copy.copy(layer)
        if getattr(layer, "is_initialized", False) and getattr(layer, "keys", None) is not None:
            new.keys = layer.keys.index_select(0, index)
            new.values = layer.values.index_select(0, index)
        out.layers.append(new)
    return out


def _through(sae, layer: int, recorded: dict):
    """The splice for one layer: the SAE's reconstruction goes on, its codes are kept in `recorded[layer]`."""
    dtype = next(sae.parameters()).dtype

    def fn(x):
        codes = sae.encode(x.to(dtype))
        recorded[layer] = codes
        return sae.decode(codes).to(x.dtype)

    return fn


def _prefix_inputs(batch, cut, pad_id: int):
    """ids_BW, mask_BW: the batch's shared prefixes, left-padded to the longest."""
    import torch

    w = max(p for p, _ in batch)
    ids_BW = torch.full((len(batch), w), pad_id, dtype=torch.long)
    mask_BW = torch.zeros((len(batch), w), dtype=torch.long)
    for row, (p, members) in enumerate(batch):
        ids_BW[row, w - p:] = torch.as_tensor(cut[members[0]][:p], dtype=torch.long)
        mask_BW[row, w - p:] = 1
    return ids_BW, mask_BW


def _add_prefix_codes(sums, codes, batch, items, cut) -> list:
    """Adds each member's read positions inside its prefix to `sums`; returns (group row, item, prefix length)
    of the members with tokens after the prefix."""
    w = codes.shape[1]
    rest = []
    for row, (p, members) in enumerate(batch):
        for i in members:
            inside = [q for q in items[i][1] if q < p]
            if inside:
                sums[i] += codes[row, [w - p + q for q in inside]].sum(dim=0)
            if len(cut[i]) > p:
                rest.append((row, i, p))
    return rest


def _continuation_inputs(chunk, cut, pad_id: int):
    """ids_RS, tail_RS: each member's tokens after its prefix, right-padded (nothing reads a pad: it comes after
    every real token of its row)."""
    import torch

    s = max(len(cut[i]) - p for _, i, p in chunk)
    ids_RS = torch.full((len(chunk), s), pad_id, dtype=torch.long)
    tail_RS = torch.zeros((len(chunk), s), dtype=torch.long)
    for r, (_, i, p) in enumerate(chunk):
        ids_RS[r, : len(cut[i]) - p] = torch.as_tensor(cut[i][p:], dtype=torch.long)
        tail_RS[r, : len(cut[i]) - p] = 1
    return ids_RS, tail_RS


def _add_continuation_codes(sums, codes, chunk, items) -> None:
    for r, (_, i, p) in enumerate(chunk):
        after = [q - p for q in items[i][1] if q >= p]
        if after:
            sums[i] += codes[r, after].sum(dim=0)


def codes_at(model, saes: dict, items: Sequence[tuple[Sequence[int], Sequence[int]]], pad_id: int,
             batch_size: int, site: str = "mlp_out", desc: str = "SAE codes",
             progress_bar: bool = True) -> "torch.Tensor":
    """codes_NLF: for each (token ids, read positions) item, the codes of every SAE in `saes` (spliced in all at
    once) at its positions, averaged over them; the same numbers as `full_forward_codes_at` within float rounding,
    with shared prefixes run once (module docstring). `batch_size` groups per prefix pass; continuations run
    up to `CONTINUATION_ROWS * batch_size` members per pass (fewer behind long prefixes: `CACHED_TOKENS`)."""
    import torch
    from transformers import DynamicCache

    from irm.models import splice, stop_after
    from irm.runtime import progress

    if batch_size < 1:
        raise UserError(f"batch size must be at least 1, got {batch_size}")
    layers = list(saes)
    if not items:
        width = int(next(iter(saes.values())).dictionary.shape[0]) if saes else 0
        return torch.zeros((0, len(layers), width))
    device = next(model.parameters()).device
    # Each sequence up to its last read position; an item without positions keeps its sequence (and gets NaN, the
    # mean of nothing, as the full-forward path gives it).
    cut = [list(ids[: max(pos) + 1]) if len(pos) else list(ids) for ids, pos in items]
    sums: Optional[torch.Tensor] = None  # [items, layers, codes]; the width is the codes' (an SAE wrapper's own)
    counts = torch.tensor([len(pos) for _, pos in items], dtype=torch.float32)

    recorded: dict[int, torch.Tensor] = {}

    def codes_BTLF():
        return torch.stack([recorded[layer].float() for layer in layers], dim=2).cpu()

    import inspect

    # transformers renamed `past_key_values` to `cache` (the old name warns, then goes): whichever forward takes.
    cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    def forward(cache, **kwargs):
        kwargs[cache_kw] = cache
        recorded.clear()
        run(**{k: v.to(device) if torch.is_tensor(v) else v for k, v in kwargs.items()}, use_cache=True)
        return codes_BTLF()

    groups = sorted(prefix_groups(cut), key=lambda g: g[0])  # similar prefix lengths share a pass: little padding
    batches = [groups[i: i + batch_size] for i in range(0, len(groups), batch_size)]
    splices = {layer: _through(saes[layer], layer, recorded) for layer in layers}
    with torch.inference_mode(), splice(model, splices, site=site), stop_after(model, max(layers)) as run:
        for batch in progress(batches, desc=desc, unit="batch", disable=not progress_bar):
            # Prefixes, left-padded, positions counted from each one's first real token.
            ids_BW, mask_BW = _prefix_inputs(batch, cut, pad_id)
            w = ids_BW.shape[1]
            cache = DynamicCache(config=model.config)
            codes = forward(cache, input_ids=ids_BW, attention_mask=mask_BW,
                            position_ids=(mask_BW.cumsum(-1) - 1).clamp(min=0))
            if sums is None:
                sums = torch.zeros((len(items), *codes.shape[2:]))
            rest = _add_prefix_codes(sums, codes, batch, items, cut)
            # Continuations against copies of their group's cache rows, right-padded (nothing reads a pad: it
            # comes after every real token of its row).
            rest.sort(key=lambda r: len(cut[r[1]]) - r[2])
            rows_per_pass = max(batch_size, min(CONTINUATION_ROWS * batch_size, CACHED_TOKENS * batch_size // w))
            for start in range(0, len(rest), rows_per_pass):
                chunk = rest[start: start + rows_per_pass]
                ids_RS, tail_RS = _continuation_inputs(chunk, cut, pad_id)
                s = ids_RS.shape[1]
                index = torch.tensor([row for row, _, _ in chunk], dtype=torch.long)
                start_R = torch.tensor([p for _, _, p in chunk], dtype=torch.long)
                codes = forward(_select_rows(cache, index.to(device)), input_ids=ids_RS,
                                attention_mask=torch.cat([mask_BW[index], tail_RS], dim=1),
                                position_ids=start_R[:, None] + torch.arange(s))
                _add_continuation_codes(sums, codes, chunk, items)
    return sums / counts[:, None, None]


def n_shared_tokens(sequences: Sequence[Sequence[int]]) -> tuple[int, int]:
    """(token-forwards of the full-forward path, token-forwards with shared prefixes) for these (already cut)
    sequences: what `prefix_groups` saves, for reports and benchmarks."""
    groups = prefix_groups(sequences)
    return (sum(len(s) for s in sequences),
            sum(p + sum(len(sequences[i]) - p for i in members) for p, members in groups))


__all__ = ["codes_at", "prefix_groups", "n_shared_tokens", "CONTINUATION_ROWS"]


# ---------------------------------------------------------------------------------------------------------------
# Full-forward reads (every SAE spliced in, one whole forward pass per sequence)


def load_saes(run_dir: str | Path, layers: Sequence[int], model, site: str, expansion: int) -> dict:
    """The exported SAE of size `expansion` (the small dictionary: `cfg.sae.dictionary_pair()[0]`) of every layer,
    in eval mode on `model`'s device; one trained on another width (another model or site) is refused."""
    from irm.models import site_width
    from irm.sae import load_sae, sae_dir

    device = next(model.parameters()).device
    saes = {}
    for layer in layers:
        path = sae_dir(run_dir, layer, expansion)
        if not path.exists():
            raise UserError(f"no {expansion}x SAE for layer {layer} in {path}; run `python -m irm sae` first")
        saes[layer] = load_sae(path, d_in=site_width(model, site), device=device).eval()
    return saes


def iter_codes(model, saes: dict, sequences: Sequence[Sequence[int]], pad_id: int, batch_size: int,
               site: str = "mlp_out", desc: str = "SAE codes", progress_bar: bool = True) -> Iterator[tuple]:
    """For batches of token-id sequences (left-padded, positions counted from each sequence's first real token),
    run `model` with every SAE in `saes` spliced in (output replaced by decode(encode(output))) and yield
    (indices into `sequences`, mask_BT, codes_BTLF): the codes of every layer in `saes` order, on the CPU.
    Sequences are batched by length so little compute goes to padding. `progress_bar=False` on all but one of
    several processes."""
    import torch

    from irm.models import splice, stop_after
    from irm.runtime import progress

    if batch_size < 1:
        raise UserError(f"batch size must be at least 1, got {batch_size}")
    device = next(model.parameters()).device
    layers = list(saes)
    recorded: dict[int, torch.Tensor] = {}

    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    batches = [order[i: i + batch_size] for i in range(0, len(order), batch_size)]
    splices = {layer: _through(saes[layer], layer, recorded) for layer in layers}
    with torch.inference_mode(), splice(model, splices, site=site), stop_after(model, max(layers)) as run:
        for batch in progress(batches, desc=desc, unit="batch", disable=not progress_bar):
            width = max(len(sequences[i]) for i in batch)
            ids_BT = torch.full((len(batch), width), pad_id, dtype=torch.long)
            mask_BT = torch.zeros((len(batch), width), dtype=torch.long)
            for row, i in enumerate(batch):
                seq = sequences[i]
                ids_BT[row, width - len(seq):] = torch.as_tensor(seq, dtype=torch.long)
                mask_BT[row, width - len(seq):] = 1
            # Explicit positions: with left padding the model would otherwise count pads as positions.
            pos_BT = (mask_BT.cumsum(-1) - 1).clamp(min=0)
            recorded.clear()
            run(input_ids=ids_BT.to(device), attention_mask=mask_BT.to(device), position_ids=pos_BT.to(device))
            codes_BTLF = torch.stack([recorded[layer].float() for layer in layers], dim=2).cpu()
            yield batch, mask_BT, codes_BTLF


def full_forward_codes_at(model, saes: dict, items: Sequence[tuple[Sequence[int], Sequence[int]]], pad_id: int,
                          batch_size: int, site: str = "mlp_out", desc: str = "SAE codes",
                          progress_bar: bool = True) -> "torch.Tensor":
    """`codes_at` the way it was computed before shared-prefix reads: one whole forward pass per item (iter_codes).
    The reference the shared-prefix path is tested and benchmarked against."""
    import torch

    out: Optional[torch.Tensor] = None
    for batch, mask_BT, codes_BTLF in iter_codes(model, saes, [ids for ids, _ in items], pad_id, batch_size,
                                                  site, desc, progress_bar):
        if out is None:
            out = torch.zeros((len(items), *codes_BTLF.shape[2:]))
        width = mask_BT.shape[1]
        for row, i in enumerate(batch):
            ids, positions = items[i]
            shift = width - len(ids)
            out[i] = codes_BTLF[row, [shift + p for p in positions]].mean(dim=0)
    return out if out is not None else torch.zeros((0, len(saes), n_codes(saes)))


def n_codes(saes: dict) -> int:
    """Features per layer: the width of the 1x dictionaries."""
    return int(next(iter(saes.values())).dictionary.shape[0])


def with_inputs(saes: dict) -> dict:
    """Each SAE wrapped so that its `encode` returns [codes | the activation it encoded] and `decode` reads the
    codes part: `codes_at` through these gives the codes and the raw activations at once, the splice unchanged."""
    import torch
    from torch import nn

    class WithInputs(nn.Module):
        def __init__(self, sae):
            super().__init__()
            self.sae = sae
            self.width = int(sae.dictionary.shape[0])

        def encode(self, x):
            return torch.cat([self.sae.encode(x), x.to(self.sae_dtype)], dim=-1)

        def decode(self, z):
            return self.sae.decode(z[..., : self.width])

        @property
        def sae_dtype(self):
            return next(self.sae.parameters()).dtype

    return {layer: WithInputs(sae) for layer, sae in saes.items()}
