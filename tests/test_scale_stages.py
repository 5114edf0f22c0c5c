"""Deltas and lexicon on several processes (`--devices 2`: CPU processes talking gloo, no GPU): the deltas rows, in
order, and the reconstructed lexicon equal the single-process ones; a deltas run that dies part-way under one
process count is finished under the other from the shards it left, to the same rows."""

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from test_validate import ARGS, TINY_YAML, build_upstream, run_chain
from torch.multiprocessing import ProcessRaisedException

from irm.stages import deltas as deltas_stage
from irm.delta_rows import read_manifest, verify

BROKEN = 35  # a triple of the last chunk (triples 32-39)


def stage(cfg, name: str, devices: int) -> None:
    from irm.cli import main

    main([name, "--config", str(TINY_YAML), "--run_dir", cfg.run_dir, *ARGS, "--devices", str(devices)])


@pytest.fixture
def run_dir(tiny_cfg, monkeypatch):
    """A run directory up to the triples: 40 triples, deltas shards of 16, 16 and 8 triples."""
    monkeypatch.setattr(deltas_stage, "SHARD_TRIPLES", 16)  # handed to spawned processes as an argument
    build_upstream(tiny_cfg)
    run_chain(tiny_cfg, ["triples"])
    return Path(tiny_cfg.run_dir)


def rows(directory: Path) -> dict:
    """Every deltas row in manifest order, after the checks the regression makes before reading them."""
    manifest = read_manifest(directory)
    verify(directory, manifest)
    shards = [load_file(str(directory / s["file"])) for s in manifest["shards"]]
    return {key: torch.cat([s[key] for s in shards]) for key in ("x", "y", "triple", "sign")}


