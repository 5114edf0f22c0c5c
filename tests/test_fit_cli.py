"""`python -m irm fit` placed by --run_dir and --layer (irm.lightning_cli.run_paths): real fits of configs/sae.yaml
and configs/regression.yaml, run in this process, read and write where `python -m irm sae` and `python -m irm
regression` do; two layers fitted one after the other keep their own outputs; a path that contradicts the run or
layer said on the command line is refused in one line before anything is built."""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import pytest
import torch
from test_regression import linear_data, write_deltas
from test_sae import refused_in_process

from irm.activations import ShardWriter, cache_layer_dir
from irm.loggers import tensorboard_dir

ROOT = Path(__file__).resolve().parents[1]
SAE_YAML = str(ROOT / "configs" / "sae.yaml")
REGRESSION_YAML = str(ROOT / "configs" / "regression.yaml")
QUICK = ["--trainer.max_epochs", "1", "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false",
         "--trainer.enable_model_summary", "false", "--trainer.log_every_n_steps", "5"]
LOG_DIR = "lightning_logs"  # the fit configs' logger save_dir, and the run config's log_dir default
# Two layers told apart by what their caches hold: (width, rows).
CACHES = {1: (8, 640), 3: (12, 800)}


def write_cache(run_dir: Path, layer: int) -> None:
    width, rows = CACHES[layer]
    writer = ShardWriter(cache_layer_dir(run_dir, layer), width, shard_rows=300)
    row = torch.arange(rows)
    writer.add(torch.randn(rows, width, generator=torch.Generator().manual_seed(layer)).abs(),
               torch.zeros(rows, dtype=torch.int64), row // 20, row % 20)
    writer.close(model="planted", layer=layer, site="mlp_out", max_length=20)


def fit_in_process(*args: str) -> None:
    """`python -m irm <args>` in this process, as a user runs it, with sys.argv and the SIGTERM handler restored."""
    from irm.cli import main

    argv, sigterm = list(sys.argv), signal.getsignal(signal.SIGTERM)
    try:
        main(list(args))
    finally:
        sys.argv = argv
        signal.signal(signal.SIGTERM, sigterm)


def files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def two_layers(tmp_path_factory):
    """Layers 1 then 3 of one run fitted with nothing but --run_dir and --layer; returns (the working directory, the
    run directory, every file of layer 1's SAE folder and log folder right after its own fit)."""
    work = tmp_path_factory.mktemp("fit")
    run_dir = work / "runs" / "demo"
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(work)
        torch.set_num_threads(1)  # the machine's cores are shared; tiny tensors gain nothing from threads
        for layer in CACHES:
            write_cache(run_dir, layer)
        fit_in_process("fit", "--config", SAE_YAML, "--run_dir", "runs/demo", "--layer", "1", *QUICK)
        first = {"sae": files(run_dir / "sae" / "layer-01"),
                 "logs": files(tensorboard_dir(work / LOG_DIR, run_dir, "sae/layer-01"))}
        fit_in_process("fit", "--config", SAE_YAML, "--run_dir", "runs/demo", "--layer", "3", *QUICK)
    return work, run_dir, first


@pytest.mark.parametrize("layer", sorted(CACHES))
def test_each_layer_reads_its_own_cache_and_exports_x1_x2_into_its_folder(two_layers, layer):
    import json

    _, run_dir, _ = two_layers
    width, rows = CACHES[layer]
    for expansion in (1, 2):  # configs/sae.yaml: expansions [1, 2]
        folder = run_dir / "sae" / f"layer-{layer:02d}" / f"x{expansion}"
        assert (folder / "sae_weights.safetensors").is_file()
        cfg = json.loads((folder / "cfg.json").read_text())
        assert (cfg["d_in"], cfg["d_sae"], cfg["hook_layer"]) == (width, expansion * width, layer)
        assert cfg["irm"]["cache_rows"] == rows


@pytest.mark.parametrize("layer", sorted(CACHES))
def test_checkpoints_land_in_the_layers_checkpoints_folder_of_the_run(two_layers, layer):
    _, run_dir, _ = two_layers
    checkpoints = run_dir / "sae" / f"layer-{layer:02d}" / "checkpoints"
    last = torch.load(checkpoints / "last.ckpt", weights_only=False)
    assert last["state_dict"]["saes.x1.b_dec"].shape == (CACHES[layer][0],)


@pytest.mark.parametrize("layer", sorted(CACHES))
def test_tensorboard_events_go_where_the_sae_stage_logs_the_layer(two_layers, layer):
    work, run_dir, _ = two_layers
    logs = tensorboard_dir(work / LOG_DIR, run_dir, f"sae/layer-{layer:02d}")  # irm.loggers: the stage's folder
    assert list(logs.glob("events.out.tfevents.*"))
    assert sorted(p.name for p in (work / LOG_DIR).iterdir()) == ["demo"]  # the run's name, nothing else


def test_fitting_a_second_layer_leaves_the_first_layers_outputs_alone(two_layers):
    work, run_dir, first = two_layers
    assert first["sae"] and first["logs"]  # layer 1 wrote both before layer 3 began
    assert files(run_dir / "sae" / "layer-01") == first["sae"]
    assert files(tensorboard_dir(work / LOG_DIR, run_dir, "sae/layer-01")) == first["logs"]
    assert sorted(p.name for p in (run_dir / "sae").iterdir()) == ["layer-01", "layer-03"]


def test_the_saved_config_with_the_same_run_and_layer_validates_the_last_checkpoint(two_layers, monkeypatch):
    """The config.yaml a fit leaves beside its logs spells every path it was given; said again with the same run and
    layer, they agree and are accepted (only a contradiction is refused)."""
    work, run_dir, _ = two_layers
    monkeypatch.chdir(work)
    saved = tensorboard_dir(work / LOG_DIR, run_dir, "sae/layer-03") / "config.yaml"
    assert "layer_dir: runs/demo/cache/layer-03" in saved.read_text()
    fit_in_process("validate", "--config", str(saved), "--run_dir", "runs/demo", "--layer", "3", "--ckpt_path",
                   "last")


def test_regression_fit_with_only_the_run_dir_goes_where_the_regression_stage_does(in_tmp):
    from irm.readers import load_irm

    run_dir = in_tmp / "runs" / "other"
    x, y, triple = linear_data(n=200, f=16)
    write_deltas(run_dir / "deltas", x, y, triple)
    # configs/regression.yaml names runs/tiny; said on the command line, runs/other wins.
    fit_in_process("fit", "--config", REGRESSION_YAML, "--run_dir", "runs/other", *QUICK)
    last = torch.load(run_dir / "regression" / "checkpoints" / "last.ckpt", weights_only=False)
    weight, _, layers = load_irm(run_dir)  # <run_dir>/regression/regression.safetensors
    torch.testing.assert_close(weight, last["state_dict"]["linear.weight"].reshape(-1))
    assert layers == [1, 2]
    assert list(tensorboard_dir(in_tmp / LOG_DIR, run_dir, "regression").glob("events.out.tfevents.*"))
    assert not (in_tmp / "runs" / "tiny").exists()


@pytest.mark.parametrize("args,message", [
    (["--config", SAE_YAML, "--run_dir", "runs/demo", "--layer", "3", "--data.init_args.layer_dir",
      "runs/demo/cache/layer-01"],
     "data.init_args.layer_dir=runs/demo/cache/layer-01 contradicts --run_dir runs/demo --layer 3, which puts it "
     "at runs/demo/cache/layer-03; drop one of the two"),
    # The override the issue names: jsonargparse gives it to the last callback in the list, here ExportSAEs.
    (["--config", SAE_YAML, "--run_dir", "runs/demo", "--layer", "3", "--trainer.callbacks.init_args.dirpath",
      "elsewhere"],
     "trainer.callbacks[1] (irm.sae.ExportSAEs).init_args.dirpath=elsewhere contradicts --run_dir runs/demo "
     "--layer 3, which puts it at runs/demo/sae/layer-03"),
    (["--config", SAE_YAML, "--run_dir", "runs/demo"], "data.init_args.layer_dir is unset and --run_dir runs/demo "
     "cannot name it: give --layer"),
    (["--config", REGRESSION_YAML, "--run_dir", "runs/demo", "--layer", "3"],
     "--layer does not apply to DeltaDataModule"),
])
def test_a_run_or_layer_that_cannot_place_the_fit_is_refused_in_one_line(in_tmp, monkeypatch, capsys, args,
                                                                          message):
    last = refused_in_process(monkeypatch, capsys, "fit", *args)
    assert last.startswith("irm fit: error: ") and message in last, last
    assert not (in_tmp / "runs").exists() and not (in_tmp / LOG_DIR).exists()
