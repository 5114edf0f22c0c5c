"""The activation cache (paper 4.2): exact round trips, checksums, NaN reports, the model forward it stores, and the
streaming DataModule (shuffling, DDP rank split, held-out tail, mid-epoch resume)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from irm.activations import ActivationCache, ShardWriter
from irm.activations.datamodule import ActivationDataModule, RowSampler, ShardBatches, validation_start
from irm.config import SAEConfig
from irm.errors import UserError


def write_cache(layer_dir: Path, acts: torch.Tensor, doc_lengths: list[int], dtype: str = "float32",
                shard_rows: int = 50, **manifest) -> dict[str, torch.Tensor]:
    """A cache of `acts` whose rows belong to documents of `doc_lengths` (positions 0..n-1 each), written in uneven
    pieces so rows cross shard boundaries; returns the columns as written."""
    doc_ids = torch.cat([torch.full((n,), d, dtype=torch.int64) for d, n in enumerate(doc_lengths)])
    positions = torch.cat([torch.arange(n) for n in doc_lengths])
    token_ids = torch.randint(0, 1000, (acts.shape[0],), generator=torch.Generator().manual_seed(1))
    writer = ShardWriter(layer_dir, acts.shape[1], dtype, shard_rows=shard_rows)
    for lo, hi in [(0, 7), (7, 7), (7, 120), (120, acts.shape[0])]:
        writer.add(acts[lo:hi], token_ids[lo:hi], doc_ids[lo:hi], positions[lo:hi])
    writer.close(model="test", layer=manifest.pop("layer", 0), site="mlp_out", **manifest)
    return {"acts": acts, "token_ids": token_ids, "doc_ids": doc_ids, "positions": positions}


def row_id_cache(layer_dir: Path, n_docs: int = 30, width: int = 4, shard_rows: int = 37, seed: int = 0):
    """A cache whose column 0 is the row's global index (exact in float32), to see which rows a loader yields."""
    rng = np.random.default_rng(seed)
    lengths = [int(n) for n in rng.integers(3, 12, size=n_docs)]
    rows = sum(lengths)
    acts = torch.randn(rows, width, generator=torch.Generator().manual_seed(seed))
    acts[:, 0] = torch.arange(rows, dtype=torch.float32)
    write_cache(layer_dir, acts, lengths, shard_rows=shard_rows)
    return rows, lengths


def row_ids(batches) -> list[int]:
    return [int(r) for b in batches for r in b[:, 0].tolist()]


# ---------------------------------------------------------------------------------------------- store


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_cache_round_trip_is_exact_for_every_storage_dtype(tmp_path, dtype):
    acts = torch.randn(203, 6, generator=torch.Generator().manual_seed(0)) * 3
    written = write_cache(tmp_path / "layer-02", acts, [40, 3, 60, 100], dtype=dtype, layer=2)
    cache = ActivationCache(tmp_path / "layer-02")
    stored = acts.to(getattr(torch, dtype)).float()  # what the storage dtype can hold, widened back
    assert (cache.rows, cache.width, cache.layer, cache.dtype) == (203, 6, 2, dtype)
    assert [s["rows"] for s in cache.shards] == [50, 50, 50, 50, 3]

    whole = cache.read_range(0, cache.rows)
    assert whole["acts"].dtype == torch.float32
    assert torch.equal(whole["acts"], stored)
    for key in ("token_ids", "doc_ids", "positions"):
        assert torch.equal(whole[key], written[key])

    batches = list(cache.iter_batches(64))
    assert [len(b["acts"]) for b in batches] == [64, 64, 64, 11]
    assert torch.equal(torch.cat([b["acts"] for b in batches]), stored)

    idx = [202, 0, 49, 50, 50, 151, 7]
    picked = cache.read_rows(idx)
    assert torch.equal(picked["acts"], stored[idx])
    assert torch.equal(picked["positions"], written["positions"][idx])
    manifest = json.loads((tmp_path / "layer-02" / "manifest.json").read_text())
    assert manifest["complete"] and manifest["site"] == "mlp_out" and manifest["rows"] == 203
    assert all(len(s["sha256"]) == 64 for s in manifest["shards"])


def test_writer_keeps_one_shard_in_memory(tmp_path):
    writer = ShardWriter(tmp_path, width=8, shard_rows=16)
    for _ in range(10):
        writer.add(torch.ones(13, 8), *(torch.zeros(13, dtype=torch.int64),) * 3)
        assert writer.fill < 16  # full shards were flushed to disk as they filled
    assert writer.acts_RD.shape == (16, 8)
    assert len(writer.shards) == 130 // 16