def assert_same_rows(got: dict, want: dict) -> None:
    """Same rows in the same order; codes and deltas up to the float noise of other batches (other padding)."""
    assert torch.equal(got["triple"], want["triple"]) and torch.equal(got["sign"], want["sign"])
    torch.testing.assert_close(got["x"], want["x"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got["y"], want["y"], rtol=1e-5, atol=1e-5)


def lexicon_outputs(root: Path) -> tuple[dict, dict]:
    with open(root / "lexicon.csv") as f:
        table = {row["word"]: row for row in csv.DictReader(f)}
    return table, json.loads((root / "kendall.json").read_text())


@pytest.mark.slow
def test_two_processes_write_the_single_process_deltas(tiny_cfg, run_dir):
    stage(tiny_cfg, "deltas", devices=1)
    one = rows(run_dir / "deltas")
    shutil.move(run_dir / "deltas", run_dir / "deltas-one")
    stage(tiny_cfg, "deltas", devices=2)
    two = rows(run_dir / "deltas")

    assert_same_rows(two, one)
    assert two["triple"].tolist() == [t for t in range(40) for _ in (1, -1)]
    assert two["sign"].tolist() == [1, -1] * 40
    manifest = json.loads((run_dir / "deltas" / "manifest.json").read_text())
    assert [(s["file"], s["rows"]) for s in manifest["shards"]] == [
        ("shard-00000.safetensors", 32), ("shard-00001.safetensors", 32), ("shard-00002.safetensors", 16)]
    # What is left is what one process leaves: the manifest and its shards, no per-process journals.
    assert sorted(p.name for p in (run_dir / "deltas").iterdir()) == sorted(
        ["manifest.json", *(s["file"] for s in manifest["shards"])])
    assert set(json.loads((run_dir / "manifest.json").read_text())["stages"]["deltas"]["outputs"]) == {
        f"deltas/{name}" for name in ["manifest.json", *(s["file"] for s in manifest["shards"])]}


@pytest.mark.slow
def test_two_processes_reconstruct_the_single_process_lexicon(tiny_cfg, run_dir):
    stage(tiny_cfg, "deltas", devices=1)
    run_chain(tiny_cfg, ["regression"])
    stage(tiny_cfg, "lexicon", devices=1)
    words_one, kendall_one = lexicon_outputs(run_dir)
    (run_dir / "lexicon.csv").unlink()
    stage(tiny_cfg, "lexicon", devices=2)
    words_two, kendall_two = lexicon_outputs(run_dir)

    assert list(words_two) == list(words_one) and len(words_one) == kendall_one["words_evaluated"] > 100
    assert [w["true"] for w in words_two.values()] == [w["true"] for w in words_one.values()]
    np.testing.assert_allclose([float(w["raw"]) for w in words_two.values()],
                               [float(w["raw"]) for w in words_one.values()], rtol=1e-5, atol=1e-6)
    for subset in ("all", "negative", "heldout", "seen"):
        assert kendall_two[subset]["n"] == kendall_one[subset]["n"]
        assert kendall_two[subset]["tau"] == pytest.approx(kendall_one[subset]["tau"], abs=1e-3)
    assert kendall_two["sign_agreement"] == pytest.approx(kendall_one["sign_agreement"], abs=1e-2)


def crash_at_last_chunk(cfg, root: Path, devices: int, error: type) -> None:
    """Run deltas with one triple of the last chunk pointing past the end of its sequence, so whoever computes that
    chunk fails (with `error`) after the earlier chunks are written; then put the triples back."""
    path = root / "triples.jsonl"
    text = path.read_text()
    lines = text.splitlines(keepends=True)
    triple = json.loads(lines[BROKEN])
    triple["positions"]["positive"] = [10_000]
    lines[BROKEN] = json.dumps(triple) + "\n"
    path.write_text("".join(lines))
    try:
        with pytest.raises(error):
            stage(cfg, "deltas", devices=devices)
    finally:
        path.write_text(text)


def mtimes(directory: Path) -> dict:
    return {p.name: p.stat().st_mtime_ns for p in directory.glob("shard-*.safetensors")}


@pytest.mark.slow
def test_deltas_killed_under_one_process_count_resume_under_the_other(tiny_cfg, run_dir):
    """Two launches of two processes and three single-process runs: 15 to 50 s on 2 shared cores."""
    deltas = run_dir / "deltas"
    stage(tiny_cfg, "deltas", devices=1)
    want = rows(deltas)
    shutil.rmtree(deltas)

    # One process dies at the last chunk; two processes finish: the last chunk only, on rank 1 (rank 0's share of
    # one chunk is empty), the first two shards untouched.
    crash_at_last_chunk(tiny_cfg, run_dir, 1, IndexError)
    left = mtimes(deltas)
    assert set(left) == {"shard-00000.safetensors", "shard-00001.safetensors"}
    assert not json.loads((deltas / "manifest.json").read_text())["complete"]
    stage(tiny_cfg, "deltas", devices=2)
    assert {name: t for name, t in mtimes(deltas).items() if name in left} == left
    assert_same_rows(rows(deltas), want)
    shutil.rmtree(deltas)

    # Two processes, rank 1 dies at the last chunk after writing the middle one (rank 0 may or may not have
    # finished the first: the error reported may be rank 0's, its peer gone); one process finishes from the shards
    # they recorded.
    crash_at_last_chunk(tiny_cfg, run_dir, 2, ProcessRaisedException)
    recorded = {json.loads(line)["file"] for journal in deltas.glob("journal-rank-*.jsonl")
                for line in journal.read_text().splitlines()}
    assert "shard-00001.safetensors" in recorded and "shard-00002.safetensors" not in recorded
    left = {name: t for name, t in mtimes(deltas).items() if name in recorded}
    stage(tiny_cfg, "deltas", devices=1)
    assert {name: t for name, t in mtimes(deltas).items() if name in left} == left
    assert_same_rows(rows(deltas), want)
    assert not list(deltas.glob("journal-*"))


def test_resume_keeps_journalled_shards_and_drops_corrupt_ones(tiny_cfg, run_dir):
    """One process, in-process: a run that died at the last chunk leaves two journalled shards; a corrupted one is
    recomputed, the intact one kept, and the rows equal an uninterrupted run's."""
    deltas = run_dir / "deltas"
    stage(tiny_cfg, "deltas", devices=1)
    want = rows(deltas)
    shutil.rmtree(deltas)
    crash_at_last_chunk(tiny_cfg, run_dir, 1, IndexError)
    assert [json.loads(line)["file"] for line in (deltas / "journal-rank-00000.jsonl").read_text().splitlines()] \
        == ["shard-00000.safetensors", "shard-00001.safetensors"]
    corrupt = deltas / "shard-00000.safetensors"
    corrupt.write_bytes(corrupt.read_bytes()[:-8] + b"00000000")
    left = mtimes(deltas)
    stage(tiny_cfg, "deltas", devices=1)
    now = mtimes(deltas)
    assert now["shard-00001.safetensors"] == left["shard-00001.safetensors"]
    assert now["shard-00000.safetensors"] != left["shard-00000.safetensors"]
    assert_same_rows(rows(deltas), want)
    assert not list(deltas.glob("journal-*"))
