"""Shared-prefix reads (irm.sae.splice) against the full-forward path (irm.sae.splice.full_forward_codes_at) and against an
independent reference: each item run alone, unpadded, through the model with hand-written MLP hooks doing the SAE
splice. irm.sae.splice.codes_at, which the deltas, lexicon and control stages call, is the shared-prefix path."""

import random

import pytest
import torch

from irm.config import ModelConfig
from irm.models import TINY_MODELS, arch_of, blocks, load_model
from irm.sae.splice import codes_at, n_shared_tokens, prefix_groups
from irm.sae import SparseAutoencoder


def test_prefix_groups_hand_worked():
    seqs = [[1, 2, 3, 4], [1, 2, 3, 5], [1, 2, 3, 6, 7], [9, 9], [1, 2, 8]]
    # Sorted: 1234, 1235, 12367, 128, 99. 1235 joins 1234 on 3 shared tokens (1 x 3 > 4 x 0); 12367 joins on 3
    # (2 x 3 > 3 x 1); 128 would cut the prefix to 2 for all (3 x 2 > 3 x 2 fails): a group of its own; 99 too.
    assert prefix_groups(seqs) == [(3, [0, 1, 2]), (3, [4]), (2, [3])]
    # Full path: 4 + 4 + 5 + 2 + 3 = 18 token-forwards; shared: 3 + (1 + 1 + 2) + 3 + 2 = 12.
    assert n_shared_tokens(seqs) == (18, 12)
    assert prefix_groups([]) == []
    assert prefix_groups([[5], [5], [5]]) == [(1, [0, 1, 2])]  # identical items: one token-forward


def test_prefix_groups_partition_and_never_cost_more():
    rng = random.Random(0)
    for _ in range(50):
        contexts = [[rng.randrange(5) for _ in range(rng.randrange(1, 6))] for _ in range(3)]
        seqs = [rng.choice(contexts) + [rng.randrange(5) for _ in range(rng.randrange(0, 3))] or [0]
                for _ in range(rng.randrange(1, 20))]
        groups = prefix_groups(seqs)
        assert sorted(i for _, members in groups for i in members) == list(range(len(seqs)))
        for p, members in groups:
            assert p >= 1
            assert all(len(seqs[i]) >= p and seqs[i][:p] == seqs[members[0]][:p] for i in members)
        full, shared = n_shared_tokens(seqs)
        assert shared <= full


def _partitions(items):
    """Every set partition of `items` (a list), as lists of blocks."""
    if not items:
        yield []
        return
    first, rest = items[0], items[1:]
    for partition in _partitions(rest):
        yield [[first], *partition]
        for k in range(len(partition)):
            yield [*partition[:k], [first, *partition[k]], *partition[k + 1:]]


def _brute_force_tokens(seqs) -> int:
    """The fewest token-forwards over every way to group `seqs`: a group runs its members' common prefix once and
    each member's rest; members that share no token cannot form a group."""
    def group_cost(block):
        p = min(len(seqs[i]) for i in block)
        while p and len({tuple(seqs[i][:p]) for i in block}) > 1:
            p -= 1
        if len(block) > 1 and p == 0:
            return None
        return p + sum(len(seqs[i]) - p for i in block) if len(block) > 1 else len(seqs[block[0]])
    best = None
    for partition in _partitions(list(range(len(seqs)))):
        costs = [group_cost(b) for b in partition]
        if None not in costs and (best is None or sum(costs) < best):
            best = sum(costs)
    return best


def test_prefix_groups_fewest_token_forwards_against_brute_force():
    # Every partition of up to 7 sequences is tried. A greedy merge of sorted neighbours loses the first case: [1, 5]
    # and [1, 7, ...] share one token, so it opened a group of prefix 1 that both triples' variants then joined,
    # 27 token-forwards where 17 do ([1, 5] alone, each triple's long prefix once).
    rng = random.Random(1)
    triples = [[1, 5], [1, 7, 7, 7, 7, 2], [1, 7, 7, 7, 7, 3], [1, 7, 7, 7, 7, 4], [1, 8, 8, 8, 8, 2],
               [1, 8, 8, 8, 8, 3]]
    cases = [triples]
    for _ in range(150):
        stems = [[rng.randrange(3) for _ in range(rng.randrange(1, 5))] for _ in range(2)]
        cases.append([rng.choice(stems) + [rng.randrange(3) for _ in range(rng.randrange(0, 4))] or [0]
                      for _ in range(rng.randrange(1, 8))])
    for seqs in cases:
        assert n_shared_tokens(seqs)[1] == _brute_force_tokens(seqs), seqs


def tiny(name, seed=0):
    model, tokenizer = load_model(ModelConfig(name=name, tiny_layers=3, tiny_d_model=32), seed=seed)
    d = model.config.hidden_size
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        saes = {0: SparseAutoencoder(d, 2 * d).eval(), 1: SparseAutoencoder(d, 2 * d).eval()}
        for sae in saes.values():
            sae.b_enc.data.uniform_(-0.1, 0.3)  # many active codes; the reconstruction is far from the input
    return model, tokenizer, saes


