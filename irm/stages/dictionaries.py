"""Stage 5 (paper section 2, eq. 2; appendix E.1): how much two dictionaries of one layer agree (MMCS) and which
features they share.

Two definitions are computed and always labelled:
- `max` (the paper's eq. 2): for each row d of the small dictionary, the largest cosine similarity to any row of the
  large one, averaged over the small dictionary. Several small rows may pick the same large row.
- `hungarian` (what the authors' code computed): a one-to-one matching of small rows to large rows that maximises
  the summed cosine (`scipy.optimize.linear_sum_assignment`, equivalent to minimising 1 - cos), averaged.
Every row of the small dictionary contributes at most as much under `hungarian` as under `max`, so max >= hungarian.

Shared features are the top-k pairs of the `max` matching: the rows of D that "realise the highest contribution to
the MMCS" (the paper's D_g). A pair holds an index into *each* dictionary; the authors' code indexed the large
dictionary with the small one's index, which this module never does.

Zero-norm rows (a feature whose decoder row is exactly zero, e.g. a dead tied feature) have no direction: their
cosine with anything is defined as 0. They are counted and reported, not dropped, so |D| stays the dictionary size.

Chance (issue 22): two dictionaries that share nothing still agree by more than random unit vectors when their rows
are anisotropic or share a mean, as rows that follow the activations would (1/k spectrum in 512 dimensions: 0.43
against 0.14 isotropic; with a shared mean up to 0.99). The chance level (`chance_levels`) is MMCS between `draws`
pairs of random dictionaries of the same shapes whose rows are drawn from a Gaussian with the mean and covariance
of the two dictionaries' own unit rows (`dictionary_moments`): whatever mean and anisotropy the rows carry, from
the data or not, the random ones carry too. The findings verdict is a one-sided t of the real MMCS against their
spread (`irm.findings.chance_p`). Random rows with the cached activations' own mean and covariance (`cache_moments`) and
isotropic ones are kept as references. They are not the verdict's null because trained dictionaries' rows do not
follow the activations: on the tiny pipeline rows drawn like the activations score 0.89-0.99 (centred or not)
against MMCS 0.34-0.40 between the SAEs, whose rows' own moments give 0.36-0.40: a null built from the activations
is one no dictionary could beat.
"""

from __future__ import annotations

import logging
from pathlib import Path

from irm.errors import UserError
from irm.loggers import tensorboard_dir
from irm.sae.comparison import HUNGARIAN_DRAWS, Moments, activation_moments, chance_levels, compare_layer
from irm.sae.mmcs import METHODS, mmcs
from irm.stages import relpath

log = logging.getLogger(__name__)

CHANCE_ROWS = "every cached row except each text's first token (the attention sink, far off the other rows)"


def cache_moments(run_dir, layer: int, batch_rows: int = 16384) -> Moments:
    """The activations' mean and covariance at `layer` from the run's activation cache (the rows the SAEs were
    trained on; CHANCE_ROWS says which). A missing cache is a UserError naming the stage that writes it."""
    from irm.activations.store import ActivationCache, cache_layer_dir

    cache = ActivationCache(cache_layer_dir(run_dir, layer))  # UserError when the cache stage has not run
    return activation_moments(b["acts"][b["positions"] > 0]
                              for b in cache.iter_batches(batch_rows, keys=("acts", "positions")))


def _expansion_pair(cfg) -> tuple[int, int]:
    return cfg.sae.dictionary_pair()


def _load_sae(run_dir: Path, layer: int, expansion: int):
    from irm.sae import load_sae, sae_dir

    # load_sae raises a UserError naming a missing or damaged SAE and the stage that makes it.
    return load_sae(sae_dir(run_dir, layer, expansion))


def _firing(run_dir: Path, layer: int, expansion: int, n: int):
    """Boolean mask of the features that fire on the held-out cache rows (the sae stage's metrics.json); every
    feature when it was not measured (SAEs trained through `python -m irm fit`)."""
    import numpy as np

    from irm.sae import sae_dir
    from irm.sae.metrics import read_feature_frequency

    freq = read_feature_frequency(sae_dir(run_dir, layer, expansion))
    if freq is None or len(freq) != n:
        log.warning("layer %d x%d: no held-out firing frequencies (run `python -m irm sae`); every feature counts "
                    "as firing", layer, expansion)
        return np.ones(n, bool), False
    return np.asarray(freq) > 0, True


