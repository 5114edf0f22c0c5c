"""`python -m irm diff` (README "Model diffing", beyond the paper): cache the base model's activations at the chosen
layers over the same documents and tokens as the tuned cache, train a crosscoder on each layer's [base; tuned] pair
and (diff.diff_sae) an SAE on tuned - base, and write diff.json: per layer the classes of the crosscoder's latents
(tuned-specific, base-specific, shared... after Latent Scaling, and by decoder norms alone), Latent Scaling's ratios,
reconstruction quality of both models and the diff-SAE's, and the stage's time.

Outputs under `<run_dir>/diff/`: `base-cache/layer-NN` (the base activations, an activation cache),
`layer-NN/crosscoder.safetensors` (weights, buffers and per-latent delta, nu and class index)."""

from __future__ import annotations

import contextlib
import math
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from irm.errors import UserError

CLASS_INDEX_KEY = "class_index"  # per-latent index into irm.diff.scaling.CLASSES in crosscoder.safetensors


def base_cache(cfg, model, tokenizer, layers: list[int], root: Path) -> dict[int, Path]:
    """Write the base model's activations of `layers` to `root/layer-NN`, over the documents of the tuned cache
    (its manifest's split, count, site and max_length; the corpus must be the one it was made from)."""
    from irm.activations import ActivationCache, ShardWriter, cache_layer_dir
    from irm.activations.collect import cache_activations
    from irm.artifacts import atomic_dir
    from irm.data import corpus_fingerprint, load_texts

    tuned = {layer: ActivationCache(cache_layer_dir(cfg.run_dir, layer)) for layer in layers}
    m = tuned[layers[0]].manifest
    if m.get("corpus_fingerprint") != corpus_fingerprint(cfg.corpus, m["split"], cfg.seed):
        raise UserError(f"the tuned cache {tuned[layers[0]].dir} was made from another corpus than this config's; "
                        "rerun `python -m irm cache` with this config")
    texts = load_texts(cfg.corpus, m["split"], cfg.seed, n=m["documents"])
    out = {layer: root / f"layer-{layer:02d}" for layer in layers}
    described = ("site", "corpus_fingerprint", "split", "documents", "max_length")  # what the rows are, as the tuned's
    with contextlib.ExitStack() as stack:
        tmp = {layer: stack.enter_context(atomic_dir(path)) for layer, path in out.items()}
        writers = {layer: ShardWriter(tmp[layer], tuned[layer].width, cfg.cache.dtype, cfg.cache.shard_rows)
                   for layer in layers}
        cache_activations(model, tokenizer, texts, writers, site=m["site"], batch_size=cfg.cache.batch_size,
                          max_length=m["max_length"], storage_dtype=cfg.cache.dtype)
        for layer, writer in writers.items():
            writer.close(**{k: tuned[layer].manifest.get(k) for k in described}, model=cfg.model.name, policy=None,
                         layer=layer, activations_from="base")
    return out


