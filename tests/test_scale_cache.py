"""The activation cache written by several processes (`devices: 2`, CPU processes talking gloo; torchrun): each rank
caches a contiguous share of the documents into one folder per layer, rank 0 writes one manifest once all have
finished, and the result holds the rows a single process caches, in the same order, readable by any number of
readers. An interrupted multi-rank write leaves no cache."""

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_activations import save_policy

from irm.activations import ActivationCache, ShardWriter
from irm.stages.cache import _cache_worker, run
from irm.activations.datamodule import ActivationDataModule, RowSampler, ShardBatches
from irm.config import SAEConfig
from irm.parallel import Ranks, launch

ROOT = Path(__file__).resolve().parents[1]
TINY_YAML = ROOT / "configs" / "tiny.yaml"
LAYERS = [1, 3]
N_DOCS = 40
SHARD_ROWS = 97  # several shards per rank, shard boundaries inside documents


def tiny(run_dir: Path, devices: int):
    from irm.cli import parse_config

    cfg = parse_config("cache", ["--config", str(TINY_YAML), "--run_dir", str(run_dir)])
    cfg.cache.layers, cfg.cache.n_documents, cfg.cache.shard_rows = list(LAYERS), N_DOCS, SHARD_ROWS
    return dataclasses.replace(cfg, devices=devices)


def layer_dir(cfg, layer: int) -> Path:
    return Path(cfg.run_dir) / "cache" / f"layer-{layer:02d}"


def leftovers(cfg) -> list[str]:
    """Temporary or moved-aside folders beside the caches (`.tmp-*`, `.old-*`)."""
    return sorted(p.name for p in (Path(cfg.run_dir) / "cache").iterdir() if p.name.startswith("."))


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    """The tiny cache written by one process and by two, each into its own run directory."""
    out = {}
    for devices in (1, 2):
        cfg = tiny(tmp_path_factory.mktemp(f"devices-{devices}") / "run", devices)
        save_policy(cfg)
        run(cfg)
        out[devices] = cfg
    return out


@pytest.mark.slow
def test_two_ranks_write_one_complete_manifest_over_the_single_process_rows(caches):
    from irm.stages import is_done

    one, two = caches[1], caches[2]
    assert is_done(two, "cache")
    for layer in LAYERS:
        single, multi = ActivationCache(layer_dir(one, layer)), ActivationCache(layer_dir(two, layer))
        multi.verify()
        m = multi.manifest
        assert m["complete"] and m["world_size"] == 2 and m["documents"] == N_DOCS and m["layer"] == layer
        assert multi.rows == single.rows == sum(s["rows"] for s in m["shards"])
        files = [s["file"] for s in m["shards"]]
        # both ranks wrote shards, listed in rank order, and nothing else is in the folder
        writers = [f.split("-")[1] for f in files]
        assert writers == sorted(writers) and set(writers) == {"r0000", "r0001"}
        assert sorted(p.name for p in layer_dir(two, layer).iterdir()) == sorted(files + ["manifest.json"])

        a, b = single.read_range(0, single.rows), multi.read_range(0, multi.rows)
        # Same rows up to order, and in fact in the same order: documents ascending, positions ascending.
        order_a = torch.argsort(a["doc_ids"] * 10_000 + a["positions"])
        order_b = torch.argsort(b["doc_ids"] * 10_000 + b["positions"])
        for key in ("token_ids", "doc_ids", "positions"):
            assert torch.equal(a[key][order_a], b[key][order_b]), key
            assert torch.equal(a[key], b[key]), key
        assert b["doc_ids"].unique().tolist() == list(range(N_DOCS))
        # the ranks batch different documents together: padding changes the float rounding, nothing more
        torch.testing.assert_close(b["acts"][order_b], a["acts"][order_a], rtol=1e-4, atol=1e-5)
    assert leftovers(two) == []


@pytest.mark.slow
def test_a_cache_written_by_two_ranks_reads_with_one_reader_and_splits_between_two(caches):
    cfg = caches[2]
    path = layer_dir(cfg, LAYERS[0])
    cache = ActivationCache(path)
    everything = cache.read_range(0, cache.rows)["acts"]

    dm = ActivationDataModule(str(path), SAEConfig(batch_size=16, val_fraction=0.1), shuffle=False)
    dm.setup("fit")
    train, val = list(dm.train_dataloader()), list(dm.val_dataloader())
    assert torch.equal(torch.cat(train), everything[:dm.split])
    assert torch.equal(torch.cat(val), everything[dm.split:])

    seen = []
    for rank in range(2):
        sampler = RowSampler(cache, 0, cache.rows, rank=rank, world_size=2, seed=3)
        rows = torch.cat([local + cache.offsets[shard] for shard, local in sampler.plan()])
        got = torch.cat(list(ShardBatches(cache, sampler, batch_size=16)))
        assert torch.equal(got, everything[rows])  # the rows the plan names, from whichever rank's shard
        seen.append(set(rows.tolist()))
    assert len(seen[0]) == len(seen[1]) and not seen[0] & seen[1]
    left_out = cache.rows - len(seen[0] | seen[1])
    assert left_out == sum(s["rows"] % 2 for s in cache.shards)  # at most one row per odd-sized shard sits out


def _rank_1_disk_fills(ranks: Ranks, cfg):
    """The cache stage with rank 1's disk full after its first shard: the real model, real shards on rank 0."""
    if ranks.rank == 1:
        flush = ShardWriter._flush

        def failing(self):
            if self.shards:
                raise OSError(28, "No space left on device")
            flush(self)

        ShardWriter._flush = failing
    return _cache_worker(ranks, cfg)


@pytest.mark.slow
def test_a_rank_failing_mid_write_leaves_no_cache_and_the_rerun_clears_its_folder(tmp_path):
    from irm.stages import is_done

    cfg = tiny(tmp_path / "run", devices=2)
    save_policy(cfg)
    with pytest.raises(Exception, match="No space left on device"):
        launch(cfg, _rank_1_disk_fills)
    for layer in LAYERS:
        assert not layer_dir(cfg, layer).exists()
    assert not list((Path(cfg.run_dir) / "cache").rglob("manifest.json"))  # not even in an abandoned folder
    assert not is_done(cfg, "cache")

    rerun = dataclasses.replace(cfg, devices=1)
    run(rerun)
    assert is_done(rerun, "cache") and leftovers(rerun) == []
    for layer in LAYERS:
        ActivationCache(layer_dir(rerun, layer)).verify()


@pytest.mark.slow
def test_torchrun_two_processes_cache_the_single_process_rows(tmp_path, caches):
    cfg = tiny(tmp_path / "run", devices=1)
    save_policy(cfg)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "irm", "cache",
                          "--config", str(TINY_YAML), "--run_dir", str(cfg.run_dir), "--cache.layers", str(LAYERS),
                          "--cache.n_documents", str(N_DOCS), "--cache.shard_rows", str(SHARD_ROWS)],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    for layer in LAYERS:
        single, multi = ActivationCache(layer_dir(caches[1], layer)), ActivationCache(layer_dir(cfg, layer))
        multi.verify()
        assert multi.manifest["world_size"] == 2 and multi.rows == single.rows
        a, b = single.read_range(0, single.rows), multi.read_range(0, multi.rows)
        for key in ("token_ids", "doc_ids", "positions"):
            assert torch.equal(a[key], b[key]), key
        torch.testing.assert_close(b["acts"], a["acts"], rtol=1e-4, atol=1e-5)
    assert leftovers(cfg) == []