def _init_mmcs(run_dir: Path, layer: int, expansion: int):
    """MMCS of the layer's two SAEs as initialised, recorded by the fit in the exported cfg.json (None if absent)."""
    from irm.sae import sae_dir
    from irm.sae.export import read_cfg

    return read_cfg(sae_dir(run_dir, layer, expansion)).get("irm", {}).get("init_mmcs")


def _compare_layer_pair(cfg, root: Path, layer: int, small_e: int, large_e: int, device) -> dict:
    """One layer's record for mmcs.json: the two dictionaries compared, against chance and initialisation."""
    small_sae, large_sae = _load_sae(root, layer, small_e), _load_sae(root, layer, large_e)
    small, large = small_sae.dictionary.cpu(), large_sae.dictionary.cpu()
    if small.shape[1] != large.shape[1]:
        raise UserError(
            f"layer {layer}: the x{small_e} and x{large_e} SAEs have different input widths "
            f"({small.shape[1]} vs {large.shape[1]}); rerun `python -m irm sae` for this run_dir"
        )
    alive_small, measured_small = _firing(root, layer, small_e, small.shape[0])
    alive_large, measured_large = _firing(root, layer, large_e, large.shape[0])
    seed = cfg.seed * 1000 + layer  # this layer's: the interval's resamples and the chance draws
    rec = compare_layer(small, large, cfg.dictionaries.top_k, device=device, alive_small=alive_small,
                        alive_large=alive_large, seed=seed)
    rec["firing"]["measured"] = measured_small and measured_large
    rec["dictionaries"] = {"small": f"x{small_e}", "large": f"x{large_e}"}
    rec.update(chance_levels(small, large, cache_moments(root, layer), cfg.dictionaries.chance_draws,
                             seed=seed, device=device))
    rec["init"] = _init_mmcs(root, layer, large_e)
    rec["seed_pair"] = seed_pair_mmcs(cfg, root, layer, small_e, small, device) if cfg.dictionaries.seed_pair else None
    ch = rec["chance"]
    print(f"dictionaries layer {layer}: MMCS max {rec['max']:.3f} (random dictionaries with these rows' mean and "
          f"covariance {ch['max']['mean']:.3f} +- {ch['max']['std']:.4f}, with the activations' "
          f"{rec['chance_activations']['max']['mean']:.3f}, isotropic {rec['chance_isotropic']['max']['mean']:.3f}"
          + (f", SAEs at initialisation {rec['init']['max']:.3f}" if rec["init"] else "")
          + (f", x{small_e} of another seed {rec['seed_pair']['max']:.3f}" if rec["seed_pair"] else "")
          + f"), hungarian {rec['hungarian']:.3f} (random {ch['hungarian']['mean']:.3f} +- "
          f"{ch['hungarian']['std']:.3f}); firing features {rec['firing']['small']}/{small.shape[0]}, "
          f"{rec['firing']['large']}/{large.shape[0]}")
    if rec["zero_rows"]["small"] or rec["zero_rows"]["large"]:
        log.warning("layer %d: %d/%d zero rows in x%d/x%d (cosine 0 with anything)", layer,
                    rec["zero_rows"]["small"], rec["zero_rows"]["large"], small_e, large_e)
    return rec


SEED_PAIR_DIR = "dictionaries/seed-pair"  # the second small SAEs (dictionaries.seed_pair), a run directory of their own


def seed_pair_mmcs(cfg, root: Path, layer: int, small_e: int, small, device=None) -> dict:
    """MMCS of the layer's small dictionary with a second SAE of the same width trained on the same cache with
    another seed (cfg.seed + 1): what two dictionaries score when they learned the same features, the reference at
    the other end from chance. Trained as the sae stage trains (`irm.sae.train.train_layer`) in
    `<run_dir>/SEED_PAIR_DIR` (the layer's cache linked in, checkpoints resumed like the sae stage's): one more SAE
    fit per layer."""
    import dataclasses
    import os

    from irm.activations.store import cache_layer_dir
    from irm.artifacts import fingerprint
    from irm.sae.train import train_layer
    from irm.stages import stage_fingerprint

    twin_root = Path(root) / SEED_PAIR_DIR
    link = cache_layer_dir(twin_root, layer)
    if not link.exists():
        link.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(cache_layer_dir(root, layer).resolve(), link, target_is_directory=True)
    twin_cfg = dataclasses.replace(cfg, run_dir=str(twin_root), seed=cfg.seed + 1,
                                   sae=dataclasses.replace(cfg.sae, expansions=[small_e]))
    train_layer(twin_cfg, layer, fingerprint(stage_fingerprint(cfg, "sae"), "seed pair", twin_cfg.seed))
    twin = _load_sae(twin_root, layer, small_e).dictionary.cpu()
    return {"seed": twin_cfg.seed, **{m: mmcs(small, twin, m, device=device)[0] for m in METHODS}}


