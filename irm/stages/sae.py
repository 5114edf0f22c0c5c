"""`python -m irm sae` (paper 4.2, appendix D): train the SAE pair (sae.expansions x the width) of every chosen layer
on its activation cache through a lightning.Trainer, with the same classes `python -m irm fit --config
configs/sae.yaml` uses. Checkpoints go to `<run_dir>/sae/layer-NN/checkpoints` (an interrupted run resumes from
last.ckpt), metrics to the run's loggers (TensorBoard: `<log_dir>/<run name>/sae/layer-NN`), exported SAEs to `<run_dir>/sae/layer-NN/x<e>`."""

from __future__ import annotations

from irm.sae.train import train_layer


def evaluate(cfg, layers: list[int]) -> dict:
    """Held-out quality of every exported SAE (irm.sae.metrics): `<run_dir>/sae/layer-NN/x<e>/metrics.json` (with
    each feature's firing frequency) and `<run_dir>/sae/metrics.json` (every layer and dictionary, what the report
    and summary.json read). CE loss recovered is measured on `sae.ce_documents` held-out documents of the corpus
    (split corpus.eval_split) through the tuned model; 0 skips it."""
    from irm.activations import ActivationCache, cache_layer_dir
    from irm.activations.datamodule import validation_start
    from irm.artifacts import write_json
    from irm.runtime import start
    from irm.sae.export import load_sae, sae_dir, write_sparsity
    from irm.sae.metrics import METRICS_FILE, ce_loss_recovered, heldout_metrics, summary_row
    from irm.stages import artifact

    s = cfg.sae
    device = start(cfg.seed, cfg.device)
    model = tokenizer = texts = None
    if s.ce_documents > 0:
        from irm.data import load_texts
        from irm.models import load_tuned

        model, tokenizer = load_tuned(cfg, device=device)
        model.eval()
        texts = load_texts(cfg.corpus, cfg.corpus.eval_split, cfg.seed, n=s.ce_documents)
    records, clean = {}, None
    for layer in layers:
        cache = ActivationCache(cache_layer_dir(cfg.run_dir, layer))
        start = validation_start(cache, s.val_fraction)
        saes = {f"x{e}": load_sae(sae_dir(cfg.run_dir, layer, e), d_in=cache.width, device=device)
                for e in s.expansions}
        ce = (ce_loss_recovered(model, tokenizer, texts, layer, saes, site=cache.manifest.get("site", cfg.cache.site),
                                max_length=cfg.cache.max_length, clean=clean) if model is not None else None)
        clean = (ce["clean_sum"], ce["tokens"]) if ce is not None else None
        rec = {}
        for name, sae in saes.items():
            m = heldout_metrics(sae, cache, start)
            # A feature silent on the held-out tokens may still fire on training tokens (rare rather than dead):
            # the fraction silent on every cached token tells the two apart.
            train_freq = heldout_metrics(sae, cache, 0, start).get("feature_frequency") if start > 0 else None
            fired_any = [a > 0 or (train_freq is not None and b > 0)
                         for a, b in zip(m["feature_frequency"], train_freq or m["feature_frequency"])]
            m.update(width=sae.d_hidden, activation=sae.activation, k=sae.k, input_scale=float(sae.input_scale),
                     dead_fraction_all_tokens=1.0 - sum(fired_any) / max(1, len(fired_any)))
            if ce is not None:
                m.update(ce_clean=ce["clean"], ce_zero_ablated=ce["zero_ablated"], ce_spliced=ce[name]["spliced"],
                         ce_loss_recovered=ce[name]["recovered"], ce_tokens=ce["tokens"])
            write_json(sae_dir(cfg.run_dir, layer, int(name[1:])) / METRICS_FILE, m)
            write_sparsity(sae_dir(cfg.run_dir, layer, int(name[1:])), m["feature_frequency"])
            rec[name] = summary_row(m)
        records[str(layer)] = rec
    summary = {
        "definitions": {
            "l0": "mean active features per held-out token; l0_fraction: l0 / width",
            "explained_variance": "1 - Var(x - x_hat) / Var(x) on held-out tokens, variances summed over dimensions",
            "dead_fraction": "features that fire on no held-out token",
            "dead_fraction_all_tokens": "features that fire on no cached token, training tokens included",
            "ce_loss_recovered": "(L_zero - L_sae) / (L_zero - L_clean): tuned model's next-token loss with the "
                                 "layer output zeroed, replaced by the SAE's reconstruction, untouched",
        },
        "heldout": {"cache_val_fraction": s.val_fraction, "ce_documents": s.ce_documents,
                    "ce_split": cfg.corpus.eval_split},
        "settings": {k: getattr(s, k) for k in ("activation", "k", "l1_coefficient", "tied", "center_input",
                                                "normalize", "revive", "learning_rate", "batch_size", "epochs")},
        "layers": records,
    }
    write_json(artifact(cfg.run_dir, "sae_metrics"), summary)
    return summary


def run(cfg) -> None:
    """Train every chosen layer's SAEs, measure them (`evaluate`), then record the stage with the exported SAEs as
    its outputs and print one line per SAE."""
    from irm.layers import chosen_layers
    from irm.stages import artifact, mark_done, stage_fingerprint

    layers = chosen_layers(cfg)
    fingerprint = stage_fingerprint(cfg, "sae")
    outputs, is_zero = [], True
    for layer in layers:
        exported, is_zero = train_layer(cfg, layer, fingerprint)
        outputs += exported
    # Under DDP every rank runs this stage; one of them measures and records it.
    if is_zero:
        summary = evaluate(cfg, layers)
        for layer, rec in summary["layers"].items():
            for name, m in rec.items():
                ce = m.get("ce_loss_recovered")
                print(f"sae layer {layer} {name}: L0 {m['l0']:.1f} of {m['width']} ({100 * m['l0_fraction']:.1f}%), "
                      f"explained variance {m['explained_variance']:.3f} "
                      f"({m['explained_variance_after_first']:.3f} without first tokens), "
                      f"dead {100 * m['dead_fraction']:.1f}% ({100 * m['dead_fraction_all_tokens']:.1f}% on "
                      "every cached token), "
                      f"CE loss recovered {'n/a' if ce is None else f'{ce:.3f}'}")
        mark_done(cfg, "sae", outputs + [artifact(cfg.run_dir, "sae_metrics")])
