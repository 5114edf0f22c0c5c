"""One run at a time on a run directory (issue 15.4): a second run is refused in one line naming the live holder;
a lock whose process died is taken over. Holders are real processes; the refused run is the real CLI."""

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import proc
import pytest

from irm.errors import UserError
from irm.rundir_lock import HOLDER_NAME, hold_run_dir

TINY = Path(__file__).parents[1] / "configs" / "tiny.yaml"

HOLDER = textwrap.dedent("""
    import sys, time
    from irm.rundir_lock import hold_run_dir
    with hold_run_dir(sys.argv[1], ["pipeline", "--config", "tiny.yaml"]):
        print("held", flush=True)
        time.sleep(120)
""")


def start_holder(run_dir: Path):
    p = proc.start([sys.executable, "-c", HOLDER, str(run_dir)], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "held"
    return p


def test_a_second_run_on_a_live_runs_directory_is_refused_in_one_line_naming_the_holder(tmp_path):
    run_dir = tmp_path / "run"
    holder = start_holder(run_dir)
    try:
        out = proc.run([sys.executable, "-m", "irm", "divergence", "--config", str(TINY), "--run_dir", str(run_dir)],
                       timeout=120, cwd=tmp_path)
        in_process = None
        try:
            with hold_run_dir(run_dir):
                pass
        except UserError as e:
            in_process = str(e)
    finally:
        proc.kill_tree(holder.pid)
        holder.communicate()
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert f"pid {holder.pid}" in lines[0] and socket.gethostname() in lines[0] and "started 20" in lines[0]
    assert "pipeline --config tiny.yaml" in lines[0]
    assert in_process is not None and f"pid {holder.pid}" in in_process
    # the refused run wrote nothing: no divergence output, and the holder's record is still the holder's
    assert not (run_dir / "divergence.json").exists() and not (run_dir / "config.yaml").exists()
    assert json.loads((run_dir / HOLDER_NAME).read_text())["pid"] == holder.pid


def test_a_lock_left_by_a_killed_run_is_taken_over(tmp_path, capfd):
    run_dir = tmp_path / "run"
    holder = start_holder(run_dir)
    os.kill(holder.pid, signal.SIGKILL)
    holder.communicate()
    assert json.loads((run_dir / HOLDER_NAME).read_text())["pid"] == holder.pid  # it died holding the lock
    with hold_run_dir(run_dir, ["report"]):
        assert json.loads((run_dir / HOLDER_NAME).read_text())["pid"] == os.getpid()
    err = capfd.readouterr().err
    assert f"taking over the lock left by pid {holder.pid}" in err
    assert not (run_dir / HOLDER_NAME).exists()  # released cleanly this time
    with hold_run_dir(run_dir):  # and free again
        pass


def test_the_lock_is_reentrant_in_one_process_and_released_after_an_error(tmp_path):
    run_dir = tmp_path / "run"
    with hold_run_dir(run_dir):
        with hold_run_dir(run_dir):  # the pipeline holding it while a stage's own code asks again
            pass
    with pytest.raises(RuntimeError):
        with hold_run_dir(run_dir):
            raise RuntimeError("stage failed")
    holder = start_holder(run_dir)  # another process can take it now
    proc.kill_tree(holder.pid)
    holder.communicate()
