"""One run at a time per run directory.

Two `python -m irm` processes on one run_dir would both write every artifact and stamp (measured: two pipelines
started together both ran all 14 stages side by side). The CLI holds an OS file lock (`filelock`, flock on POSIX) on
`<run_dir>/.irm.lock` while a stage or the pipeline runs; a second run is refused in one line naming the holder (pid,
host, start time, command) read from `.irm.lock.json`. The kernel drops the lock when its process dies however it
dies, so a lock left by a killed run is simply taken over (and said so). Inside one process the lock is re-entrant;
torchrun's and Lightning's extra ranks (RANK / LOCAL_RANK > 0) run under the lock of rank 0 and take none.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import socket
import sys
from pathlib import Path
from typing import Iterator

from irm.errors import UserError

LOCK_NAME = ".irm.lock"
HOLDER_NAME = ".irm.lock.json"

_held: set[str] = set()


def _secondary_rank() -> bool:
    return any(int(os.environ.get(k, "0") or 0) > 0 for k in ("RANK", "LOCAL_RANK"))


def _read_holder(root: Path) -> dict:
    try:
        return json.loads((root / HOLDER_NAME).read_text())
    except (OSError, ValueError):
        return {}


def describe(holder: dict) -> str:
    if not holder:
        return "a process that left no details"
    cmd = " ".join(holder.get("command", []))[:120]
    return (f"pid {holder.get('pid')} on host {holder.get('host')}, started {holder.get('started')}"
            + (f" ({cmd})" if cmd else ""))


@contextlib.contextmanager
def hold_run_dir(run_dir: str | os.PathLike, command: list[str] | None = None) -> Iterator[None]:
    """Hold the run directory's lock for the `with` body; UserError if a live process holds it. `command` (the irm
    arguments) is recorded for the message a refused run prints."""
    from filelock import FileLock, Timeout

    root = Path(run_dir)
    if _secondary_rank():
        yield
        return
    root.mkdir(parents=True, exist_ok=True)
    key = str(root.resolve())
    if key in _held:  # a stage run from the pipeline in the same process
        yield
        return
    lock = FileLock(str(root / LOCK_NAME), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise UserError(f"run_dir {root} is in use by another irm run: {describe(_read_holder(root))}; wait for it "
                        "to finish, stop it, or choose another run_dir") from None
    try:
        left = _read_holder(root)
        if left:  # its process died without releasing: the kernel already dropped its lock
            print(f"irm: run_dir {root}: taking over the lock left by {describe(left)}, which is no longer running",
                  file=sys.stderr)
        me = {"pid": os.getpid(), "host": socket.gethostname(),
              "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "command": ["python", "-m", "irm", *(sys.argv[1:] if command is None else command)]}
        (root / HOLDER_NAME).write_text(json.dumps(me))
        _held.add(key)
        yield
    finally:
        _held.discard(key)
        with contextlib.suppress(OSError):
            (root / HOLDER_NAME).unlink()
        lock.release()