def train_layer(d, base_dir: Path, tuned_dir: Path, seed: int, loggers: tuple, out_dir: Path,
                words: Optional[tuple] = None) -> dict:
    """One layer's crosscoder (and diff-SAE) under config section `d` (DiffConfig); its diff.json record. Writes
    `out_dir/crosscoder.safetensors`. `loggers`: the crosscoder's and the diff-SAE's Lightning loggers (False:
    none). `words`: (tokenizer, the marked words) for every latent's share of activation on those words
    (irm.diff.enrichment) and the top words of the tuned-specific latents; None: neither."""
    from safetensors.torch import save_file

    from irm.artifacts import atomic_path
    from irm.diff.data import PairedDataModule
    from irm.diff.module import CrosscoderModule
    from irm.diff.scaling import CLASSES, NU_MAX, SHARED, SPECIFIC, read_crosscoder
    from irm.runtime import seed_all

    start = time.perf_counter()
    seed_all(seed)
    data = PairedDataModule(str(base_dir), str(tuned_dir), batch_size=d.batch_size, val_fraction=d.val_fraction,
                            seed=seed)
    module = CrosscoderModule(d)
    _fit(d, module, data, loggers[0])
    result = read_crosscoder(module.crosscoder, data.val_dataloader())
    cc = module.crosscoder
    index = {c: i for i, c in enumerate(CLASSES)}
    tensors = {k: v.detach().cpu().contiguous() for k, v in cc.state_dict().items()}
    tensors.update({"delta": torch.as_tensor(result["delta"]).float(),
                    "nu_error": torch.as_tensor(result["nu_tuned"]["nu_error"]).float(),
                    "nu_reconstruction": torch.as_tensor(result["nu_tuned"]["nu_reconstruction"]).float(),
                    "fired": torch.as_tensor(result["fired"]).long(),
                    CLASS_INDEX_KEY: torch.tensor([index[c] for c in result["classes"]], dtype=torch.int64)})
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_dir / "crosscoder.safetensors") as tmp:
        save_file(tensors, str(tmp))
    specific = [int(j) for j in (result["classes"] == "tuned-specific").nonzero()[0]]
    record = {
        "latents": cc.d_hidden, "held_out_rows": result["rows"], "activation": d.activation,
        "thresholds": {"specific": SPECIFIC, "shared": SHARED, "nu_max": NU_MAX},
        "fractions": result["fractions"], "fractions_by_norm": result["fractions_by_norm"],
        "quality": result["quality"], "tuned_specific": specific,
        "tuned_specific_nu": {"error": [float(result["nu_tuned"]["nu_error"][j]) for j in specific],
                              "reconstruction": [float(result["nu_tuned"]["nu_reconstruction"][j]) for j in specific]},
        "steps": int(module.global_step),
    }
    if words is not None:
        record.update(_word_shares(cc, data, specific, *words))
    if d.diff_sae:
        record["diff_sae"] = _diff_sae(d, base_dir, tuned_dir, seed, loggers[1])
    record["seconds"] = time.perf_counter() - start
    return record


def _word_shares(cc, data, specific: list[int], tokenizer, words) -> dict:
    """Every latent's share of activation on the marked words over every cached row, and the top words of the
    tuned-specific latents. Every row, not the held-out tail alone: a share says what a latent fires on, not how
    well it reconstructs, and a reward's words can be rare (the planted words are 0.25% of the quickstart's cached tokens)."""
    from irm.diff.enrichment import marked_mass, shares, top_words, word_marks

    token_ids = data.paired.tuned.read_range(0, data.paired.rows, ("token_ids",))["token_ids"]
    marks = word_marks(token_ids, tokenizer, words)
    m = marked_mass(cc, data.every_row(), token_ids, marks, track=specific)
    share = shares(m["marked"], m["mass"])
    return {"word_share": [None if not math.isfinite(v) else float(v) for v in share],
            "marked_rows": float(marks.double().mean()),
            "tuned_specific_words": {str(j): top_words(tokenizer, m["tokens"][j]) for j in specific}}


