"""Where the training stages' metrics go: Lightning loggers, one per configured backend, for the SAE, regression and
PPO stages alike (PPO's per-step scalars are handed to the same logger objects by its monitor callback).

`loggers` (the run-level setting) lists backends by name; a stage's `trainer.logger` (sae.trainer, regression.trainer)
overrides it for that stage with names or Lightning's own `{class_path, init_args}` form. Every backend writes under
`log_dir`, one folder or run per run directory and stage, so runs never mix:
- tensorboard: `<log_dir>/<run name>/<stage>` (event files; `tensorboard --logdir <log_dir>`);
- csv: `<log_dir>/csv/<run name>/<stage>/metrics.csv`;
- mlflow: a local file store `<log_dir>/mlruns`, experiment = run name, MLflow run = stage
  (`mlflow ui --backend-store-uri <log_dir>/mlruns`); needs `pip install mlflow-skinny`;
- wandb: offline mode under `<log_dir>/wandb` (`wandb sync` uploads it later); needs `pip install wandb`.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from pathlib import Path
from typing import Any, Sequence, Union

from irm.errors import UserError

from irm.config import LOGGERS as BACKENDS  # the names config.check_all accepts
Spec = Union[str, dict, Sequence[Union[str, dict]], None]


def run_name(run_dir: str | os.PathLike) -> str:
    """The name a run's logs go under: its run directory's own name."""
    return Path(run_dir).resolve().name


def tensorboard_dir(log_dir: str | os.PathLike, run_dir: str | os.PathLike, stage: str) -> Path:
    """`<log_dir>/<run name>/<stage>`: where a stage's TensorBoard event files go (`stage` may hold a slash, e.g.
    `sae/layer-17`)."""
    return Path(log_dir) / run_name(run_dir) / stage


def stage_loggers(log_dir: str | os.PathLike, run_dir: str | os.PathLike, stage: str, spec: Spec) -> list:
    """The Lightning loggers of one stage (`stage`: its folder under the run's name, e.g. "sae/layer-03") from
    `spec`: a backend name, a `{class_path, init_args}` dict, or a list of them."""
    items = [spec] if isinstance(spec, (str, dict)) else list(spec or [])
    return [_make(item, Path(log_dir), run_name(run_dir), stage) for item in items]


def _make(item: str | dict, log_dir: Path, run: str, stage: str) -> Any:
    if isinstance(item, dict):
        path = item.get("class_path")
        if not isinstance(path, str) or "." not in path:
            raise UserError(f"a logger given as a mapping needs class_path (got {item!r}); e.g. "
                            "{class_path: lightning.pytorch.loggers.CSVLogger, init_args: {save_dir: logs}}")
        module, _, name = path.rpartition(".")
        try:
            cls = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError) as e:
            raise UserError(f"logger class {path} cannot be imported ({e}); install its package or fix class_path") \
                from None
        return cls(**(item.get("init_args") or {}))
    if item == "tensorboard":
        from lightning.pytorch.loggers import TensorBoardLogger

        return TensorBoardLogger(save_dir=str(log_dir), name=run, version=stage)
    if item == "csv":
        from lightning.pytorch.loggers import CSVLogger

        return CSVLogger(save_dir=str(log_dir / "csv"), name=run, version=stage)
    if item == "mlflow":
        _need("mlflow", "mlflow-skinny")
        from lightning.pytorch.loggers import MLFlowLogger

        # MLflow 3 keeps its plain-file store only on request; a local folder is what a laptop run wants.
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        return MLFlowLogger(experiment_name=run, run_name=stage, tracking_uri=mlflow_uri(log_dir))
    if item == "wandb":
        _need("wandb", "wandb")
        from lightning.pytorch.loggers import WandbLogger

        return WandbLogger(project=run, name=stage, save_dir=str(log_dir), offline=True)
    raise UserError(f"unknown logger {item!r}; use one of {', '.join(BACKENDS)} or a class_path mapping")


def mlflow_uri(log_dir: str | os.PathLike) -> str:
    """The tracking URI of the local MLflow store under `log_dir`."""
    return Path(log_dir).resolve().joinpath("mlruns").as_uri()


def _need(module: str, package: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise UserError(f"the {module} logger needs the {package} package; pip install {package} "
                        "(or drop it from loggers)")


def log_metrics(loggers: Sequence, metrics: dict[str, float], step: int) -> None:
    """Hand one step's scalars to every logger (PPO's monitor, outside a Lightning Trainer)."""
    for logger in loggers:
        logger.log_metrics(metrics, step)
        if hasattr(logger, "save"):
            logger.save()


def finish(loggers: Sequence, status: str = "success") -> None:
    for logger in loggers:
        logger.finalize(status)
