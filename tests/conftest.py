"""Shared fixtures: the tiny run config in a temporary run directory, run from a temporary working directory so
relative outputs (lightning_logs/, runs/) never land in the checkout."""

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY_YAML = ROOT / "configs" / "tiny.yaml"


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    """Run the test from `tmp_path` (Lightning writes lightning_logs/ to the working directory)."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def tiny_cfg(in_tmp):
    """`configs/tiny.yaml` as a RunConfig, parsed the way the CLI parses it, with run_dir in the temporary folder."""
    from irm.cli import parse_config

    return parse_config("pipeline", ["--config", str(TINY_YAML), "--run_dir", str(in_tmp / "run")])
