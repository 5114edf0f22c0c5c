"""`python -m irm regression` (paper 4.3, E.2): fit the linear implicit reward model R (irm.regression's
IRMRegression on its DeltaDataModule) on the deltas stage's shards, with checkpoints that resume only when made from
the same deltas and settings, and export R for the lexicon, validation and report stages."""

from __future__ import annotations

from pathlib import Path

import lightning as L

from irm.artifacts import CHECKPOINTS, write_json
from irm.config import RunConfig
from irm.errors import UserError
from irm.readers import IRM_EXPORT
from irm.regression import DeltaDataModule, ExportRegression, IRMRegression
from irm.stages import relpath

REGRESSION_DIR = relpath("regression")
METRICS = "metrics.json"
FINGERPRINT = "fingerprint.json"  # the config a checkpoint belongs to: a stale one is never resumed


def build_trainer(cfg: RunConfig, extra_callbacks: tuple = ()) -> L.Trainer:
    """The Trainer of `python -m irm regression`: TensorBoard under <log_dir>/<run name>/regression, checkpoints
    (last.ckpt) in <run_dir>/regression/checkpoints, R exported at the end."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from irm.loggers import stage_loggers

    root = Path(cfg.run_dir)
    # regression.trainer's logger (names or class_path mappings) replaces the run's loggers for this stage
    logger = stage_loggers(cfg.log_dir, cfg.run_dir, REGRESSION_DIR, cfg.regression.trainer.get("logger", cfg.loggers))
    callbacks = [ModelCheckpoint(dirpath=str(root / REGRESSION_DIR / CHECKPOINTS), save_last=True),
                 ExportRegression(str(root / REGRESSION_DIR / IRM_EXPORT)), *extra_callbacks]
    kwargs = {"max_epochs": cfg.regression.epochs, "logger": logger, "callbacks": callbacks,
              "default_root_dir": str(root / REGRESSION_DIR), "log_every_n_steps": 10}
    kwargs.update({k: v for k, v in cfg.regression.trainer.items() if k != "logger"})
    try:
        return L.Trainer(**kwargs)
    except (TypeError, ValueError) as e:
        raise UserError(f"bad regression.trainer options ({e}); see lightning.Trainer's arguments") from None


def run(cfg: RunConfig) -> dict:
    from irm.runtime import resume_from, start
    from irm.stages import mark_done, stage_fingerprint

    rc = cfg.regression
    start(cfg.seed, cfg.device)  # seeds; Lightning's Trainer places the model (regression.trainer)
    root = Path(cfg.run_dir)
    out = root / REGRESSION_DIR
    fp = stage_fingerprint(cfg, "regression")
    dm = DeltaDataModule(str(root / relpath("deltas")), rc, cfg.seed)
    model = IRMRegression(rc, dm.n_features)

    # Checkpoints made from other deltas or settings are removed, never resumed.
    last = resume_from(out / CHECKPOINTS, out / FINGERPRINT, fp)
    if last is not None:
        print(f"regression: resuming from {last}")

    trainer = build_trainer(cfg)
    trainer.fit(model, datamodule=dm, ckpt_path=str(last) if last is not None else None)
    val = trainer.validate(model, datamodule=dm, verbose=False)[0]  # torchmetrics: over every rank's rows
    metrics = {**dm.counts(), "n_features": dm.n_features, "layers": dm.manifest["layers"],
               "epochs": trainer.current_epoch, "optimizer": rc.optimizer, "weight_decay": rc.weight_decay,
               "val_mse": val.get("val/mse"), "val_r2": val.get("val/r2")}
    if not trainer.is_global_zero:  # under DDP every rank runs this stage; one records it
        return metrics
    write_json(out / METRICS, metrics)
    mark_done(cfg, "regression", [f"{REGRESSION_DIR}/{IRM_EXPORT}", f"{REGRESSION_DIR}/{METRICS}"])
    print(f"regression: R fitted on {metrics['train_rows']} rows ({metrics['n_features']} features), held-out "
          f"{metrics['val_rows']} rows: MSE {metrics['val_mse']:.4g}, R^2 {metrics['val_r2']:.3f}")
    return metrics
