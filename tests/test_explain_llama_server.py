"""The `openai` explain backend against a real OpenAI-compatible server program: llama.cpp's
(`python -m llama_cpp.server`, from `llama-cpp-python[server]`, which .ci/run builds once and caches) serving the
embedded SmolLM2-135M-Instruct GGUF. Not our loopback fixture: the real server's JSON, its chat template, its errors."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import proc
import pytest

from explain_rundir import build_run

TINY = Path(__file__).parents[1] / "configs" / "tiny.yaml"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def llama_server(tmp_path_factory):
    pytest.importorskip("llama_cpp.server", reason="llama-cpp-python[server] is installed by .ci/run")
    from irm.errors import UserError
    from irm.models import embedded_gguf

    try:
        gguf = embedded_gguf()
    except UserError as e:
        pytest.skip(str(e))
    port = free_port()
    log = tmp_path_factory.mktemp("llama") / "server.log"
    server = proc.start([sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--host", "127.0.0.1",
                         "--port", str(port), "--chat_format", "chatml", "--n_ctx", "2048", "--n_threads", "2"],
                        stdout=open(log, "wb"), stderr=subprocess.STDOUT,
                        env={**os.environ, "PYTHONUNBUFFERED": "1"})  # its access log reaches the file at once
    url = f"http://127.0.0.1:{port}/v1"
    deadline = time.time() + 180
    while True:
        try:
            with urllib.request.urlopen(f"{url}/models", timeout=5) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        if server.poll() is not None or time.time() > deadline:
            proc.kill_tree(server.pid)
            pytest.fail(f"llama.cpp server did not start: {log.read_text()[-2000:]}")
        time.sleep(0.5)
    # Listing models never runs the model; one chat completion does. A server that dies on it (llama.cpp's AMX
    # matmul segfaults on multi-token prompts on some Xeons, ggml-org/llama.cpp#20824; .ci/run builds without it)
    # would otherwise show up in the test below as connection errors from irm.
    ask = urllib.request.Request(f"{url}/chat/completions", headers={"Content-Type": "application/json"},
                                 data=json.dumps({"model": "m", "max_tokens": 4,
                                                  "messages": [{"role": "user", "content": "Say hi."}]}).encode())
    try:
        with urllib.request.urlopen(ask, timeout=120) as r:
            assert json.loads(r.read())["choices"], "the server's chat completion has no choices"
    except OSError as e:
        time.sleep(1)
        code = server.poll()
        proc.kill_tree(server.pid)
        state = ("still running" if code is None else f"killed by {signal.Signals(-code).name}" if code < 0
                 else f"exited with {code}")
        pytest.fail(f"llama.cpp server could not answer one chat completion ({type(e).__name__}: {e}; server "
                    f"{state}): {log.read_text()[-1500:]}")
    yield {"url": url, "process": server, "log": log, "checked_at": log.stat().st_size}
    proc.kill_tree(server.pid)
    server.communicate()


@pytest.mark.slow
def test_explain_stage_through_a_real_llama_cpp_server(in_tmp, llama_server, monkeypatch):
    from irm.artifacts import read_jsonl
    from irm.cli import parse_config
    from irm.stages.explain import NOT_EXPLAINED, run

    monkeypatch.setenv("IRM_LLAMA_KEY", "no-key-needed")
    cfg = parse_config("explain", ["--config", str(TINY), "--run_dir", str(in_tmp / "run"), "--device", "cpu",
                                   "--explain.backend", "openai", "--explain.model", "smollm2-135m-gguf",
                                   "--explain.base_url", llama_server["url"], "--explain.api_key_env", "IRM_LLAMA_KEY",
                                   "--explain.max_features", "1", "--explain.max_new_tokens", "40",
                                   "--explain.concurrency", "1", "--explain.timeout", "120"])
    build_run(Path(cfg.run_dir), n_docs=150)
    path = Path(cfg.run_dir) / "mmcs.json"
    mmcs = json.loads(path.read_text())
    first = sorted(mmcs["layers"])[0]
    path.write_text(json.dumps({"layers": {first: mmcs["layers"][first]}}))
    run(cfg)
    lines = [ln for ln in read_jsonl(Path(cfg.run_dir) / "explanations.jsonl") if ln["status"] != NOT_EXPLAINED]
    assert len(lines) == 2 * cfg.explain.max_features
    for ln in lines:
        assert ln["backend"] == "openai" and ln["model"] == "smollm2-135m-gguf"
        assert ln["explanation_answer"].strip()  # the server's own reply, read through the openai client
        if ln["explanation"] is None:
            assert ln["label"] is None and ln["status"] != "ok"
        else:
            first_char = ln["label_answer"].strip().lstrip("*").strip()[:1]
            if first_char in ("0", "1"):
                assert ln["label"] == int(first_char), ln["label_answer"]
            for key in ("score", "fuzz"):  # both scores asked of the real server; a parsed one carries its interval
                s = ln[key]
                assert s is None or s["accuracy"] is None or isinstance(s["at_chance"], bool)
    with open(llama_server["log"], "rb") as f:  # irm's requests reached the real server (not the fixture's check)
        f.seek(llama_server["checked_at"])
        assert b"/v1/chat/completions" in f.read()
    answers = (Path(cfg.run_dir) / "explain" / "answers.jsonl").read_text()
    assert answers
    # with the server gone, the rerun needs nothing from it: every answer comes from the answer cache
    proc.kill_tree(llama_server["process"].pid)
    llama_server["process"].communicate()
    run(cfg)
    assert (Path(cfg.run_dir) / "explain" / "answers.jsonl").read_text() == answers
