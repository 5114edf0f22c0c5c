"""Secrets and untrusted files: a planted API key never reaches any file a whole run writes nor its output; pickled
checkpoints load only with weights_only=True (or come from safetensors); hub code runs only when the user asks."""

from __future__ import annotations

import ast
import os
import pickle
import secrets
import subprocess
import sys
from pathlib import Path

import pytest

from explain_server import ChatServer

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "tiny.yaml"
SOURCES = sorted((ROOT / "irm").rglob("*.py"))
KEY_ENV = "IRM_RELIABILITY_KEY"


def calls(path: Path):
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Call):
            yield node


def dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Attribute):
        return f"{dotted(node.value)}.{node.attr}"
    return node.id if isinstance(node, ast.Name) else "?"


def keyword(call: ast.Call, name: str):
    for kw in call.keywords:
        if kw.arg == name:
            return kw.value
    return None


def test_every_torch_load_is_weights_only():
    offenders = []
    for path in SOURCES:
        for call in calls(path):
            if dotted(call.func) == "torch.load":
                value = keyword(call, "weights_only")
                if not (isinstance(value, ast.Constant) and value.value is True):
                    offenders.append(f"{path.relative_to(ROOT)}:{call.lineno}")
    assert offenders == [], f"torch.load without weights_only=True: {offenders}"


def test_lightning_resumes_load_with_torch_s_safe_default():
    # trainer.fit(ckpt_path=...) passes weights_only=None through to torch.load: safe only while torch's default
    # refuses arbitrary pickles. This pins that default for the installed torch.
    import torch

    class Payload:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    blob = Path(os.environ.get("TMPDIR", "/tmp")) / f"irm-pickle-{os.getpid()}.pt"
    blob.write_bytes(pickle.dumps({"state_dict": Payload()}))
    try:
        with pytest.raises(pickle.UnpicklingError):
            torch.load(blob)
    finally:
        blob.unlink()
    for path in SOURCES:
        for call in calls(path):
            if dotted(call.func).endswith(".fit") and keyword(call, "ckpt_path") is not None:
                value = keyword(call, "weights_only")
                assert value is None or (isinstance(value, ast.Constant) and value.value is True), \
                    f"{path}:{call.lineno} resumes with weights_only other than True"


def test_trust_remote_code_is_off_unless_the_user_turns_it_on():
    from irm.config import ModelConfig

    assert ModelConfig().trust_remote_code is False
    for path in SOURCES:
        for call in calls(path):
            value = keyword(call, "trust_remote_code")
            assert not (isinstance(value, ast.Constant) and value.value is True), \
                f"{path.relative_to(ROOT)}:{call.lineno} hard-codes trust_remote_code=True"
    for cfg in (ROOT / "configs").glob("*.yaml"):
        assert "trust_remote_code: true" not in cfg.read_text().lower(), cfg


def files_containing(root: Path, needle: bytes) -> list[str]:
    return [str(p) for p in root.rglob("*") if p.is_file() and needle in p.read_bytes()]


@pytest.mark.slow
def test_a_whole_run_with_a_remote_explainer_never_writes_the_key(tmp_path):
    from irm.explain.backends import OfflineBackend

    key = "sk-planted-" + secrets.token_hex(12)
    run_dir, log_dir = tmp_path / "run", tmp_path / "tb"
    with ChatServer(OfflineBackend().chat, stall_s=1.0) as server:
        # The server's error body echoes the key once: the retry message must still hide it.
        server.inject("500-echo-key")
        out = subprocess.run(
            [sys.executable, "-m", "irm", "pipeline", "--config", str(TINY), "--run_dir", str(run_dir),
             "--log_dir", str(log_dir), "--explain.backend", "openai", "--explain.model", "test-model",
             "--explain.base_url", server.url, "--explain.api_key_env", KEY_ENV, "--explain.retry_backoff", "0.1"],
            capture_output=True, text=True, cwd=tmp_path, timeout=1200,
            env={**os.environ, KEY_ENV: key, "OMP_NUM_THREADS": "1"},
        )
        log = list(server.log)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    assert log and all(r["auth"] == f"Bearer {key}" for r in log)  # the key was really used
    assert any(r["fault"] == "500-echo-key" for r in log)
    assert key not in out.stdout and key not in out.stderr
    assert files_containing(tmp_path, key.encode()) == []  # run dir, TensorBoard logs, config dumps, report
    assert KEY_ENV in (run_dir / "config.yaml").read_text()  # the config names the variable, never its value
