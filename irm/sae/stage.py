"""`python -m irm sae` (paper 4.2, appendix D): train the SAE pair (sae.expansions x the width) of every chosen layer
on its activation cache through a lightning.Trainer, with the same classes `python -m irm fit --config
configs/sae.yaml` uses. Checkpoints go to `<run_dir>/sae/layer-NN/checkpoints` (an interrupted run resumes from
last.ckpt), TensorBoard logs to `<log_dir>/<run name>/sae/layer-NN`, exported SAEs to `<run_dir>/sae/layer-NN/x<e>`."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

from irm.errors import UserError

# Trainer arguments the stage sets from the config itself.
OWN_TRAINER_ARGS = ("max_epochs", "logger", "callbacks", "default_root_dir")


def train_layer(cfg, layer: int, fingerprint: str) -> tuple[list[Path], bool]:
    """Fit (or resume) one layer's SAEs and export them; returns (exported directories, is rank zero)."""
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import TensorBoardLogger

    from irm.activations import ActivationDataModule, cache_layer_dir
    from irm.artifacts import read_json, write_json
    from irm.runtime import seed_all
    from irm.sae.export import layer_dir, sae_dir
    from irm.sae.module import ExportSAEs, SAEModule

    s = cfg.sae
    root = layer_dir(cfg.run_dir, layer)
    checkpoints, stamp = root / "checkpoints", root / "train.json"
    last = checkpoints / "last.ckpt"
    # Resume only checkpoints made from this config and this cache; anything else is stale and removed.
    resume = last.is_file() and stamp.is_file() and read_json(stamp).get("fingerprint") == fingerprint
    if not resume:
        shutil.rmtree(checkpoints, ignore_errors=True)
        write_json(stamp, {"fingerprint": fingerprint})
    seed_all(cfg.seed)  # each layer's initialisation is independent of which layers were trained before it
    data = ActivationDataModule(str(cache_layer_dir(cfg.run_dir, layer)), batch_size=s.batch_size,
                                val_fraction=s.val_fraction, seed=cfg.seed, batches_per_item=s.batches_per_item)
    # The step count advances by batches_per_item per loader item: checkpoint on a multiple of it.
    every = math.ceil(s.checkpoint_every / s.batches_per_item) * s.batches_per_item
    module = SAEModule(expansions=s.expansions, l1_coefficient=s.l1_coefficient, learning_rate=s.learning_rate,
                       tied=s.tied, dead_window=s.dead_window)
    # Lightning's default (every 50 loader items) leaves a short fit with a point or two of training curve; log
    # about 50 times per fit instead, never more often than every item nor less often than the default. Items per
    # epoch as ShardBatches counts them in one process (fewer per rank under DDP, so it then logs a little less).
    items = math.ceil(math.ceil(data.split / s.batch_size) / s.batches_per_item) * s.epochs
    log_every = max(1, min(50, items // 50))
    clash = sorted(set(s.trainer) & set(OWN_TRAINER_ARGS))
    if clash:
        raise UserError(f"sae.trainer sets {clash}, which the sae stage sets itself; use sae.epochs for the epochs "
                        "and remove the others")
    try:
        trainer = L.Trainer(
            max_epochs=s.epochs,
            default_root_dir=str(root),
            logger=TensorBoardLogger(save_dir=cfg.log_dir, name=Path(cfg.run_dir).name,
                                     version=f"sae/layer-{layer:02d}"),
            callbacks=[ModelCheckpoint(dirpath=str(checkpoints), save_last=True, every_n_train_steps=every),
                       ExportSAEs(str(root))],
            **{"log_every_n_steps": log_every, **s.trainer},
        )
    except (TypeError, ValueError) as e:
        raise UserError(f"sae.trainer holds an argument lightning.Trainer rejects ({e}); fix sae.trainer") from e
    trainer.fit(module, datamodule=data, ckpt_path=str(last) if resume else None)
    return [sae_dir(cfg.run_dir, layer, e) for e in s.expansions], trainer.is_global_zero


def run(cfg) -> None:
    """Train every chosen layer's SAEs, then record the stage with the exported SAEs as its outputs."""
    from irm.divergence import chosen_layers
    from irm.stages import mark_done, stage_fingerprint

    if cfg.sae.epochs < 1 or cfg.sae.checkpoint_every < 1:
        raise UserError("sae.epochs and sae.checkpoint_every must be >= 1")
    layers = chosen_layers(cfg)
    fingerprint = stage_fingerprint(cfg, "sae")
    outputs, is_zero = [], True
    for layer in layers:
        exported, is_zero = train_layer(cfg, layer, fingerprint)
        outputs += exported
    # Under DDP every rank runs this stage; one of them records it.
    if is_zero:
        mark_done(cfg, "sae", outputs)
