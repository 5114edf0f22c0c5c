"""Artifacts of a run: atomic files (temp + fsync + rename), checksums, and the run manifest that records which
stage finished, from which config and inputs, with which outputs, so a rerun skips finished work."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator, Optional

from irm.errors import UserError

MANIFEST = "manifest.json"
# The folder of a trained stage's resumable checkpoints inside its own folder (rlhf, sae/layer-NN, regression), where
# the stages and `python -m irm fit --run_dir` both look.
CHECKPOINTS = "checkpoints"


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists, owned by someone else
    return True


def _clear_stale(path: Path) -> None:
    """Remove what a killed writer of `path` left beside it (`.tmp-<name>.<pid>.*`, whose pid is no longer
    running), and put back the previous version if it died between moving it aside and moving the new one in."""
    for p in path.parent.glob(f".old-{path.name}.*"):
        pid = p.name.rsplit(".", 1)[-1]
        if pid.isdigit() and not _alive(int(pid)):
            if not path.exists():
                os.replace(p, path)
            else:
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    for p in path.parent.glob(f".tmp-{path.name}.*"):
        pid = p.name[len(f".tmp-{path.name}."):].split(".", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


def unwritable(path, error: OSError) -> UserError:
    """The one-line error of a write the OS refused (disk full, permissions, ...)."""
    return UserError(f"could not write {path}: {error.strerror or error}; free disk space or choose another run_dir")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; when the block ends without error, fsync it and rename it onto `path`.
    A crash leaves only a `.tmp-*` file that no reader looks at and the next write of `path` removes. Disk-full and other OS errors become UserError."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _clear_stale(path)
    fd, tmp = tempfile.mkstemp(prefix=f".tmp-{path.name}.{os.getpid()}.", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except OSError as e:
        raise unwritable(path, e) from e
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory beside `path`; on success it replaces `path` (e.g. for `save_pretrained`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _clear_stale(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{path.name}.{os.getpid()}.", dir=path.parent))
    try:
        yield tmp
        for p in tmp.rglob("*"):
            if p.is_file():
                with open(p, "rb+") as f:
                    os.fsync(f.fileno())
        if path.exists():
            old = path.with_name(f".old-{path.name}.{os.getpid()}")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
        _fsync_dir(path.parent)
    except OSError as e:
        raise unwritable(path, e) from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def read_json(path: str | os.PathLike, missing: str = "", corrupt: str = "") -> Any:
    """The JSON file at `path`; a missing or unparseable one is a one-line UserError (`missing` / `corrupt`: the
    message to give instead of the generic one, with "{path}" and "{error}" replaced)."""
    path = Path(path)
    if not path.is_file():
        raise UserError((missing or "missing {path}: run the stage that writes it first").replace("{path}", str(path)))
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        text = corrupt or "{path} is not valid JSON ({error}); delete it and rerun its stage"
        raise UserError(text.replace("{path}", str(path)).replace("{error}", str(e))) from e


def append_jsonl(path: str | os.PathLike, record: dict) -> None:
    """Append one record and fsync: the line is on disk before the caller moves on. A torn last line (crash
    mid-write) is skipped by `read_jsonl`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps(record, default=_json_default) + "\n"
    try:
        if path.exists() and path.stat().st_size:
            with open(path, "rb") as f:
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    line = "\n" + line  # end a torn line from a crash so this record stays readable
        with open(path, "a", encoding="utf-8") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise unwritable(path, e) from e


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Records of a JSON-lines file; a torn (partial) last line from a crash is ignored."""
    path = Path(path)
    if not path.exists():
        return []
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.endswith("\n"):
                break  # torn write at the end: never read as data
            with contextlib.suppress(json.JSONDecodeError):
                out.append(json.loads(line))
    return out


def _json_default(o: Any) -> Any:
    if dataclasses.is_dataclass(o):
        return dataclasses.asdict(o)
    if hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


_DIGESTS: dict[tuple, str] = {}  # (path, size, mtime_ns, inode) -> sha256, for local_checksum's repeated questions


def _file_digest(path: Path) -> str:
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns, st.st_ino)
    if key not in _DIGESTS:
        _DIGESTS[key] = sha256_file(path)
    return _DIGESTS[key]


def dir_checksum(path: str | os.PathLike) -> str:
    """One hash of every file under `path` (relative names and contents)."""
    path = Path(path)
    return fingerprint([(str(f.relative_to(path)), _file_digest(f)) for f in sorted(path.rglob("*")) if f.is_file()])


def local_checksum(name: str | os.PathLike) -> Optional[str]:
    """The checksum of what a local `name` holds: a file's sha256, a directory's `dir_checksum`; None when `name` is
    neither (a hub id). Each file is read once per process while its size and modification time stay the same, so
    the stage graph may ask as often as it checks a stage."""
    path = Path(name).expanduser()
    if path.is_file():
        return _file_digest(path)
    return dir_checksum(path) if path.is_dir() else None


def fingerprint(*parts: Any) -> str:
    """A short stable hash of JSON-able parts (config sections, upstream fingerprints)."""
    blob = json.dumps(parts, sort_keys=True, default=_json_default)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


class RunDir:
    """The folder of one run and its manifest (`manifest.json`): for each completed stage, the fingerprint it was
    made from and the checksums of its outputs."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def path(self, *parts: str) -> Path:
        return self.root.joinpath(*parts)

    def manifest(self) -> dict:
        p = self.path(MANIFEST)
        return read_json(p) if p.exists() else {"stages": {}}

    def stage_record(self, stage: str) -> dict | None:
        return self.manifest()["stages"].get(stage)

    def is_complete(self, stage: str, fp: str) -> bool:
        """True when `stage` completed with fingerprint `fp` and every output still matches its checksum."""
        rec = self.stage_record(stage)
        if rec is None or rec.get("fingerprint") != fp:
            return False
        for rel, digest in rec.get("outputs", {}).items():
            p = self.path(rel)
            if not p.is_file() or sha256_file(p) != digest:
                return False
        return True

    def mark_complete(self, stage: str, fp: str, outputs: list[str | os.PathLike], **extra: Any) -> None:
        """Record `stage` as complete; `outputs` are files (or folders, all files inside) under the run dir."""
        files: dict[str, str] = {}
        for out in outputs:
            p = Path(out)
            p = p if p.is_absolute() else self.path(str(p))
            for f in sorted(p.rglob("*")) if p.is_dir() else [p]:
                if f.is_file() and not f.name.startswith(".tmp-"):
                    files[str(f.relative_to(self.root))] = sha256_file(f)
        m = self.manifest()
        m["stages"][stage] = {"fingerprint": fp, "completed_at": time.time(), "outputs": files, **extra}
        write_json(self.path(MANIFEST), m)

    def restore(self, stage: str, record: dict, order: list[str]) -> None:
        """Put back a completion record taken with `stage_record` (a forced rerun that failed), at its place in
        `order` (the stages' order in the manifest it was taken from), so the manifest reads as it did."""
        m = self.manifest()
        m["stages"][stage] = record
        rank = {name: i for i, name in enumerate(order)}
        m["stages"] = dict(sorted(m["stages"].items(), key=lambda kv: rank.get(kv[0], len(order))))
        write_json(self.path(MANIFEST), m)

    def invalidate(self, stage: str) -> None:
        m = self.manifest()
        if m["stages"].pop(stage, None) is not None:
            write_json(self.path(MANIFEST), m)
