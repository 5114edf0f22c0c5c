"""Any Lightning logger (issue 24.5): the sae, regression and rlhf stages log through the run's `loggers` or a stage's
`trainer.logger`; here the CSV and MLflow (local file store) loggers, their metrics read back with their own readers."""

import csv
from pathlib import Path

import pytest

from irm.errors import UserError


def csv_rows(path: Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


def mlflow_history(log_dir: Path, experiment: str, run_name: str, metric: str) -> list[tuple[int, float]]:
    mlflow = pytest.importorskip("mlflow")
    from irm.loggers import mlflow_uri

    client = mlflow.tracking.MlflowClient(tracking_uri=mlflow_uri(log_dir))
    exp = client.get_experiment_by_name(experiment)
    (run,) = [r for r in client.search_runs([exp.experiment_id]) if r.info.run_name == run_name]
    return [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, metric)]


def test_sae_trainer_logger_from_the_command_line_writes_csv_and_mlflow(tiny_cfg, monkeypatch):
    """`--sae.trainer '{"logger": ["csv", "mlflow"]}'` as a user types it: both backends get the SAE's training curve
    (the same steps, the same MSE values), TensorBoard none (the stage's setting replaces the run's)."""
    pytest.importorskip("mlflow")
    from test_activations import save_policy

    from irm.stages.cache import run as cache_run
    from irm.cli import parse_config
    from irm.stages.sae import run as sae_run

    cfg = parse_config("sae", ["--config", str(Path(__file__).parents[1] / "configs" / "tiny.yaml"),
                               "--run_dir", tiny_cfg.run_dir, "--log_dir", str(Path(tiny_cfg.run_dir).parent / "logs"),
                               "--sae.trainer", '{"logger": ["csv", "mlflow"]}'])
    cfg.cache.layers, cfg.cache.n_documents, cfg.sae.epochs = [1], 40, 1
    save_policy(cfg)
    cache_run(cfg)
    sae_run(cfg)
    log_dir, run = Path(cfg.log_dir), Path(cfg.run_dir).name
    rows = [r for r in csv_rows(log_dir / "csv" / run / "sae" / "layer-01" / "metrics.csv") if r.get("train/x1/mse")]
    assert len(rows) >= 2
    logged = mlflow_history(log_dir, run, "sae/layer-01", "train/x1/mse")
    assert [(int(r["step"]), pytest.approx(float(r["train/x1/mse"]), rel=1e-6)) for r in rows] == logged
    assert not list((log_dir / run / "sae" / "layer-01").glob("events.out.tfevents.*"))


def test_rlhf_scalars_reach_the_runs_other_loggers(tiny_cfg):
    """PPO's monitor hands each step's scalars to the run's csv logger beside TensorBoard and the JSON lines."""
    from transformers import TrainerControl, TrainerState

    from irm.artifacts import read_jsonl
    from irm.rlhf.monitor import ScalarLogger

    cfg = tiny_cfg
    cfg.log_dir, cfg.loggers = str(Path(cfg.run_dir).parent / "logs"), ["tensorboard", "csv"]
    tb = Path(cfg.log_dir) / Path(cfg.run_dir).name / "rlhf"
    monitor = ScalarLogger(tb, Path(cfg.run_dir) / "rlhf" / "metrics.jsonl", cfg)
    state, control = TrainerState(), TrainerControl()
    monitor.on_train_begin(None, state, control)
    for step, reward in ((1, 0.25), (2, 0.5)):
        state.global_step = step
        monitor.on_log(None, state, control, logs={"objective/scores": reward, "objective/kl": step / 10})
    monitor.on_train_end(None, state, control)
    rows = csv_rows(Path(cfg.log_dir) / "csv" / Path(cfg.run_dir).name / "rlhf" / "metrics.csv")
    assert [(int(r["step"]), float(r["rlhf/reward_mean"])) for r in rows] == [(1, 0.25), (2, 0.5)]
    assert [r["rlhf/kl"] for r in read_jsonl(Path(cfg.run_dir) / "rlhf" / "metrics.jsonl")] == [0.1, 0.2]
    assert list(tb.glob("events.out.tfevents.*"))


def test_unknown_logger_and_missing_class_are_one_line():
    from irm.config import check_all
    from irm.config import RunConfig
    from irm.loggers import stage_loggers

    cfg = RunConfig()
    cfg.loggers = ["tensorbord"]
    with pytest.raises(UserError, match="loggers=.*each must be one of"):
        check_all(cfg)
    with pytest.raises(UserError, match="cannot be imported"):
        stage_loggers("logs", "run", "sae", [{"class_path": "no.such.Logger"}])
    with pytest.raises(UserError, match="unknown logger"):
        stage_loggers("logs", "run", "sae", "tensorbord")


def test_a_stages_tensorboard_logger_writes_where_tensorboard_dir_says(tmp_path):
    """One place names a stage's TensorBoard folder (`<log_dir>/<run name>/<stage>`, the stage may hold a slash):
    the Lightning logger of the sae, regression and diff stages and the scalars of rlhf and dictionaries agree."""
    from irm.loggers import stage_loggers, tensorboard_dir

    run_dir, log_dir = tmp_path / "runs" / "myrun", tmp_path / "tb"
    (logger,) = stage_loggers(log_dir, run_dir, "sae/layer-17", ["tensorboard"])
    expected = log_dir / "myrun" / "sae" / "layer-17"
    assert Path(logger.log_dir) == tensorboard_dir(log_dir, run_dir, "sae/layer-17") == expected