def test_damaged_shard_fails_its_checksum(tmp_path):
    write_cache(tmp_path / "layer-00", torch.randn(203, 4), [203])
    cache = ActivationCache(tmp_path / "layer-00")
    cache.verify()
    shard = tmp_path / "layer-00" / "shard-00003.safetensors"
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0x01  # one bit of one activation
    shard.write_bytes(bytes(data))
    with pytest.raises(UserError, match="shard-00003.safetensors fails its checksum"):
        cache.verify()
    dm = ActivationDataModule(str(tmp_path / "layer-00"), SAEConfig(batch_size=8))
    with pytest.raises(UserError, match="fails its checksum"):
        dm.setup("fit")


def test_missing_or_incomplete_cache_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="run `python -m irm cache` first"):
        ActivationCache(tmp_path / "nowhere")
    write_cache(tmp_path / "layer-00", torch.randn(203, 4), [203])
    manifest = tmp_path / "layer-00" / "manifest.json"
    manifest.write_text(manifest.read_text().replace('"complete": true', '"complete": false'))
    with pytest.raises(UserError, match="incomplete"):
        ActivationCache(tmp_path / "layer-00")


def test_nan_in_cached_activations_is_reported_with_its_document_and_position(tmp_path):
    acts = torch.randn(203, 4)
    acts[127, 2] = float("nan")  # row 127 = document 2 (rows 103..202), position 24
    write_cache(tmp_path / "layer-00", acts, [100, 3, 100])
    dm = ActivationDataModule(str(tmp_path / "layer-00"), SAEConfig(batch_size=8, val_fraction=0.0), shuffle=False)
    dm.setup("fit")
    with pytest.raises(UserError, match=r"row 27 \(document 2, token position 24\) holds NaN or inf"):
        list(dm.train_dataloader())


def test_infinities_of_both_signs_are_reported_and_huge_finite_values_are_not(tmp_path):
    acts = torch.randn(203, 4)
    acts[127, 2], acts[150, 0] = float("inf"), float("-inf")  # their sum is NaN: still caught
    write_cache(tmp_path / "bad", acts, [100, 3, 100])
    dm = ActivationDataModule(str(tmp_path / "bad"), SAEConfig(batch_size=8, val_fraction=0.0), shuffle=False)
    dm.setup("fit")
    with pytest.raises(UserError, match=r"row 27 \(document 2, token position 24\) holds NaN or inf"):
        list(dm.train_dataloader())

    for dtype, huge in (("float32", 3e38), ("float16", 6e4)):  # finite, yet ten of them sum past the dtype's range
        acts = torch.randn(203, 4)
        acts[60:70] = huge
        write_cache(tmp_path / dtype, acts, [203], dtype=dtype)
        dm = ActivationDataModule(str(tmp_path / dtype), SAEConfig(batch_size=8, val_fraction=0.0), shuffle=False)
        dm.setup("fit")
        stored = acts.to(getattr(torch, dtype)).float()
        assert torch.equal(torch.cat(list(dm.train_dataloader())), stored)


# ---------------------------------------------------------------------------------------------- DataModule


def test_each_epoch_yields_every_training_row_once_in_a_new_order(tmp_path):
    rows, _ = row_id_cache(tmp_path / "layer-00")
    dm = ActivationDataModule(str(tmp_path / "layer-00"), SAEConfig(batch_size=16, val_fraction=0.2), seed=3)
    dm.setup("fit")
    train, val = dm.train_dataloader(), dm.val_dataloader()
    epochs = []
    for epoch in range(2):
        train.sampler.set_epoch(epoch)
        batches = list(train)
        assert len(batches) == len(train) and all(b.shape[1] == 4 and b.dtype == torch.float32 for b in batches)
        assert all(len(b) == 16 for b in batches[:-1])
        epochs.append(row_ids(batches))
    assert sorted(epochs[0]) == list(range(dm.split)) == sorted(epochs[1])
    assert epochs[0] != epochs[1]
    assert row_ids(val) == list(range(dm.split, rows))  # held out, in order, never trained on


