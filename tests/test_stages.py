"""The stage declarations (irm.stages.STAGES) are the one source of the stage graph: each declares exactly the config
sections its code reads, the CLI and the pipeline list what it declares, and the drifts it replaced stay fixed."""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
from pathlib import Path

import pytest

from irm import cli, stages
from irm.config import ExplainConfig, RunConfig, TriplesConfig

# RunConfig fields that say where and how a run executes, not what it computes: never fingerprinted.
RUNTIME_FIELDS = {"run_dir", "device", "devices", "threads", "log_dir", "loggers"}
SECTIONS = {f.name for f in dataclasses.fields(RunConfig)} - RUNTIME_FIELDS
# Sections a stage declares that its module no longer reads, kept so its fingerprint, and every finished run
# directory's record of it, stays as it was: divergence read cache.layers only in chosen_layers, which moved to
# irm.layers (issue 26's layering); dropping the section would redo divergence and, by its new completion time, every
# later stage of every existing run.
FINGERPRINT_ONLY = {"divergence": {"cache"}}


# Stages that give the whole cfg to a library's functions: the report's sections (irm.report) read it there.
HANDS_CFG_TO = {"report": ("irm.report",)}


def sections_read(module: str) -> set[str]:
    """Config sections a module's source reads as `cfg.<section>`, found by parsing it (independent of the
    declaration under test)."""
    paths = [Path(importlib.util.find_spec(module).origin)]
    for package in HANDS_CFG_TO.get(module.rpartition(".")[2], ()):
        paths += sorted(Path(importlib.util.find_spec(package).origin).parent.glob("*.py"))
    found = set()
    for node in (n for path in paths for n in ast.walk(ast.parse(path.read_text()))):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "cfg":
            found.add(node.attr)
    return found & SECTIONS


@pytest.mark.parametrize("st", stages.STAGES, ids=lambda s: s.name)
def test_declared_sections_are_exactly_those_the_stage_code_reads(st):
    declared = set(st.sections) | {sec for sec, _ in st.when}
    assert sections_read(st.module) | FINGERPRINT_ONLY.get(st.name, set()) == declared


def test_cli_and_pipeline_list_the_declared_stages_in_order():
    assert [name for name in cli.STAGES if name != "pipeline"] == [s.name for s in stages.STAGES]
    for st in stages.STAGES:
        assert cli.STAGES[st.name] == (st.module, st.help)
    names = [s.name for s in stages.STAGES]
    for st in stages.STAGES:  # upstream stages exist and run earlier
        assert all(names.index(up) < names.index(st.name) for up in st.upstream), st.name


def _cfg(tmp_path, **sections) -> RunConfig:
    return dataclasses.replace(RunConfig(run_dir=str(tmp_path)), **sections)


def test_llm_triples_are_redone_when_the_explainer_model_changes(tmp_path):
    llm = _cfg(tmp_path, triples=TriplesConfig(substitution="llm"), explain=ExplainConfig(backend="openai", model="a"))
    other = dataclasses.replace(llm, explain=dataclasses.replace(llm.explain, model="b"))
    assert stages.stage_fingerprint(llm, "triples") != stages.stage_fingerprint(other, "triples")
    # lexicon substitution does not use the explainer: editing it keeps the triples
    lex = dataclasses.replace(llm, triples=TriplesConfig(substitution="lexicon"))
    lex_other = dataclasses.replace(other, triples=TriplesConfig(substitution="lexicon"))
    assert stages.stage_fingerprint(lex, "triples") == stages.stage_fingerprint(lex_other, "triples")


def test_explainer_connection_settings_redo_nothing(tmp_path):
    cfg = _cfg(tmp_path)
    faster = dataclasses.replace(cfg, explain=dataclasses.replace(cfg.explain, concurrency=cfg.explain.concurrency + 7))
    other_model = dataclasses.replace(cfg, explain=dataclasses.replace(cfg.explain, max_features=5))
    for name in ("explain", "validate-features", "ablate", "report"):
        assert stages.stage_fingerprint(cfg, name) == stages.stage_fingerprint(faster, name)
    assert stages.stage_fingerprint(cfg, "explain") != stages.stage_fingerprint(other_model, "explain")


def test_llm_substitution_answers_are_keyed_by_the_explainer_model(tmp_path):
    from irm.explain.features import AnswerCache

    class Backend:
        name, params = "openai", {"temperature": 0}

        def __init__(self, model):
            self.model = model
            self.asked = 0

        def chat(self, messages):
            self.asked += 1
            return f"{self.model} answer"

    path = tmp_path / "answers.jsonl"
    msgs = [{"role": "user", "content": "replace 'good' in: a good film"}]
    first, second = Backend("model-a"), Backend("model-b")
    assert AnswerCache(path, first).ask(msgs) == "model-a answer"
    assert AnswerCache(path, second).ask(msgs) == "model-b answer"  # not model-a's answer from the same file
    assert AnswerCache(path, Backend("model-a")).ask(msgs) == "model-a answer" and first.asked == 1


