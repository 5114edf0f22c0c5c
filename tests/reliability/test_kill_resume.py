"""Kill and resume: stages (and the whole pipeline) run in a subprocess on the tiny config are SIGKILLed (or sent
SIGTERM/SIGINT) when a unit of work appears in the run directory, then rerun. The rerun completes, every artifact
passes its manifest checksum, finished work is not redone (files of finished stages keep their inode and mtime,
answered explanations are not asked again), and the results equal those of an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from irm.artifacts import RunDir, read_jsonl

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "tiny.yaml"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def argv(stage: str, run_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "irm", stage, "--config", str(TINY), "--run_dir", str(run_dir),
            "--log_dir", str(run_dir.parent / "tb"), *extra]


def run(stage: str, run_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    out = subprocess.run(argv(stage, run_dir, *extra), capture_output=True, text=True, cwd=run_dir.parent, env=ENV,
                         timeout=1500)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    return out


def interrupt_when(stage: str, run_dir: Path, ready, *extra: str, sig=signal.SIGKILL, timeout=900.0):
    """Start the stage, wait until `ready()` holds, send `sig`; returns (returncode, stderr)."""
    log = run_dir.parent / f"{stage}-{time.monotonic_ns()}.err"
    with open(log, "w") as err:
        proc = subprocess.Popen(argv(stage, run_dir, *extra), stdout=subprocess.DEVNULL, stderr=err,
                                cwd=run_dir.parent, env=ENV)
        deadline = time.monotonic() + timeout
        try:
            while not ready():
                assert proc.poll() is None, f"{stage} ended before the kill point: {log.read_text()[-3000:]}"
                assert time.monotonic() < deadline, "kill point never reached"
                time.sleep(0.05)
            proc.send_signal(sig)
            rc = proc.wait(timeout=300)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return rc, log.read_text()


def finished_files(run_dir: Path) -> dict[str, tuple[int, int]]:
    """(inode, mtime_ns) of every output file of every stage the manifest records as complete."""
    out = {}
    for stage, rec in RunDir(run_dir).manifest()["stages"].items():
        for rel in rec["outputs"]:
            st = (run_dir / rel).stat()
            out[rel] = (st.st_ino, st.st_mtime_ns)
    return out


def assert_all_checksums_pass(run_dir: Path) -> None:
    from irm.activations import ActivationCache

    rd = RunDir(run_dir)
    for stage, rec in rd.manifest()["stages"].items():
        assert rd.is_complete(stage, rec["fingerprint"]), f"{stage} fails its manifest checksums"
    for manifest in (run_dir / "cache").glob("layer-*/manifest.json"):
        ActivationCache(manifest.parent).verify()
    assert not list(run_dir.rglob(".tmp-*")), f"temporary files left: {list(run_dir.rglob('.tmp-*'))}"


def test_what_a_killed_writer_left_is_cleared_by_the_next_write(tmp_path):
    from irm.artifacts import atomic_dir, write_json

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # its pid is no longer running
    target = tmp_path / "cache"
    (tmp_path / f".tmp-cache.{dead.pid}.abc").mkdir()  # a writer killed mid-way
    (tmp_path / f".tmp-cache.{dead.pid}.abc" / "shard-00000.safetensors").write_bytes(b"partial")
    (tmp_path / f".old-cache.{dead.pid}").mkdir()  # killed between moving the old version aside and the new in
    (tmp_path / f".old-cache.{dead.pid}" / "manifest.json").write_text("{}")
    live = tmp_path / f".tmp-cache.{os.getpid()}.xyz"  # another writer still running: left alone
    live.mkdir()
    write_json(tmp_path / "other.json", {})  # a write of another artifact touches nothing of this one
    assert (tmp_path / f".old-cache.{dead.pid}").exists()
    with atomic_dir(target) as tmp:
        # The previous version came back before the new write started; the partial one is gone.
        assert (target / "manifest.json").read_text() == "{}"
        assert not (tmp_path / f".tmp-cache.{dead.pid}.abc").exists()
        (tmp / "manifest.json").write_text('{"new": 1}')
    assert (target / "manifest.json").read_text() == '{"new": 1}'
    assert live.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["cache", "other.json", live.name])


def policy_run(tmp_path: Path, name: str) -> Path:
    """A run dir whose tuned policy is the tiny model as initialised (so cache/sae tests need no PPO)."""
    from irm.cli import parse_config
    from irm.models import load_model

    run_dir = tmp_path / name / "run"
    cfg = parse_config("cache", ["--config", str(TINY), "--run_dir", str(run_dir)])
    model, tok = load_model(cfg.model, seed=cfg.seed)
    model.save_pretrained(run_dir / "rlhf" / "policy")
    tok.save_pretrained(run_dir / "rlhf" / "policy")
    return run_dir


CACHE = ["--cache.layers", "[1, 2]", "--cache.shard_rows", "512", "--sae.checkpoint_every", "20"]


def shard_hashes(run_dir: Path) -> dict:
    return {p.parent.name: [s["sha256"] for s in json.loads(p.read_text())["shards"]]
            for p in sorted((run_dir / "cache").glob("layer-*/manifest.json"))}


@pytest.mark.slow
def test_cache_and_sae_killed_mid_stage_resume_to_the_uninterrupted_result(tmp_path):
    ref = policy_run(tmp_path, "ref")
    run("cache", ref, *CACHE)
    run("sae", ref, *CACHE)

    killed = policy_run(tmp_path, "killed")
    # Cache: killed once a shard of the first layer is on disk (in the layer's temporary folder).
    rc, _ = interrupt_when("cache", killed, lambda: any((killed / "cache").glob(".tmp-layer-*/shard-*")), *CACHE)
    assert rc == -signal.SIGKILL
    assert not (killed / "cache" / "layer-01" / "manifest.json").exists()  # nothing half-written is visible
    run("cache", killed, *CACHE)
    assert shard_hashes(killed) == shard_hashes(ref)  # deterministic: the same shards bit for bit
    cache_files = finished_files(killed)

    # SAE: killed after its first step checkpoint, then SIGINT after the first layer's SAEs are exported.
    ckpt = killed / "sae" / "layer-01" / "checkpoints" / "last.ckpt"
    rc, _ = interrupt_when("sae", killed, ckpt.exists, *CACHE)
    assert rc == -signal.SIGKILL
    import torch

    step_at_kill = torch.load(ckpt, map_location="cpu", weights_only=True)["global_step"]
    assert step_at_kill > 0
    exported = killed / "sae" / "layer-01" / "x2" / "sae_weights.safetensors"
    rc, err = interrupt_when("sae", killed, exported.exists, *CACHE, sig=signal.SIGINT)
    assert rc != 0
    out = run("sae", killed, *CACHE)
    assert "Restored all states from the checkpoint" in out.stderr + out.stdout  # resumed, not restarted
    assert_all_checksums_pass(killed)
    assert {k: v for k, v in finished_files(killed).items() if k in cache_files} == cache_files  # cache untouched
    from safetensors.torch import load_file

    for layer in ("layer-01", "layer-02"):
        for e in ("x1", "x2"):
            a = load_file(ref / "sae" / layer / e / "sae_weights.safetensors")
            b = load_file(killed / "sae" / layer / e / "sae_weights.safetensors")
            assert a.keys() == b.keys()
            for k in a:
                torch.testing.assert_close(b[k], a[k], rtol=0, atol=0, msg=f"{layer}/{e}/{k}")


def pipeline_outputs(run_dir: Path) -> dict:
    """The deterministic results of a run (not timings or completion stamps)."""
    names = ["divergence.json", "reward_eval.json", "mmcs.json", "kendall.json", "validation.json", "ablation.json",
             "triples.json", "lexicon.csv"]
    out = {n: (run_dir / n).read_text() for n in names}
    out["explanations"] = sorted(json.dumps({k: r[k] for k in ("layer", "dictionary", "index", "explanation", "label")},
                                            sort_keys=True) for r in read_jsonl(run_dir / "explanations.jsonl"))
    out["cache"] = shard_hashes(run_dir)
    return out


@pytest.mark.slow
def test_pipeline_interrupted_at_several_points_resumes_without_redoing_work(tmp_path):
    ref = tmp_path / "ref" / "run"
    ref.parent.mkdir()
    run("pipeline", ref)

    run_dir = tmp_path / "killed" / "run"
    run_dir.parent.mkdir()
    stages = lambda: RunDir(run_dir).manifest()["stages"] if (run_dir / "manifest.json").exists() else {}  # noqa
    points = [
        ("mid rlhf, after a PPO checkpoint", lambda: any((run_dir / "rlhf" / "checkpoints").glob("step-*")),
         signal.SIGKILL),
        ("mid sae, after a step checkpoint", lambda: any((run_dir / "sae").glob("layer-*/checkpoints/last.ckpt")),
         signal.SIGKILL),
        ("mid explain (SIGTERM)", lambda: len(read_jsonl(run_dir / "explanations.jsonl")) >= 1, signal.SIGTERM),
        ("mid regression", lambda: "deltas" in stages() and any((run_dir / "regression").rglob("*.ckpt")),
         signal.SIGKILL),
        ("mid ablate", lambda: "validate-features" in stages(), signal.SIGKILL),
    ]
    snapshots = []  # (interruption, files of the stages finished by then, explanations answered by then)
    for what, ready, sig in points:
        rc, err = interrupt_when("pipeline", run_dir, ready, sig=sig)
        if sig == signal.SIGKILL:
            assert rc == -signal.SIGKILL, what
        else:
            assert rc == 130, (what, err[-2000:])
            assert err.rstrip().splitlines()[-1] == "irm pipeline: interrupted; rerun the same command to resume"
        assert_all_checksums_pass(run_dir)
        snapshots.append((what, finished_files(run_dir), read_jsonl(run_dir / "explanations.jsonl")))
    run("pipeline", run_dir)
    assert_all_checksums_pass(run_dir)
    after = finished_files(run_dir)
    final = read_jsonl(run_dir / "explanations.jsonl")
    for what, before, answered in snapshots:
        assert {k: after.get(k) for k in before} == before, f"work finished before the interruption {what} redone"
        assert all(r in final for r in answered), what
    key = lambda r: (r["layer"], r["dictionary"], r["index"])  # noqa: E731
    assert len({key(r) for r in final}) == len(final), "a feature was explained twice"
    assert pipeline_outputs(run_dir) == pipeline_outputs(ref)
