"""Training one layer's SAEs on its activation cache through a lightning.Trainer (paper 4.2, appendix D), resuming
its checkpoints and exporting the SAEs: the sae stage trains every chosen layer with it, the dictionaries stage the
second-seed SAEs of its same-features reference."""

from __future__ import annotations

import math
from pathlib import Path

from irm.artifacts import CHECKPOINTS
from irm.errors import UserError


def train_layer(cfg, layer: int, fingerprint: str) -> tuple[list[Path], bool]:
    """Fit (or resume) one layer's SAEs and export them; returns (exported directories, is rank zero)."""
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint
    from irm.activations import ActivationDataModule, cache_layer_dir
    from irm.loggers import stage_loggers
    from irm.runtime import resume_from, seed_all
    from irm.sae.export import layer_dir, sae_dir
    from irm.sae.callbacks import ExportSAEs
    from irm.sae.module import SAEModule

    s = cfg.sae
    root = layer_dir(cfg.run_dir, layer)
    checkpoints = root / CHECKPOINTS
    # Resume only checkpoints made from this config and this cache; anything else is stale and removed.
    last = resume_from(checkpoints, root / "train.json", fingerprint)
    seed_all(cfg.seed)  # each layer's initialisation is independent of which layers were trained before it
    data = ActivationDataModule(str(cache_layer_dir(cfg.run_dir, layer)), s, seed=cfg.seed)
    # The step count advances by batches_per_item per loader item: checkpoint on a multiple of it.
    every = math.ceil(s.checkpoint_every / s.batches_per_item) * s.batches_per_item
    module = SAEModule(s)
    # Lightning's default (every 50 loader items) leaves a short fit with a point or two of training curve; log
    # about 50 times per fit instead, never more often than every item nor less often than the default. Items per
    # epoch as ShardBatches counts them in one process (fewer per rank under DDP, so it then logs a little less).
    items = math.ceil(math.ceil(data.split / s.batch_size) / s.batches_per_item) * s.epochs
    log_every = max(1, min(50, items // 50))
    try:
        trainer = L.Trainer(
            max_epochs=s.epochs,
            default_root_dir=str(root),
            # sae.trainer's logger (names or class_path mappings) replaces the run's loggers for this stage
            logger=stage_loggers(cfg.log_dir, cfg.run_dir, f"sae/layer-{layer:02d}",
                                 s.trainer.get("logger", cfg.loggers)),
            callbacks=[ModelCheckpoint(dirpath=str(checkpoints), save_last=True, every_n_train_steps=every),
                       ExportSAEs(str(root))],
            **{"log_every_n_steps": log_every, **{k: v for k, v in s.trainer.items() if k != "logger"}},
        )
    except (TypeError, ValueError) as e:
        raise UserError(f"sae.trainer holds an argument lightning.Trainer rejects ({e}); fix sae.trainer") from e
    trainer.fit(module, datamodule=data, ckpt_path=str(last) if last is not None else None)
    return [sae_dir(cfg.run_dir, layer, e) for e in s.expansions], trainer.is_global_zero