def test_validation_tail_starts_at_a_document_boundary(tmp_path):
    rows, lengths = row_id_cache(tmp_path / "layer-00")
    cache = ActivationCache(tmp_path / "layer-00")
    starts = set(np.cumsum([0] + lengths[:-1]).tolist())
    for fraction in (0.05, 0.2, 0.5):
        cut = rows - int(np.ceil(fraction * rows))
        # the document that the plain row count cuts moves entirely into the held-out part
        assert validation_start(cache, fraction) == max(s for s in starts if s <= cut)
    assert validation_start(cache, 0.0) == rows
    with pytest.raises(UserError, match="val_fraction"):
        validation_start(cache, 1.0)


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_read_disjoint_equal_parts(tmp_path, world):
    rows, _ = row_id_cache(tmp_path / "layer-00", shard_rows=37)
    cache = ActivationCache(tmp_path / "layer-00")
    seen = []
    for rank in range(world):
        sampler = RowSampler(cache, 0, rows, rank=rank, world_size=world, seed=5)
        sampler.set_epoch(1)
        loader = ShardBatches(cache, sampler, batch_size=10)
        seen.append(row_ids(loader))
        assert len(list(loader)) == len(loader)
    assert len({len(s) for s in seen}) == 1  # the same number of rows, hence of batches, on every rank
    union = set().union(*map(set, seen))
    assert sum(len(s) for s in seen) == len(union)  # disjoint
    per_shard_left_out = [n % world for n in (s["rows"] for s in cache.shards)]
    assert rows - len(union) == sum(per_shard_left_out)


def test_loader_resumes_mid_epoch_with_the_batches_an_uninterrupted_epoch_yields(tmp_path):
    row_id_cache(tmp_path / "layer-00")
    cache = ActivationCache(tmp_path / "layer-00")

    def loader():
        return ShardBatches(cache, RowSampler(cache, 0, cache.rows, seed=1), batch_size=9)

    full = loader()
    full.sampler.set_epoch(2)
    expected = [b.clone() for b in full]
    first = loader()
    first.sampler.set_epoch(2)
    it = iter(first)
    for _ in range(7):
        next(it)
    state = first.state_dict()
    assert state == {"epoch": 2, "items": 7}
    resumed = loader()
    resumed.load_state_dict(state)
    resumed.sampler.set_epoch(2)
    rest = list(resumed)
    assert len(rest) == len(expected) - 7
    assert all(torch.equal(a, b) for a, b in zip(rest, expected[7:]))
    resumed.sampler.set_epoch(3)  # the resume point applies to its own epoch only
    assert len(list(resumed)) == len(expected)


def test_grouped_items_hold_the_same_batches_in_the_same_order(tmp_path):
    row_id_cache(tmp_path / "layer-00")
    cache = ActivationCache(tmp_path / "layer-00")
    single = ShardBatches(cache, RowSampler(cache, 0, cache.rows, seed=2), batch_size=9)
    grouped = ShardBatches(cache, RowSampler(cache, 0, cache.rows, seed=2), batch_size=9, batches_per_item=4)
    items = list(grouped)
    assert len(items) == len(grouped) == int(np.ceil(len(single) / 4))
    assert all(isinstance(item, list) and len(item) == 4 for item in items[:-1])
    flat = [b for item in items for b in item]
    assert len(flat) == len(single) and all(torch.equal(a, b) for a, b in zip(flat, single))


def test_datamodule_knows_the_width_before_setup(tmp_path):
    row_id_cache(tmp_path / "layer-00", width=7)
    assert ActivationDataModule(str(tmp_path / "layer-00"), SAEConfig()).width == 7


# ---------------------------------------------------------------------------------------------- the model forward


@pytest.fixture(scope="module")
def tiny_gpt2():
    from irm.config import ModelConfig
    from irm.models import load_model

    # GPT-2 has learned absolute positions: left padding would change its activations if positions were wrong.
    return load_model(ModelConfig(name="tiny-gpt2", tiny_layers=3, tiny_d_model=32), seed=0)


def test_cached_rows_equal_each_document_run_alone(tmp_path, tiny_gpt2):
    from irm.activations.collect import cache_activations
    from irm.data import load_texts
    from irm.config import CorpusConfig
    from irm.models import capture

    model, tokenizer = tiny_gpt2
    texts = load_texts(CorpusConfig(), "train", 0, n=11)
    texts[3] = "bad"  # a one-token document among long ones: mostly padding in its batch
    writers = {layer: ShardWriter(tmp_path / f"layer-{layer}", 32, shard_rows=64) for layer in (0, 2)}
    cache_activations(model, tokenizer, texts, writers, batch_size=4, max_length=40)
    for w in writers.values():
        w.close()
    for layer in (0, 2):
        got = ActivationCache(tmp_path / f"layer-{layer}").read_range(0, writers[layer].rows)
        expected = {k: [] for k in ("acts", "token_ids", "doc_ids", "positions")}
        with torch.inference_mode(), capture(model, [layer]) as acts:
            for doc, text in enumerate(texts):
                ids = tokenizer(text, truncation=True, max_length=40, return_tensors="pt")["input_ids"]
                model(input_ids=ids)
                n = ids.shape[1]
                expected["acts"].append(acts[layer][0])
                expected["token_ids"].append(ids[0])
                expected["doc_ids"].append(torch.full((n,), doc))
                expected["positions"].append(torch.arange(n))
        expected = {k: torch.cat(v) for k, v in expected.items()}
        for key in ("token_ids", "doc_ids", "positions"):
            assert torch.equal(got[key], expected[key]), key
        assert tokenizer.pad_token_id not in got["token_ids"].tolist()
        torch.testing.assert_close(got["acts"], expected["acts"], rtol=1e-5, atol=1e-5)