def test_a_finished_stage_run_again_is_a_no_op_unless_forced(tmp_path, capsys):
    args = ["--run_dir", str(tmp_path), "--model.name", "tiny-gpt-neox"]
    cfg = _cfg(tmp_path, model=dataclasses.replace(RunConfig().model, name="tiny-gpt-neox"))
    stages.open_run_dir(cfg)
    (tmp_path / "rlhf" / "policy").mkdir(parents=True)
    (tmp_path / "rlhf" / "policy" / "weights").write_text("not a model")
    (tmp_path / "divergence.json").write_text("{}")
    stages.mark_done(cfg, "rlhf", ["rlhf/policy"])
    stages.mark_done(cfg, "divergence", ["divergence.json"])
    record = stages.RunDir(cfg.run_dir).stage_record("divergence")
    cli.main(["divergence", *args])
    assert "up to date" in capsys.readouterr().err
    assert stages.RunDir(cfg.run_dir).stage_record("divergence") == record
    # forced: the stage really runs (here it finds no loadable tuned policy and says so); the refused run loses
    # nothing: the previous completion record is back, the manifest byte for byte as it was
    manifest = (tmp_path / "manifest.json").read_bytes()
    with pytest.raises(SystemExit) as e:
        cli.main(["divergence", *args, "--force"])
    assert e.value.code == 2 and (tmp_path / "manifest.json").read_bytes() == manifest
    # an upstream artifact edited since: the stage is no longer up to date and runs (and finds the problem)
    (tmp_path / "rlhf" / "policy" / "weights").write_text("edited")
    assert stages.is_done(cfg, "divergence") and not stages.up_to_date(cfg, "divergence")
    capsys.readouterr()
    with pytest.raises(SystemExit):
        cli.main(["divergence", *args])
    assert "up to date" not in capsys.readouterr().err


def test_every_stage_uses_the_same_small_dictionary(tmp_path):
    """With sae.expansions [2, 4] the small dictionary is the 2x one for explain, deltas/lexicon/validate (load_saes)
    and ablate alike (they once meant 1x in two places and min(expansions) in a third)."""
    from irm.config import SAEConfig, ModelConfig
    from irm.sae.splice import load_saes
    from irm.models import load_model, site_width
    from irm.sae import SparseAutoencoder, save_sae, sae_dir

    sae_cfg = SAEConfig(expansions=[4, 2])
    assert sae_cfg.dictionary_pair() == (2, 4)
    model, _ = load_model(ModelConfig(name="tiny-gpt-neox"), seed=0)
    d = site_width(model, "mlp_out")
    for e in (2, 4):
        save_sae(SparseAutoencoder(d, e * d), sae_dir(tmp_path, 1, e))
    saes = load_saes(tmp_path, [1], model, "mlp_out", sae_cfg.dictionary_pair()[0])
    assert saes[1].d_hidden == 2 * d
    with pytest.raises(Exception, match="expansions"):
        SAEConfig(expansions=[2]).dictionary_pair()
    for path in ("irm/stages/ablate.py", "irm/stages/deltas.py", "irm/stages/explain.py", "irm/stages/lexicon.py", "irm/stages/validate_features.py"):
        src = (Path(__file__).parents[1] / path).read_text()
        assert "sae_dir(cfg.run_dir, layer, 1)" not in src and "min(cfg.sae.expansions)" not in src, path


def test_artifacts_have_one_path_and_unreadable_ones_fail_in_one_line(tmp_path):
    from irm.errors import UserError

    keys = [key for s in stages.STAGES for key, _ in s.outputs]
    paths = [rel for s in stages.STAGES for _, rel in s.outputs]
    assert len(set(keys)) == len(keys) and len(set(paths)) == len(paths)
    assert stages.artifact(tmp_path, "reward_eval") == tmp_path / "reward_eval.json"
    with pytest.raises(UserError, match=r"missing: run `python -m irm evaluate-reward`"):
        stages.read_artifact(tmp_path, "reward_eval")
    assert stages.read_artifact(tmp_path, "reward_eval", missing_ok=True) is None
    (tmp_path / "reward_eval.json").write_text('{"base": ')
    with pytest.raises(UserError, match="corrupt") as e:
        stages.read_artifact(tmp_path, "reward_eval", missing_ok=True)
    assert "\n" not in str(e.value)
    (tmp_path / "lexicon.csv").write_text("word,true,reconstructed\ngood,1.9,2.5\n")
    assert stages.read_artifact(tmp_path, "lexicon") == [{"word": "good", "true": "1.9", "reconstructed": "2.5"}]
