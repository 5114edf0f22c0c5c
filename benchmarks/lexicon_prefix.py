"""Shared-prefix reads against the full-forward path: the SAE codes the `lexicon` stage reads (every single-token
lexicon word appended to the same few triple prefixes) and the `deltas` stage reads (the three variants of every
triple), computed by `irm.sae.splice.full_forward_codes_at` (one whole forward pass per item, the path before issue
17) and by `irm.sae.splice.codes_at` (each shared prefix once, the continuations against its key/value cache),
interleaved, with the largest difference between the two printed.

The items are built as the stages build them, from the quickstart config: its corpus, its triples (built here with
`irm.stages.triples.build_triples`, as the `triples` stage does), its `lexicon.contexts_per_word` and `cache.batch_size`,
the embedded SmolLM2-135M. The SAEs are random 1x dictionaries at `--layers` (default: the top three blocks, the
most expensive choice the divergence stage's top-3 can make): the cost does not depend on what they learnt.

    python benchmarks/lexicon_prefix.py --threads 2 --json benchmarks/results/lexicon_prefix.json
"""

from __future__ import annotations

import _common  # noqa: F401, I001  (first: it sets TQDM_DISABLE, which tqdm reads when torch imports it)

import random
import time

import torch

from _common import ROOT, base_parser, environment, median, parse_args, ratio_median, table, write_json

CONFIG = ROOT / "configs" / "quickstart.yaml"


def lexicon_items(tokenizer, triples: list[dict], contexts_per_word: int, seed: int, max_words=None):
    """The lexicon stage's (ids, positions) items: single-token lexicon words in the chosen contexts."""
    from irm.stages.lexicon import choose_contexts
    from irm.reward import LexiconReward
    from irm.words import locate, token_counts

    lexicon = LexiconReward().lexicon
    counts = token_counts(tokenizer, [w for w in lexicon if not any(c.isspace() for c in w)])
    words = sorted(w for w, n in counts.items() if n == 1)
    if max_words is not None and max_words < len(words):
        words = sorted(random.Random(seed).sample(words, max_words))
    contexts = choose_contexts(triples, contexts_per_word, seed)
    items = []
    for word in words:
        for prefix in contexts:
            ids, positions = locate(tokenizer, prefix + word, len(prefix), len(prefix + word))
            if len(positions) == 1:
                items.append((ids, positions))
    return items, len(words), len(contexts)


def deltas_items(triples: list[dict]):
    """The deltas stage's items: every triple's three variants."""
    from irm.readers import VARIANTS

    return [(t["ids"][v], t["positions"][v]) for t in triples for v in VARIANTS]


def random_saes(model, layers: list[int], seed: int = 0) -> dict:
    from irm.models import site_width
    from irm.sae import SparseAutoencoder

    d = site_width(model, "mlp_out")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        saes = {layer: SparseAutoencoder(d, d).eval() for layer in layers}
        for sae in saes.values():  # a bias that keeps about half the codes active, as trained SAEs' often are
            sae.b_enc.data.uniform_(-0.05, 0.05)
    return saes


def main(argv=None) -> dict:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=2, help="interleaved repetitions (default 2)")
    p.add_argument("--layers", type=int, nargs="+", default=None, help="SAE layers (default: the top three)")
    args = parse_args(p, argv)

    from irm.cli import parse_config
    from irm.sae.splice import full_forward_codes_at as full_forward
    from irm.models import load_model, n_layers
    from irm.sae.splice import codes_at as shared_prefix
    from irm.sae.splice import n_shared_tokens
    from irm.reward import LexiconReward, spacy_tokenizer
    from irm.stages.triples import build_triples
    from irm.data import load_texts

    cfg = parse_config("lexicon", ["--config", str(CONFIG), "--run_dir", "/nonexistent"])
    if args.quick:
        cfg.model.name = "tiny-gpt-neox"
    model, tokenizer = load_model(cfg.model, seed=cfg.seed, device="cpu")
    layers = args.layers or list(range(n_layers(model) - 3, n_layers(model)))
    saes = random_saes(model, layers)
    texts = load_texts(cfg.corpus, cfg.corpus.split, seed=cfg.seed)
    triples, _ = build_triples(texts, LexiconReward().lexicon, tokenizer, cfg.triples, cfg.seed,
                               spacy_tokenizer(cfg.reward.spacy_pipeline))
    lex, n_words, n_contexts = lexicon_items(tokenizer, triples, cfg.lexicon.contexts_per_word, cfg.seed,
                                             200 if args.quick else None)
    workloads = {"lexicon": lex, "deltas": deltas_items(triples[:60] if args.quick else triples)}
    bs, pad = cfg.cache.batch_size, tokenizer.pad_token_id
    paths = {"full forward": full_forward, "shared prefix": shared_prefix}

    # Warm-up (allocator, kernels), then repetitions in a rotating order.
    for fn in paths.values():
        fn(model, saes, lex[:4 * bs], pad, bs, progress_bar=False)
    times = {(w, k): [] for w in workloads for k in paths}
    results = {}
    for rep in range(1 if args.quick else args.repeats):
        names = list(paths)[rep % 2:] + list(paths)[: rep % 2]
        for w, items in workloads.items():
            for k in names:
                t0 = time.perf_counter()
                results[(w, k)] = paths[k](model, saes, items, pad, bs, progress_bar=False)
                times[(w, k)].append(time.perf_counter() - t0)
                print(f"  rep {rep}: {w:<8} {k:<14} {times[(w, k)][-1]:7.2f} s", flush=True)

    rows, record = [], {"environment": environment(), "model": cfg.model.name, "layers": layers, "batch_size": bs,
                        "lexicon_words": n_words, "contexts": n_contexts, "workloads": {}}
    for w, items in workloads.items():
        old, new = results[(w, "full forward")], results[(w, "shared prefix")]
        diff = float((old - new).abs().max())
        scale = float(old.abs().max())
        cut = [ids[: max(pos) + 1] for ids, pos in items]
        full_tokens, shared_tokens = n_shared_tokens(cut)
        speedup = ratio_median(times[(w, "full forward")], times[(w, "shared prefix")])
        rows.append([w, len(items), sum(len(ids) for ids, _ in items), shared_tokens,
                     median(times[(w, "full forward")]), median(times[(w, "shared prefix")]), speedup,
                     f"{diff:.1e}", f"{diff / scale:.1e}", diff <= 1e-5 * scale])
        record["workloads"][w] = {"items": len(items), "tokens_full_forward": sum(len(ids) for ids, _ in items),
                                  "tokens_after_cut": full_tokens, "tokens_shared_prefix": shared_tokens,
                                  "seconds": {k: times[(w, k)] for k in paths}, "speedup": speedup,
                                  "max_abs_diff": diff, "max_abs_code": scale}
    print(f"{cfg.model.name}, SAE layers {layers}, batch {bs}, {n_words} single-token words x {n_contexts} "
          f"contexts, {len(triples)} triples")
    print(table(["workload", "items", "tokens (full)", "tokens (shared)", "full forward s", "shared prefix s",
                 "speed-up", "max |diff|", "max |diff| / max |code|", "equal (<= 1e-5 x max |code|)"], rows))
    write_json(args.json, record)
    return record


if __name__ == "__main__":
    main()