def _fit(d, module, data, logger) -> None:
    import lightning as L

    own = sorted(set(d.trainer) & {"max_epochs", "logger", "default_root_dir"})
    if own:
        raise UserError(f"diff.trainer sets {own}, which the diff stage sets itself; use diff.epochs and remove them")
    items = math.ceil(data.split / d.batch_size) * d.epochs
    try:
        trainer = L.Trainer(max_epochs=d.epochs, logger=logger, enable_checkpointing=False,
                            **{"log_every_n_steps": max(1, min(50, items // 50)), **d.trainer})
    except (TypeError, ValueError) as e:
        raise UserError(f"diff.trainer holds an argument lightning.Trainer rejects ({e}); fix diff.trainer") from e
    trainer.fit(module, datamodule=data)


def _diff_sae(d, base_dir: Path, tuned_dir: Path, seed: int, logger) -> dict:
    """The baseline: irm.sae's SAE (TopK, untied, centred input: the quickstart's SAE) on tuned - base; its held-out
    explained variance of the difference and L0."""
    from irm.config import SAEConfig
    from irm.diff.data import PairedDataModule
    from irm.runtime import seed_all
    from irm.sae.model import empty_moments, merge_moments, moment_metrics, row_moments
    from irm.sae.module import SAEModule

    seed_all(seed)
    data = PairedDataModule(str(base_dir), str(tuned_dir), batch_size=d.batch_size, val_fraction=d.val_fraction,
                            seed=seed, difference=True)
    module = SAEModule(SAEConfig(expansions=[d.expansion], activation="topk", k=d.diff_sae_k, tied=False,
                                 center_input=True, learning_rate=d.learning_rate, dead_window=d.dead_window,
                                 aux_coefficient=d.aux_coefficient))
    _fit(d, module, data, logger)
    sae = next(iter(module.saes.values()))
    moments = empty_moments(sae.d_in)
    with torch.no_grad():
        for x_BD in data.val_dataloader():
            x_BD = x_BD.to(sae.W_dec.device)
            x_hat, codes = sae(x_BD)
            moments = merge_moments(torch.stack([moments, row_moments(x_BD, x_hat, codes).cpu()]))
    stats = moment_metrics(moments)
    return {"latents": sae.d_hidden, "explained_variance": float(stats["explained_variance"]),
            "l0": float(stats["l0"]), "steps": int(module.global_step)}


def _latents(layer_dir: Path) -> dict:
    """Per latent its class, delta, held-out firing count and tuned decoder row, as a layer's crosscoder.safetensors
    holds them."""
    from safetensors.torch import load_file

    from irm.diff.model import TUNED
    from irm.diff.scaling import CLASSES

    t = load_file(str(layer_dir / "crosscoder.safetensors"))
    return {"classes": np.array(CLASSES, dtype=object)[t[CLASS_INDEX_KEY].numpy()], "delta": t["delta"].double().numpy(),
            "fired": t["fired"].numpy(), "tuned_decoder": t["W_dec"][:, TUNED]}


def _specific(latents: dict) -> dict[int, list[int]]:
    """The tuned-specific latents of each layer that has any."""
    found = {layer: [int(j) for j in np.flatnonzero(v["classes"] == "tuned-specific")] for layer, v in latents.items()}
    return {layer: ix for layer, ix in found.items() if ix}


def _ablation(cfg, device, latents: dict, specific: dict[int, list[int]]) -> dict:
    """irm.diff.ablate over the tuned-specific latents of every layer, or why it was not run."""
    if not specific:
        return {"not_tested": "no tuned-specific latent to ablate"}
    from irm.diff.ablate import ablate_specific
    from irm.sampling import rule

    return ablate_specific(cfg, device, cfg.ablate, rule(cfg.rlhf, cfg.ablate.new_tokens),
                           {layer: latents[layer]["tuned_decoder"] for layer in specific}, specific,
                           {layer: latents[layer]["fired"] for layer in specific},
                           {layer: latents[layer]["classes"] == "shared" for layer in specific})


def _explanations(cfg, device, tokenizer, latents: dict, specific: dict[int, list[int]], records: dict,
                  base_dirs: dict, root: Path) -> dict:
    """irm.diff.explain over the tuned-specific latents of every layer, or why it was not run."""
    from irm.activations import cache_layer_dir
    from irm.diff.data import PairedCache
    from irm.diff.explain import LayerLatents, explain_latents, load_crosscoder
    from irm.explain.backends import make_backend
    from irm.explain.features import unembedding
    from irm.reward import reward_description
    from irm.stages import artifact

    if not specific:
        return {"not_tested": "no tuned-specific latent to explain"}
    # the paired caches and crosscoders of the layers that have tuned-specific latents only
    layers = [LayerLatents(layer, PairedCache(base_dirs[layer], cache_layer_dir(cfg.run_dir, layer)),
                           load_crosscoder(root / f"layer-{layer:02d}" / "crosscoder.safetensors", cfg.diff, device),
                           cfg.diff.expansion, ix, latents[layer]["fired"], int(records[str(layer)]["held_out_rows"]))
              for layer, ix in specific.items()]
    backend = make_backend(cfg.explain, device=device, reward_cfg=cfg.reward)
    return explain_latents(cfg.explain, cfg.seed, layers, tokenizer, device, unembedding(cfg.run_dir, device),
                           backend, reward_description(cfg.reward), artifact(cfg.run_dir, "diff_explanations"))


def run(cfg) -> None:
    """Base cache, crosscoder and diff-SAE of every chosen layer; diff.json; the stage recorded."""
    from irm.activations import cache_layer_dir
    from irm.artifacts import write_json
    from irm.diff.enrichment import PERMUTATIONS, enrichment_test, lean_test, marked_words
    from irm.layers import chosen_layers
    from irm.loggers import stage_loggers
    from irm.models import load_model, n_layers
    from irm.runtime import start
    from irm.stages import artifact, mark_done

    begin = time.perf_counter()
    device = start(cfg.seed, cfg.device)
    model, tokenizer = load_model(cfg.model, cfg.seed, device=device)
    layers = chosen_layers(cfg, n_layers(model))
    root = artifact(cfg.run_dir, "diff")
    t0 = time.perf_counter()
    base_dirs = base_cache(cfg, model, tokenizer, layers, root / "base-cache")
    cache_seconds = time.perf_counter() - t0
    del model
    what, words = marked_words(cfg.reward)
    records = {}
    for layer in layers:
        name = f"layer-{layer:02d}"
        loggers = tuple(stage_loggers(cfg.log_dir, cfg.run_dir, f"diff/{name}/{part}", cfg.loggers) or False
                        for part in ("crosscoder", "diff-sae"))
        records[str(layer)] = train_layer(cfg.diff, base_dirs[layer], cache_layer_dir(cfg.run_dir, layer), cfg.seed,
                                          loggers, root / name, words=(tokenizer, words))
    latents = {int(layer): _latents(root / f"layer-{int(layer):02d}") for layer in records}
    specific = _specific(latents)
    share = {layer: np.array([np.nan if v is None else v for v in records[str(layer)]["word_share"]])
             for layer in latents}
    enrichment = enrichment_test([(share[layer], v["classes"]) for layer, v in latents.items()], PERMUTATIONS,
                                 cfg.seed)
    lean = lean_test([(v["delta"], share[layer]) for layer, v in latents.items()], PERMUTATIONS, cfg.seed)
    summary = {"layers": records, "marked_words": {"what": what, "n": len(words)}, "enrichment": enrichment,
               "lean": lean, "ablation": _ablation(cfg, device, latents, specific),
               "explanations": _explanations(cfg, device, tokenizer, latents, specific, records, base_dirs, root),
               "base_cache_seconds": cache_seconds,
               "seconds": time.perf_counter() - begin}
    write_json(artifact(cfg.run_dir, "diff_summary"), summary)
    for layer, r in records.items():
        print(f"diff: layer {layer}: {len(r['tuned_specific'])} tuned-specific of {r['latents']} latents, "
              f"{100 * r['fractions']['shared']:.0f}% shared, {100 * r['fractions']['tuned-only artifact']:.1f}% "
              f"tuned-only artifacts; explained variance base {r['quality']['base']['explained_variance']:.3f}, "
              f"tuned {r['quality']['tuned']['explained_variance']:.3f}", flush=True)
    if lean["rho"] is not None:
        print(f"diff: latents leaning toward the tuned model vs their share on the {what}: Spearman rho "
              f"{lean['rho']:+.3f} over {lean['latents']} latents (p {lean['p_greater']:.4f} one-sided)", flush=True)
    if enrichment["difference"] is not None:
        print(f"diff: share on the {what}: tuned-specific {enrichment['specific_share']:.3f}, shared "
              f"{enrichment['shared_share']:.3f} (p {enrichment['p_greater']:.4f} one-sided)", flush=True)
    explained = summary["explanations"]
    if "not_tested" not in explained:
        print(f"diff: {explained['explained']} tuned-specific latents explained by {explained['backend']}/"
              f"{explained['model']}, {explained['related']} labelled related to the reward "
              f"({explained['latents'] - explained['explained']} more with a page only, beyond explain.max_features); "
              f"{artifact(cfg.run_dir, 'diff_explanations')}", flush=True)
    mark_done(cfg, "diff", [artifact(cfg.run_dir, "diff_summary")]
              + [root / f"layer-{layer:02d}" / "crosscoder.safetensors" for layer in layers]
              + ([] if "not_tested" in explained else [artifact(cfg.run_dir, "diff_explanations")]))
