"""Atomic artifacts and the stage manifest: nothing partial is ever read as data; finished stages are skipped
only while their config, inputs and outputs are unchanged."""

import dataclasses
import json

import pytest

from irm.artifacts import RunDir, append_jsonl, atomic_path, read_jsonl, sha256_file, write_json
from irm.config import RunConfig
from irm.errors import UserError
from irm.stages import ORDER, is_done, mark_done, open_run_dir


def test_atomic_path_leaves_nothing_when_the_writer_fails(tmp_path):
    target = tmp_path / "out.bin"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("crash mid-write")
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []


def test_atomic_path_keeps_the_old_file_until_the_new_one_is_complete(tmp_path):
    target = tmp_path / "out.json"
    write_json(target, {"v": 1})
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text('{"v": 2')
            raise RuntimeError
    assert json.loads(target.read_text()) == {"v": 1}


def test_disk_full_is_a_user_error(tmp_path, monkeypatch):
    import os

    def full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", full)
    with pytest.raises(UserError, match="No space left"):
        write_json(tmp_path / "x.json", {"a": 1})
    assert not (tmp_path / "x.json").exists()


def test_every_writer_names_the_file_the_disk_refused(tmp_path, monkeypatch):
    """atomic_dir and append_jsonl turn an OS error into the same one line as write_json."""
    import os

    from irm.artifacts import atomic_dir

    def full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(UserError, match=r"^could not write .*log\.jsonl: No space left on device; free disk space"):
        append_jsonl(tmp_path / "log.jsonl", {"a": 1})
    with pytest.raises(UserError, match=r"^could not write .*model: No space left on device; free disk space"):
        with atomic_dir(tmp_path / "model") as tmp:
            (tmp / "weights.bin").write_bytes(b"w")
    assert not (tmp_path / "model").exists()


def test_torn_jsonl_line_is_not_read(tmp_path):
    p = tmp_path / "a.jsonl"
    append_jsonl(p, {"i": 0})
    append_jsonl(p, {"i": 1})
    with open(p, "a") as f:
        f.write('{"i": 2, "tor')  # killed mid-append
    assert read_jsonl(p) == [{"i": 0}, {"i": 1}]
    append_jsonl(p, {"i": 3})  # the resumed run appends after the torn fragment
    assert read_jsonl(p) == [{"i": 0}, {"i": 1}, {"i": 3}]


def _cfg(tmp_path, **over):
    cfg = RunConfig(run_dir=str(tmp_path / "run"))
    return dataclasses.replace(cfg, **over)


def test_stage_is_done_until_config_output_or_upstream_changes(tmp_path):
    cfg = _cfg(tmp_path)
    rd = RunDir(cfg.run_dir)
    (rd.root / "cache").mkdir(parents=True)
    (rd.root / "cache" / "a.bin").write_bytes(b"abc")
    (rd.root / "divergence.json").write_text("{}")
    mark_done(cfg, "divergence", ["divergence.json"])
    mark_done(cfg, "cache", ["cache"])
    assert is_done(cfg, "cache")
    assert rd.stage_record("cache")["outputs"] == {"cache/a.bin": sha256_file(rd.root / "cache" / "a.bin")}
    # a config edit of this stage's section
    edited = dataclasses.replace(cfg, cache=dataclasses.replace(cfg.cache, max_length=7))
    assert not is_done(edited, "cache")
    # an edit of an unrelated section does not invalidate it
    assert is_done(dataclasses.replace(cfg, ablate=dataclasses.replace(cfg.ablate, n_prompts=3)), "cache")
    # upstream recomputed -> downstream stale
    mark_done(cfg, "divergence", ["divergence.json"])
    assert not is_done(cfg, "cache")
    mark_done(cfg, "cache", ["cache"])
    assert is_done(cfg, "cache")
    # an output corrupted or deleted -> stale
    (rd.root / "cache" / "a.bin").write_bytes(b"abd")
    assert not is_done(cfg, "cache")


def test_every_stage_has_a_fingerprint(tmp_path):
    cfg = _cfg(tmp_path)
    for stage in ORDER:
        assert not is_done(cfg, stage)


def test_run_dir_of_another_model_is_refused(tmp_path):
    cfg = _cfg(tmp_path)
    open_run_dir(cfg)
    assert (tmp_path / "run" / "config.yaml").exists()
    other = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, name="tiny-llama"))
    with pytest.raises(UserError, match="different config"):
        open_run_dir(other)
    open_run_dir(cfg)  # the same run reopens fine


def test_read_json_and_an_exported_sae_cfg_refuse_missing_and_corrupt_files_in_one_line(tmp_path):
    from irm.artifacts import read_json
    from irm.errors import UserError
    from irm.sae.export import read_cfg

    with pytest.raises(UserError, match=r"^missing .*x\.json: run the stage that writes it first$"):
        read_json(tmp_path / "x.json")
    with pytest.raises(UserError, match=r"^no exported SAE in .*cfg\.json missing\); run `python -m irm sae` first$"):
        read_cfg(tmp_path)
    (tmp_path / "cfg.json").write_text("{not json")
    with pytest.raises(UserError, match=r"cfg\.json is not valid JSON \(.*\); rerun `python -m irm sae`$"):
        read_cfg(tmp_path)
    with pytest.raises(UserError, match=r"cfg\.json is not valid JSON \(.*\); delete it and rerun its stage$"):
        read_json(tmp_path / "cfg.json")
