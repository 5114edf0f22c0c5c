"""Subprocesses in tests that never outlive them: each starts in a session of its own, and a timeout or a kill ends
the whole tree (torchrun starts every worker in yet another session, so the process group alone is not enough)."""

from __future__ import annotations

import os
import signal
import subprocess

import psutil


def start(cmd: list[str], **kwargs) -> subprocess.Popen:
    """`subprocess.Popen` in a new session (its own process group)."""
    return subprocess.Popen(cmd, start_new_session=True, **kwargs)


def kill_tree(pid: int) -> None:
    """SIGKILL a process, its process group and every descendant (workers first, then the launcher's group)."""
    try:
        root = psutil.Process(pid)
        descendants = root.children(recursive=True)
    except psutil.NoSuchProcess:
        descendants = []
    for p in descendants:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def communicate(proc: subprocess.Popen, timeout: float):
    """`proc.communicate(timeout=...)`, but a timeout kills the whole tree before re-raising (plain `communicate`
    leaves the process, and torchrun's workers, running)."""
    try:
        return proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc.pid)
        proc.communicate()
        raise


def run(cmd: list[str], timeout: float, **kwargs) -> subprocess.CompletedProcess:
    """`subprocess.run(cmd, capture_output=True, text=True, timeout=...)` that kills the whole tree on a timeout."""
    proc = start(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)
    out, err = communicate(proc, timeout)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)