def test_non_finite_model_activations_are_reported_not_cached(tmp_path, tiny_gpt2):
    from irm.activations.collect import cache_activations
    from irm.models import splice

    model, tokenizer = tiny_gpt2
    texts = ["good film", "a very long and quite boring film indeed", "bad"]

    def poison(out_BSD):
        out_BSD = out_BSD.clone()
        out_BSD[1, 4] = float("inf")  # batch row 1 = document 1, unpadded (longest), so column 4 = position 4
        return out_BSD

    writers = {1: ShardWriter(tmp_path / "layer-1", 32)}
    where = r"layer 1 hold NaN or inf \(document 1, token position 4\)"
    with splice(model, {1: poison}), pytest.raises(UserError, match=where):
        cache_activations(model, tokenizer, texts, writers, batch_size=8, max_length=16)


def test_float16_storage_refuses_values_it_cannot_hold(tmp_path, tiny_gpt2):
    from irm.activations.collect import cache_activations
    from irm.models import splice

    model, tokenizer = tiny_gpt2
    writers = {0: ShardWriter(tmp_path / "layer-0", 32, dtype="float16")}
    with splice(model, {0: lambda out: out * 1e9}), pytest.raises(UserError, match="beyond float16's range"):
        cache_activations(model, tokenizer, ["good film"], writers, storage_dtype="float16")


# ---------------------------------------------------------------------------------------------- the stage


def save_policy(cfg) -> None:
    """A tiny model saved where the rlhf stage puts the tuned policy."""
    from irm.models import load_model

    model, tokenizer = load_model(cfg.model, cfg.seed)
    path = Path(cfg.run_dir) / "rlhf" / "policy"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)


def test_cache_stage_writes_each_chosen_layer_and_records_completion(tiny_cfg):
    from irm.stages.cache import run
    from irm.artifacts import RunDir
    from irm.data import corpus_fingerprint, load_texts
    from irm.stages import is_done

    cfg = tiny_cfg
    cfg.cache.layers, cfg.cache.n_documents, cfg.cache.shard_rows, cfg.cache.dtype = [3, 1], 40, 300, "bfloat16"
    save_policy(cfg)
    run(cfg)
    assert is_done(cfg, "cache")
    texts = load_texts(cfg.corpus, cfg.corpus.split, cfg.seed)[:40]
    for layer in (1, 3):
        cache = ActivationCache(Path(cfg.run_dir) / "cache" / f"layer-{layer:02d}")
        cache.verify()
        m = cache.manifest
        assert (m["layer"], m["site"], m["dtype"], m["width"], m["documents"]) == (layer, "mlp_out", "bfloat16", 64, 40)
        assert m["corpus_fingerprint"] == corpus_fingerprint(cfg.corpus, cfg.corpus.split, cfg.seed)
        ids = cache.read_range(0, cache.rows, ("doc_ids", "positions"))
        assert ids["doc_ids"].unique().tolist() == list(range(40))
        lengths = torch.bincount(ids["doc_ids"])
        assert lengths.tolist() == [min(len(t.split()) + t.count(".") + t.count(","), 32) for t in texts]
    assert set(RunDir(cfg.run_dir).stage_record("cache")["outputs"]) == {
        "cache/layer-01/manifest.json", "cache/layer-03/manifest.json"}


def test_cache_stage_refuses_a_layer_the_model_does_not_have(tiny_cfg):
    from irm.stages.cache import run

    cfg = tiny_cfg
    cfg.cache.layers = [1, 4]
    save_policy(cfg)
    with pytest.raises(UserError, match="out of range"):
        run(cfg)
    assert not (Path(cfg.run_dir) / "cache").exists()