def make_items(vocab, seed=0):
    """Items with shared contexts of different lengths (padding in the prefix pass), continuations of 1-3 tokens
    (padding in the continuation pass), reads in the continuation, in the prefix and across both, and one item
    without a shared context."""
    rng = random.Random(seed)
    contexts = [[rng.randrange(4, vocab) for _ in range(n)] for n in (2, 5, 9)]
    items = []
    for c in contexts:
        for _ in range(6):
            ids = c + [rng.randrange(4, vocab) for _ in range(rng.randrange(1, 4))]
            positions = sorted(rng.sample(range(len(ids)), rng.randrange(1, 3)))
            items.append((ids, positions))
        items.append((c + [7, 8], [len(c) + 1]))  # read at the last token
        items.append((c + [7, 8, 9], [1]))  # read inside the shared prefix only
    items.append(([11, 12, 13, 14], [0, 3]))
    return items


def reference(model, saes, ids, positions, spliced=None):
    """Codes of one item, run alone without padding, with the SAEs of `spliced` (default: all) replacing their MLP's
    output through hand-written forward hooks; every layer of `saes` is read."""
    spliced = list(saes) if spliced is None else spliced
    store, handles = {}, []
    mlp = arch_of(model).mlp
    for layer, sae in saes.items():
        def hook(_m, _a, out, layer=layer, sae=sae):
            codes = sae.encode(out)
            store[layer] = codes
            return sae.decode(codes) if layer in spliced else None

        handles.append(getattr(blocks(model)[layer], mlp).register_forward_hook(hook))
    try:
        with torch.no_grad():
            model(input_ids=torch.tensor([ids]))
    finally:
        for h in handles:
            h.remove()
    return torch.stack([store[layer][0, positions].mean(dim=0) for layer in saes])


@pytest.mark.parametrize("name", TINY_MODELS)
def test_equal_to_full_forward_and_to_unpadded_reference(name):
    from irm.sae.splice import full_forward_codes_at as full_forward

    model, tokenizer, saes = tiny(name)
    items = make_items(len(tokenizer))
    expected = torch.stack([reference(model, saes, ids, pos) for ids, pos in items])
    old = full_forward(model, saes, items, tokenizer.pad_token_id, 4, progress_bar=False)
    torch.testing.assert_close(old, expected, rtol=1e-4, atol=1e-5)
    for batch_size in (1, 2, 64):
        new = codes_at(model, saes, items, tokenizer.pad_token_id, batch_size, progress_bar=False)
        torch.testing.assert_close(new, expected, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(new, old, rtol=1e-4, atol=1e-5)


def test_the_cache_carries_the_splice():
    """Layer 1's codes at a continuation depend on layer 0's splice through the prefix's keys and values: the shared
    path matches the reference with layer 0 spliced and is far from the one without (so the equality above would
    catch a cache computed without the splice)."""
    model, tokenizer, saes = tiny("tiny-llama")
    saes[0].b_dec.data.uniform_(-1.0, 1.0)  # layer 0's reconstruction moves the residual stream visibly
    ctx = [20, 21, 22, 23, 24, 25]
    items = [(ctx + [w], [len(ctx)]) for w in (30, 31, 32, 33)]
    new = codes_at(model, saes, items, tokenizer.pad_token_id, 8, progress_bar=False)
    assert prefix_groups([ids for ids, _ in items]) == [(len(ctx), [0, 1, 2, 3])]  # one prefix, four continuations
    spliced = torch.stack([reference(model, saes, ids, pos) for ids, pos in items])
    unspliced = torch.stack([reference(model, saes, ids, pos, spliced=[1]) for ids, pos in items])
    torch.testing.assert_close(new, spliced, rtol=1e-4, atol=1e-5)
    assert (new[:, 1] - unspliced[:, 1]).abs().max() > 100 * (1e-5 + 1e-4 * new[:, 1].abs().max())


def test_mlp_hidden_site_and_empty_inputs():
    from irm.sae.splice import full_forward_codes_at as full_forward
    from irm.models import site_width

    model, tokenizer, _ = tiny("tiny-gpt2")
    d = site_width(model, "mlp_hidden")
    torch.manual_seed(1)
    saes = {1: SparseAutoencoder(d, d).eval(), 2: SparseAutoencoder(d, d).eval()}
    items = make_items(len(tokenizer), seed=3)
    old = full_forward(model, saes, items, tokenizer.pad_token_id, 3, site="mlp_hidden", progress_bar=False)
    new = codes_at(model, saes, items, tokenizer.pad_token_id, 3, site="mlp_hidden", progress_bar=False)
    torch.testing.assert_close(new, old, rtol=1e-4, atol=1e-5)
    assert codes_at(model, saes, [], tokenizer.pad_token_id, 3, progress_bar=False).shape == (0, 2, d)


@pytest.mark.slow  # the benchmark script end to end (11 s); the equalities above stay in the default suite
def test_benchmark_script_quick_run_reports_equal_codes(tmp_path):
    """benchmarks/lexicon_prefix.py end to end at tiny size: both paths ran on both workloads and agreed."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "lexicon_prefix.py"
    out = tmp_path / "lexicon_prefix.json"
    done = subprocess.run([sys.executable, str(script), "--quick", "--threads", "1", "--json", str(out)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads(out.read_text())
    assert set(record["workloads"]) == {"lexicon", "deltas"}
    for w in record["workloads"].values():
        assert w["items"] > 0 and w["tokens_shared_prefix"] <= w["tokens_full_forward"]
        assert w["max_abs_diff"] <= 1e-5 * w["max_abs_code"]
        assert all(len(v) == 1 and v[0] > 0 for v in w["seconds"].values())
