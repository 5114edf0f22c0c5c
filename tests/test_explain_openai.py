"""The openai backend against a real HTTP chat-completions server on loopback (tests/explain_server.py): retries on
429, timeouts and malformed bodies, a malformed answer recorded without stopping the run, a bounded number of
requests in flight, resuming without asking twice, and a planted API key that never reaches a file or stderr."""

import secrets
import shutil
import sys
from pathlib import Path

import pytest

from explain_rundir import build_run
from explain_server import GARBAGE, ChatServer
from irm.artifacts import read_jsonl
from irm.errors import UserError
from irm.explain.backends import BackendError, OfflineBackend, make_backend

KEY_ENV = "IRM_TEST_EXPLAIN_KEY"
HI = [{"role": "user", "content": "hi"}]


@pytest.fixture
def key(monkeypatch):
    value = "sk-planted-" + secrets.token_hex(12)
    monkeypatch.setenv(KEY_ENV, value)
    return value


@pytest.fixture
def server():
    with ChatServer(lambda messages: "an answer", stall_s=1.5) as s:
        yield s


def explain_cfg(server, **over):
    from irm.config import ExplainConfig

    opts = dict(backend="openai", model="test-model", base_url=server.url, api_key_env=KEY_ENV, timeout=0.5,
                max_retries=3, retry_backoff=0.01)
    opts.update(over)
    return ExplainConfig(**opts)


@pytest.mark.parametrize("fault", ["429", "500", "stall", "malformed"])
def test_a_transient_fault_is_retried_and_then_answered(server, key, fault):
    server.inject(fault)
    assert make_backend(explain_cfg(server)).chat(HI) == "an answer"
    assert [r["fault"] for r in server.log] == [fault, None]
    assert all(r["auth"] == f"Bearer {key}" for r in server.log)


def test_retries_give_up_with_a_message_that_hides_the_echoed_key(server, key):
    server.inject("500-echo-key", times=10)
    backend = make_backend(explain_cfg(server, max_retries=2))
    with pytest.raises(BackendError) as info:
        backend.chat(HI)
    assert len(server.log) == 3
    assert key not in str(info.value) and f"<${KEY_ENV}>" in str(info.value)
    assert key not in repr(backend)


def test_a_server_that_hangs_up_is_retried_and_then_named_in_the_message(server, key):
    server.inject("hangup")
    assert make_backend(explain_cfg(server)).chat(HI) == "an answer"  # one hang-up: the client asks again
    server.inject("hangup", times=10)
    with pytest.raises(BackendError) as info:
        make_backend(explain_cfg(server, max_retries=2)).chat(HI)
    assert [r["fault"] for r in server.log] == ["hangup", None] + ["hangup"] * 3
    assert "APIConnectionError after 3 attempts" in str(info.value)
    assert "disconnected without sending a response" in str(info.value)  # why, not just "Connection error."


def test_a_refused_key_stops_with_a_user_error(server, key):
    server.inject("401")
    with pytest.raises(UserError, match=KEY_ENV) as info:
        make_backend(explain_cfg(server)).chat(HI)
    assert key not in str(info.value) and len(server.log) == 1


# The stage over HTTP: the server answers as the offline backend would, so labels are known.

@pytest.fixture(scope="module")
def template(tmp_path_factory):
    root = tmp_path_factory.mktemp("template")
    build_run(root, n_docs=150)
    return root


@pytest.fixture
def offline_server():
    with ChatServer(OfflineBackend().chat, stall_s=1.5) as s:
        yield s


@pytest.fixture
def cfg(tiny_cfg, template, offline_server, key):
    shutil.copytree(template, tiny_cfg.run_dir)
    tiny_cfg.explain = explain_cfg(offline_server, concurrency=3, **{k: getattr(tiny_cfg.explain, k) for k in
                                                                      ("max_features", "window", "n_top",
                                                                       "n_quantile")})
    return tiny_cfg


def explained(lines: list[dict]) -> list[dict]:
    """The lines of features within explain.max_features (the others have a feature page only)."""
    from irm.stages.explain import NOT_EXPLAINED

    return [ln for ln in lines if ln["status"] != NOT_EXPLAINED]


def files_containing(root: Path, needle: str) -> list[str]:
    return [str(p) for p in root.rglob("*") if p.is_file() and needle.encode() in p.read_bytes()]


