"""The command line: help lists every stage, config errors end in one line with exit code 2."""

import subprocess
import sys

import pytest

from irm.cli import LIGHTNING, STAGES
from irm.errors import UserError

RESERVED = ["rlhf", "evaluate-reward", "divergence", "cache", "dictionaries", "explain", "triples", "lexicon",
            "ablate", "report", "pipeline"]


def irm(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "irm", *args], capture_output=True, text=True, cwd=cwd, timeout=120)


def test_help_lists_every_subcommand():
    out = irm("--help")
    assert out.returncode == 0
    for name in [*LIGHTNING, *RESERVED]:
        assert f"  {name} " in out.stdout, name
    assert set(RESERVED) <= set(STAGES)


def test_help_does_not_import_torch():
    code = "import sys; from irm.cli import main; main(['--help']); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip().endswith("False")


@pytest.mark.parametrize("args, needle", [
    (["--rlhf.stepz", "3"], "stepz"),                       # misspelled key
    (["--rlhf.steps", "many"], "steps"),                    # wrong type
    (["--config", "no/such/file.yaml"], "no/such/file.yaml"),  # missing config file
    (["--explain.backend", "gpt5"], "backend"),             # value outside the allowed set
])
def test_config_errors_are_one_line_exit_2(args, needle, tmp_path):
    out = irm("rlhf", *args, cwd=tmp_path)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert needle in lines[0]
    assert "Traceback" not in out.stderr


def test_misspelled_key_in_yaml_is_refused(tmp_path):
    (tmp_path / "c.yaml").write_text("run_dir: r\nsae:\n  epocs: 3\n")
    out = irm("sae", "--config", "c.yaml", cwd=tmp_path)
    assert out.returncode == 2 and "epocs" in out.stderr and "Traceback" not in out.stderr


def test_print_config_round_trips(tmp_path):
    out = irm("cache", "--config", "configs/tiny.yaml".replace("configs", str(__import__("pathlib").Path(__file__)
                                                                               .parents[1] / "configs")),
              "--cache.max_length", "17", "--print_config", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    (tmp_path / "printed.yaml").write_text(out.stdout)
    from irm.cli import parse_config

    cfg = parse_config("cache", ["--config", str(tmp_path / "printed.yaml")])
    assert cfg.cache.max_length == 17
    assert cfg.model.name == "tiny-gpt-neox"


def test_unknown_command_exit_2():
    out = irm("frobnicate")
    assert out.returncode == 2 and "frobnicate" in out.stderr


def test_a_trainer_setting_lightning_refuses_is_one_line_exit_2(tmp_path):
    """FSDP on a CPU: Lightning's accelerator check refuses it; irm says so in one line, not a traceback."""
    from test_sae import fit_config, irm_cli, planted_cache

    layer_dir = tmp_path / "cache" / "layer-00"
    planted_cache(layer_dir, d=8, k=6, n=200, shard_rows=100)
    config = fit_config(tmp_path, layer_dir, max_epochs=1)
    out = irm_cli("fit", "--config", str(config), "--trainer.strategy", "fsdp", cwd=tmp_path, check=False)
    assert out.returncode == 2, out.stderr
    last = out.stderr.strip().splitlines()[-1]
    assert "bad trainer setting" in last and "fsdp" in last and "GPU" in last
    assert "Traceback" not in out.stderr


def test_threads_knob_caps_torch_threads_and_refuses_nonsense():
    import torch

    from irm.cli import parse_config
    from irm.runtime import set_threads

    from pathlib import Path

    tiny = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
    cfg = parse_config("cache", ["--config", str(tiny), "--threads", "1", "--devices", "2"])
    assert (cfg.threads, cfg.devices) == (1, 2)
    before = torch.get_num_threads()
    try:
        # start from another count than the one asked for (test modules pin torch to one thread at import, so a
        # set_threads that did nothing would pass a check that only asks for 1)
        torch.set_num_threads(3)
        set_threads(cfg.threads)
        assert torch.get_num_threads() == 1
        set_threads(2)
        assert torch.get_num_threads() == 2
        set_threads(None)  # the default leaves torch alone
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    with pytest.raises(UserError, match="threads must be >= 1"):
        set_threads(0)
