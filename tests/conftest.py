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


# Time budget (issue 16): every test has a limit (pytest-timeout, `timeout` in pyproject.toml); slow ones a longer one.
SLOW_TIMEOUT_S = 1500


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.get_closest_marker("slow") and not item.get_closest_marker("timeout"):
            item.add_marker(pytest.mark.timeout(SLOW_TIMEOUT_S))


@pytest.fixture(autouse=True)
def _no_process_outlives_its_test():
    """After each test (passed, failed or timed out), SIGKILL every process it started that is still alive, with its
    descendants: a test stopped by its timeout mid-`communicate` would otherwise leave torchrun workers running."""
    import psutil

    me = psutil.Process()
    before = {p.pid for p in me.children(recursive=True)}
    yield
    from proc import kill_tree

    for p in me.children(recursive=False):
        try:
            helper = any(h in " ".join(p.cmdline()) for h in ("resource_tracker", "forkserver"))
        except psutil.Error:
            continue
        if p.pid not in before and not helper:  # multiprocessing's session-long helpers stay
            kill_tree(p.pid)