def test_stage_survives_faults_records_a_malformed_answer_and_never_writes_the_key(cfg, offline_server, key,
                                                                                    capsys):
    from irm.explain import prompts
    from irm.stages.explain import run

    s = offline_server
    s.inject("429")
    s.inject("stall")
    s.inject("malformed")
    s.inject("500-echo-key")
    s.inject("garbage", match=prompts.LABEL_QUESTION)  # one label answer that says neither 1 nor 0
    run(cfg)
    lines = explained(read_jsonl(Path(cfg.run_dir) / "explanations.jsonl"))
    assert len(lines) == 16
    # the garbage answer is recorded, and reused by every feature asking the same question (same explanation)
    unparsed = [ln for ln in lines if ln["label"] is None]
    assert unparsed and all(ln["label_answer"] == GARBAGE for ln in unparsed)
    assert {ln["explanation"] for ln in unparsed} == {unparsed[0]["explanation"]}
    assert len(unparsed) == sum(ln["explanation"] == unparsed[0]["explanation"] for ln in lines)
    assert all(ln["backend"] == "openai" and ln["model"] == "test-model" for ln in lines)
    assert {r["fault"] for r in s.log} >= {"429", "stall", "malformed", "500-echo-key", "garbage"}
    assert all(r["auth"] == f"Bearer {key}" for r in s.log)
    out = capsys.readouterr()
    assert key not in out.out and key not in out.err
    assert files_containing(Path(cfg.run_dir), key) == []


def test_concurrency_is_bounded_and_used(cfg, offline_server):
    from irm.stages.explain import run

    offline_server.delay = 0.1
    cfg.explain.concurrency = 2
    run(cfg)
    assert offline_server.max_in_flight == 2


def test_a_run_cut_short_resumes_without_asking_any_answered_question_again(cfg, offline_server, key, capsys):
    """The first run loses the server after a few answers (features fail after retries, the stage stops with a
    UserError); the rerun asks only what is missing. Counted at the server."""
    from irm.stages.explain import run

    s = offline_server
    answered = []

    def flaky(messages):
        answered.append(messages)
        if len(answered) >= 10:
            s.down = True  # from now on every request gets a 503
        return OfflineBackend().chat(messages)

    s.responder = flaky
    cfg.explain.max_retries = 1
    with pytest.raises(UserError, match="rerun") as info:
        run(cfg)
    assert key not in str(info.value)
    first = explained(read_jsonl(Path(cfg.run_dir) / "explanations.jsonl"))
    assert 0 < len(first) < 16
    failures = read_jsonl(Path(cfg.run_dir) / "explain" / "failures.jsonl")
    assert failures and all("503" in f["error"] for f in failures)

    s.down, s.responder = False, OfflineBackend().chat
    n_before = len(s.answered())
    run(cfg)
    asked = s.answered()
    assert len({repr(m) for m in asked}) == len(asked)  # no question was answered twice, across both runs
    assert len(asked) > n_before
    assert len(explained(read_jsonl(Path(cfg.run_dir) / "explanations.jsonl"))) == 16
    n_after = len(s.log)
    run(cfg)  # everything done: nothing is sent
    assert len(s.log) == n_after
    out = capsys.readouterr()
    assert key not in out.out + out.err and files_containing(Path(cfg.run_dir), key) == []


def finished_requests(lines, description) -> set[str]:
    """Every request a finished feature needed, rebuilt from its line."""
    from irm.explain import prompts

    out = set()
    for ln in lines:
        out.add(repr(prompts.explanation_messages(ln["records"])))
        out.add(repr(prompts.label_messages(description, ln["explanation"])))
        out.add(repr(prompts.detection_messages(ln["explanation"], ln["score"]["texts"])))
        out.add(repr(prompts.fuzz_messages(ln["explanation"], ln["fuzz"]["texts"])))
    return out


@pytest.mark.slow
def test_a_killed_run_resumes_without_re_requesting_finished_features(cfg, offline_server, key, tmp_path):
    """SIGKILL a `python -m irm explain` subprocess halfway; the rerun sends no request that a feature finished
    by the killed run needed (a request in flight at the kill may be asked again: its answer never arrived)."""
    import dataclasses
    import os
    import signal
    import subprocess
    import time

    import yaml

    from irm.stages.explain import run
    from irm.reward import reward_description

    s = offline_server
    s.delay = 0.2  # slow enough to kill the run between features
    cfg_path = tmp_path / "run.yaml"
    cfg_path.write_text(yaml.safe_dump(dataclasses.asdict(cfg)))
    proc = subprocess.Popen([sys.executable, "-m", "irm", "explain", "--config", str(cfg_path)],
                            stdout=subprocess.DEVNULL, stderr=open(tmp_path / "stderr.txt", "wb"),
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    path = Path(cfg.run_dir) / "explanations.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and len(explained(read_jsonl(path))) < 4 and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = explained(read_jsonl(path))
    assert 4 <= len(finished) < 16, "the run was not killed halfway"
    n_killed = len(s.log)
    s.delay = 0.0
    run(cfg)
    again = {repr(r["messages"]) for r in s.log[n_killed:]}
    assert again and not again & finished_requests(finished, reward_description(cfg.reward))
    assert len(explained(read_jsonl(path))) == 16
    assert files_containing(tmp_path, key) == []  # the killed run's stderr, the run dir, the config