def _log_scores(cfg, layers, records: dict) -> None:
    """TensorBoard scalars per layer, under `<log_dir>/<run name>/dictionaries`."""
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir=str(tensorboard_dir(cfg.log_dir, cfg.run_dir, "dictionaries")))
    try:
        for layer in layers:
            rec = records[str(layer)]
            writer.add_scalar("mmcs/max", rec["max"], global_step=layer)
            writer.add_scalar("mmcs/hungarian", rec["hungarian"], global_step=layer)
            writer.add_scalar("mmcs/max_chance", rec["chance"]["max"]["mean"], global_step=layer)
            writer.add_scalar("max_cosine/median", rec["max_cosine"]["median"], global_step=layer)
    finally:
        writer.close()


def run(cfg) -> None:
    """Compare the small and large dictionary of every chosen layer; write `<run_dir>/mmcs.json` and log the
    scores to TensorBoard under `<log_dir>/<run name>/dictionaries`."""
    from irm.artifacts import RunDir, write_json
    from irm.layers import chosen_layers
    from irm.runtime import progress, start
    from irm.stages import mark_done

    device = start(cfg.seed, cfg.device)
    run_dir = RunDir(cfg.run_dir)
    layers = chosen_layers(cfg)
    small_e, large_e = _expansion_pair(cfg)

    records = {}
    for layer in progress(layers, desc="dictionaries", unit="layer"):
        records[str(layer)] = _compare_layer_pair(cfg, run_dir.root, layer, small_e, large_e, device)

    out = run_dir.path(relpath("mmcs"))
    write_json(out, {
        "definitions": {
            "max": "paper eq. 2: mean over the small dictionary of the max cosine to any large-dictionary row",
            "hungarian": "authors' code: mean cosine of a one-to-one matching maximising the summed cosine",
            "max_firing": "max over the features that fire on held-out tokens only (firing: how many do)",
            "pairs": "top-k pairs of the max matching among firing features (small index, large index, cosine): "
                     "the shared features; a feature that never fires is never one",
            "hungarian_pairs": "top-k pairs of the one-to-one matching whose features both fire, for comparison",
            "max_ci95": "95% bootstrap interval of max over the small dictionary's features",
            "max_se": "standard error of max over the small dictionary's features (sd of their max cosines / sqrt n)",
            "chance": "MMCS of two random dictionaries of the same shapes whose rows are drawn from a Gaussian with "
                      "the mean and covariance of the two dictionaries' own unit rows (random rows normalised): mean, "
                      "sample std and every one of `draws` seeded pairs (hungarian: the first "
                      f"{HUNGARIAN_DRAWS}). The findings verdict: a t of max against these draws, their spread and max_se added "
                      "in quadrature",
            "chance_source": "what the chance rows are drawn like (dictionary rows)",
            "chance_activations": f"reference: {HUNGARIAN_DRAWS} pairs whose rows are drawn with the cached "
                                  f"activations' mean and covariance ({CHANCE_ROWS}; chance_rows of them)",
            "chance_isotropic": f"reference: {HUNGARIAN_DRAWS} pairs with rows uniform on the unit sphere (the easiest "
                                "null)",
            "init": "MMCS of the layer's two SAEs as initialised, before training",
            "seed_pair": "MMCS of the small dictionary with a second one of its width trained with another seed on "
                         "the same cache (the reference for 'the same features'; dictionaries.seed_pair, else null)",
            "zero_rows": "rows with zero norm; their cosine with anything counts as 0",
        },
        "top_k": cfg.dictionaries.top_k,
        "layers": records,
    })

    _log_scores(cfg, layers, records)

    mark_done(cfg, "dictionaries", [out])
