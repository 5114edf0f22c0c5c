"""Bad input, one test per row of the README's "Bad input" table: the real CLI in a subprocess refuses it with one
error line naming the problem, exit code 2, no traceback, and the run directory's finished work untouched.

The run directory every test starts from holds a finished `cache` (layer 1) and `sae` stage of the tiny model,
built once; each test works on its own copy and checks afterwards that both stages still pass their manifest
checksums and that every file they wrote is byte-identical."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "tiny.yaml"
# Small enough that the base run builds in seconds: one cached layer, a short SAE fit.
SMALL = ["--cache.layers", "[1]", "--cache.n_documents", "40", "--sae.epochs", "1", "--sae.checkpoint_every", "10",
         "--sae.val_fraction", "0.1"]
FINISHED = ("cache", "sae")


def args_for(run_dir: Path, *extra: str) -> list[str]:
    return ["--config", str(TINY), "--run_dir", str(run_dir), "--log_dir", str(run_dir.parent / "tb"), *SMALL, *extra]


def snapshot(run_dir: Path) -> dict[str, str]:
    """sha256 of every file the finished stages recorded, plus the manifest itself."""
    from irm.artifacts import RunDir, sha256_file

    rd = RunDir(run_dir)
    files = {}
    for stage in FINISHED:
        files.update(rd.stage_record(stage)["outputs"])
    for rel in ("cache/layer-01",):
        for p in sorted((run_dir / rel).rglob("*")):
            if p.is_file():
                files[str(p.relative_to(run_dir))] = sha256_file(p)
    return files


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    """A run dir with a tuned policy (the tiny model as initialised) and finished cache + sae stages."""
    import torch

    from irm.cli import parse_config, run_stage
    from irm.models import load_model

    torch.set_num_threads(1)
    run_dir = tmp_path_factory.mktemp("bad-input") / "run"
    cfg = parse_config("cache", args_for(run_dir))
    model, tok = load_model(cfg.model, seed=cfg.seed)
    policy = run_dir / "rlhf" / "policy"
    model.save_pretrained(policy)
    tok.save_pretrained(policy)
    cwd = os.getcwd()
    os.chdir(run_dir.parent)  # Lightning may write next to the working directory
    try:
        run_stage("cache", args_for(run_dir))
        run_stage("sae", args_for(run_dir))
    finally:
        os.chdir(cwd)
    return run_dir


@pytest.fixture
def run_dir(base_run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(base_run, copy)
    before = snapshot(copy)
    yield copy
    from irm.artifacts import RunDir
    from irm.cli import parse_config
    from irm.stages import is_done

    cfg = parse_config("cache", args_for(copy))
    for stage in FINISHED:
        assert is_done(cfg, stage), f"{stage} no longer complete after the refused command"
    assert snapshot(copy) == before, "a finished artifact changed"
    assert RunDir(copy).manifest()["stages"].keys() >= set(FINISHED)


def irm(stage: str, argv: list[str], *, cwd: Path, env: dict | None = None, code: str | None = None):
    """`python -m irm <stage> argv` (or `python -c code` for a patched process) with the hub offline."""
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
                **(env or {})}
    cmd = [sys.executable, "-c", code, stage, *argv] if code else [sys.executable, "-m", "irm", stage, *argv]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, env=full_env, timeout=300)


def refused(out, stage: str, *needles: str) -> str:
    """Exit code 2, exactly one error line naming the problem, no traceback."""
    assert out.returncode == 2, f"rc={out.returncode}\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}"
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    errors = [ln for ln in out.stderr.splitlines() if "error" in ln.lower()]
    assert len(errors) == 1, out.stderr[-3000:]
    line = errors[0]
    assert line.startswith(f"irm {stage}: error: "), line
    assert out.stderr.rstrip().splitlines()[-1] == line  # the error is the last thing printed
    problem, sep, fix = line[len(f"irm {stage}: error: "):].partition("; ")
    assert sep and problem.strip() and fix.strip(), f"not '<problem>; <fix>': {line}"  # the README's promise
    for needle in needles:
        assert needle in line, (needle, line)
    return line


def test_misspelled_config_key(run_dir):
    (run_dir.parent / "typo.yaml").write_text("cache:\n  max_lenght: 8\n")
    out = irm("cache", args_for(run_dir, "--config", str(run_dir.parent / "typo.yaml")), cwd=run_dir.parent)
    refused(out, "cache", "max_lenght")


def test_wrong_type(run_dir):
    out = irm("sae", args_for(run_dir, "--sae.epochs", "three"), cwd=run_dir.parent)
    refused(out, "sae", "epochs")


def test_missing_corpus_file(run_dir):
    missing = run_dir.parent / "no-such-reviews.jsonl"
    out = irm("cache", args_for(run_dir, "--corpus.source", str(missing)), cwd=run_dir.parent)
    refused(out, "cache", str(missing))


@pytest.mark.slow  # a subprocess that loads torch and a model (5-7 s): the default suite keeps the cheaper rows
def test_model_name_not_resolvable_offline(tmp_path):
    # A different model makes a different run: it gets its own run dir (the base one would refuse it first).
    run = tmp_path / "other"
    out = irm("rlhf", args_for(run, "--model.name", "nobody-here/no-such-model-xyz"), cwd=tmp_path)
    refused(out, "rlhf", "nobody-here/no-such-model-xyz")


@pytest.mark.slow  # a subprocess that loads torch and a model (5-7 s): the default suite keeps the cheaper rows
def test_unknown_architecture(tmp_path):
    model_dir = tmp_path / "bert"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 32,
                                                        "num_hidden_layers": 1, "num_attention_heads": 2}))
    out = irm("rlhf", args_for(tmp_path / "other", "--model.name", str(model_dir)), cwd=tmp_path)
    line = refused(out, "rlhf", "bert")
    assert "gpt_neox" in line  # names what would work


# The three kinds share one code path: the default run checks one, `-m slow` the other two.
@pytest.mark.parametrize("kind", [pytest.param("empty", marks=pytest.mark.slow),
                                  pytest.param("no-text-column", marks=pytest.mark.slow),
                                  pytest.param("not-utf8", marks=pytest.mark.slow)])
def test_bad_corpus(run_dir, kind):
    path = run_dir.parent / "corpus.jsonl"
    if kind == "empty":
        path.write_text("")
        needle = "no non-empty texts"
    elif kind == "no-text-column":
        path.write_text("".join(json.dumps({"review": f"a good film {i}"}) + "\n" for i in range(20)))
        needle = "'text'"
    else:
        path.write_bytes(b'{"text": "caf\xe9 was great"}\n' * 20)
        needle = "not UTF-8"
    out = irm("cache", args_for(run_dir, "--corpus.source", str(path)), cwd=run_dir.parent)
    refused(out, "cache", needle)


@pytest.mark.slow  # a subprocess that loads torch and a model (5-7 s): the default suite keeps the cheaper rows
def test_sae_checkpoint_of_the_wrong_width(run_dir):
    import torch

    ckpt = run_dir / "sae" / "layer-01" / "checkpoints" / "last.ckpt"
    original = ckpt.read_bytes()
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    # The same SAEs for half the width: what another layer's or model's checkpoint would hold.
    for key, value in list(state["state_dict"].items()):
        if key.startswith("saes.") and value.ndim == 2:
            state["state_dict"][key] = value[: value.shape[0] // 2, : value.shape[1] // 2].clone()
    torch.save(state, ckpt)
    try:
        out = irm("sae", args_for(run_dir, "--force"), cwd=run_dir.parent)  # the finished stage, run again
    finally:
        ckpt.write_bytes(original)  # the bad checkpoint was ours; the fixture then checks nothing else changed
    refused(out, "sae", "wide")


@pytest.mark.parametrize("damage", [pytest.param("truncated", marks=pytest.mark.slow), "corrupted"])
def test_damaged_shard(run_dir, damage):
    shard = sorted((run_dir / "cache" / "layer-01").glob("shard-*.safetensors"))[0]
    original = shard.read_bytes()
    if damage == "truncated":
        shard.write_bytes(original[: len(original) // 2])
    else:
        flipped = bytearray(original)
        flipped[-5] ^= 0xFF
        shard.write_bytes(bytes(flipped))
    try:
        # shards are not checksummed on every start (the manifest is): a forced rerun reads them and finds it
        out = irm("sae", args_for(run_dir, "--force"), cwd=run_dir.parent)
    finally:
        shard.write_bytes(original)  # the damage was ours; the fixture then checks nothing else changed
    line = refused(out, "sae", shard.name)
    assert "checksum" in line or "cannot read" in line, line


@pytest.mark.slow  # a subprocess that loads torch and a model (5-7 s): the default suite keeps the cheaper rows
def test_nan_activations(run_dir):
    from safetensors.torch import load_file, save_file

    weights = run_dir / "rlhf" / "policy" / "model.safetensors"
    original = weights.read_bytes()
    state = load_file(weights)
    name = next(k for k in state if "layers.1.mlp" in k and k.endswith("weight"))
    state[name] = torch_nan_like(state[name])
    save_file(state, weights, metadata={"format": "pt"})
    try:
        out = irm("cache", args_for(run_dir), cwd=run_dir.parent)
    finally:
        weights.write_bytes(original)
    refused(out, "cache", "NaN")


def torch_nan_like(t):
    import torch

    return torch.full_like(t, float("nan"))


def test_run_dir_of_a_different_config(run_dir):
    out = irm("cache", args_for(run_dir, "--model.tiny_d_model", "32"), cwd=run_dir.parent)
    refused(out, "cache", "different config", str(run_dir))


# The writer raises ENOSPC on fsync of any file under the cache being written, as a full disk would.
DISK_FULL = """
import errno, os, sys
real = os.fsync
def full(fd):
    if "/cache/" in os.readlink(f"/proc/self/fd/{fd}"):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return real(fd)
os.fsync = full
from irm.cli import main
main(sys.argv[1:])
"""


@pytest.mark.slow  # a subprocess that loads torch and a model (5-7 s): the default suite keeps the cheaper rows
def test_disk_full_while_writing(run_dir):
    # A different cache size makes the cache stage redo its work; the old cache must survive the failed write.
    out = irm("cache", args_for(run_dir, "--cache.n_documents", "30"), cwd=run_dir.parent, code=DISK_FULL)
    refused(out, "cache", os.strerror(errno.ENOSPC))
    assert not list((run_dir / "cache").glob(".tmp-*")), "a partial cache was left behind"


def test_the_readme_table_lists_exactly_these_tests():
    """The README's "Bad input" table is checked against this file: every test it names exists here, and every
    test of a bad input here is in the table."""
    import re

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    table = readme.split("## Bad input", 1)[1].split("\n## ", 1)[0]
    named = {m.group(1) for m in re.finditer(r"`(test_\w+)(?:\[[^`]*\])?`", table)}
    here = {name for name in globals() if name.startswith("test_")} - {"test_the_readme_table_lists_exactly_these_tests"}
    assert named == here, (sorted(named - here), sorted(here - named))

