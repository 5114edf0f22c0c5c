"""`python -m irm explain` on the tiny config with the offline backend, over a run directory whose features are known
(tests/explain_rundir.py): every shared feature explained from the right dictionary, labels and detection scores
checked against independent computations, one cache pass per layer, reruns free, stale lines replaced."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from explain_rundir import LAYERS, PERM, TRIGGERS, build_run, codes
from irm.artifacts import read_jsonl
from irm.errors import UserError
from irm.stages.explain import NOT_EXPLAINED


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    root = tmp_path_factory.mktemp("template")
    return root, build_run(root, n_docs=150)


@pytest.fixture
def cfg(tiny_cfg, template):
    shutil.copytree(template[0], tiny_cfg.run_dir)
    return tiny_cfg


def vader() -> dict:
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    return SentimentIntensityAnalyzer().lexicon


def coordinate(line) -> int:
    """The cache coordinate a feature reads, by construction of the test SAEs."""
    return line["index"] if line["dictionary"] == "x1" else PERM[line["index"]]


def lines_of(cfg):
    return read_jsonl(Path(cfg.run_dir) / "explanations.jsonl")


def test_offline_stage_on_the_tiny_config_explains_labels_and_scores_every_shared_feature(cfg, capsys):
    from irm.explain import related_features
    from irm.stages.explain import run
    from irm.stages import is_done

    run(cfg)
    every = lines_of(cfg)
    cap = cfg.explain.max_features  # 4 on the tiny config: pairs of small 0..3 (best cosine first)
    inverse = {k: j for j, k in enumerate(PERM)}
    expected = {(layer, "x1", k) for layer in LAYERS for k in range(cap)}
    expected |= {(layer, "x2", inverse[k]) for layer in LAYERS for k in range(cap)}
    lines = [ln for ln in every if ln["status"] != NOT_EXPLAINED]
    assert {(ln["layer"], ln["dictionary"], ln["index"]) for ln in lines} == expected
    # every feature of every pair has a page; those beyond the cap are not explained, labelled or scored
    pairs = {(layer, "x1", k) for layer in LAYERS for k in range(len(TRIGGERS))}
    pairs |= {(layer, "x2", inverse[k]) for layer in LAYERS for k in range(len(TRIGGERS))}
    assert {(ln["layer"], ln["dictionary"], ln["index"]) for ln in every} == pairs
    for ln in every:
        if ln["status"] == NOT_EXPLAINED:
            assert ln["explanation"] is ln["label"] is ln["score"] is None and "fuzz" not in ln
            assert ln["records"] and ln["density"]["tokens"] > 0 and ln["histogram"]["windows_active"] > 0
    lexicon = vader()
    for ln in lines:
        word = TRIGGERS[coordinate(ln)]
        assert ln["backend"] == "offline" and "offline" in ln["model"] and "no LLM" in ln["explanation"]
        assert f'"{word}"' in ln["explanation"]
        assert ln["label"] == int(word in lexicon)
        top = ln["records"][0]
        assert top["tokens"][top["discrete"].index(10)].strip() == word  # tokens carry their spaces
        for s in (ln["score"], ln["fuzz"]):
            assert s["accuracy"] == pytest.approx(np.mean(np.array(s["predictions"]) == np.array(s["truth"])))
            assert s["n_active"] > 0 and s["n_inactive"] > 0
        assert ln["fuzz"]["n_active"] == ln["fuzz"]["n_inactive"]  # each window twice: fired / random highlight
    scores = json.loads((Path(cfg.run_dir) / "explain" / "scores.json").read_text())
    assert scores["n_scored"] == len(lines)
    assert scores["mean"]["accuracy"] == pytest.approx(np.mean([ln["score"]["accuracy"] for ln in lines]))
    assert scores["mean"]["f1"] == pytest.approx(np.mean([ln["score"]["f1"] for ln in lines]))
    assert scores["fuzz"]["n_scored"] == len(lines)
    assert scores["fuzz"]["mean"]["accuracy"] == pytest.approx(np.mean([ln["fuzz"]["accuracy"] for ln in lines]))
    assert scores["explanations"] == {"ok": len(lines), NOT_EXPLAINED: len(every) - len(lines)}
    assert is_done(cfg, "explain")
    assert "offline" in capsys.readouterr().out
    want = sorted(k for k in range(cap) if TRIGGERS[k] in lexicon)
    assert related_features(cfg.run_dir) == {layer: want for layer in LAYERS}


def test_large_dictionary_features_are_read_with_large_dictionary_indices(cfg, template):
    """The authors' code indexed the large dictionary with small-dictionary indices: here that shows another word."""
    from irm.stages.explain import run

    run(cfg)
    data = template[1]
    for ln in lines_of(cfg):
        if ln["dictionary"] != "x2":
            continue
        j = ln["index"]
        assert TRIGGERS[PERM[j]] != TRIGGERS[j]
        if ln["status"] != NOT_EXPLAINED:
            assert f'"{TRIGGERS[PERM[j]]}"' in ln["explanation"] and f'"{TRIGGERS[j]}"' not in ln["explanation"]
        acts, token_ids, docs, pos = data[ln["layer"]]
        c = codes(acts, "x2")[:, j]
        assert ln["max_activation"] == pytest.approx(c.max(), rel=1e-6)
        for rec in ln["records"]:
            rows = np.flatnonzero((docs == rec["doc"]) & (pos >= rec["start"]) & (pos < rec["start"] +
                                                                                  len(rec["tokens"])))
            np.testing.assert_allclose(rec["activations"], c[rows], rtol=1e-6)
        assert ln["pair"] == {"dictionary": "x1", "index": PERM[j], "cosine": pytest.approx(1 - 0.01 * PERM[j])}


def test_each_layer_cache_is_read_in_one_pass_for_all_its_features(cfg, monkeypatch):
    from irm.activations import ActivationCache
    from irm.stages.explain import run

    passes = []
    original = ActivationCache.iter_batches

    def counted(self, *args, **kwargs):
        passes.append(self.dir.name)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(ActivationCache, "iter_batches", counted)
    run(cfg)
    assert sorted(passes) == [f"layer-{layer:02d}" for layer in LAYERS]


def test_rerun_asks_nothing_and_keeps_the_same_lines(cfg):
    from irm.stages.explain import run

    run(cfg)
    before = (Path(cfg.run_dir) / "explanations.jsonl").read_text()
    answers = (Path(cfg.run_dir) / "explain" / "answers.jsonl").read_text()
    run(cfg)
    assert (Path(cfg.run_dir) / "explanations.jsonl").read_text() == before
    assert (Path(cfg.run_dir) / "explain" / "answers.jsonl").read_text() == answers


def test_changed_settings_replace_stale_lines(cfg):
    from irm.stages.explain import run

    run(cfg)
    cfg.explain.n_top = 2
    run(cfg)
    lines = [ln for ln in lines_of(cfg) if ln["status"] != NOT_EXPLAINED]
    assert len(lines) == len({(ln["layer"], ln["dictionary"], ln["index"]) for ln in lines}) == 16
    assert all(sum(r["kind"] == "top" for r in ln["records"]) == 2 for ln in lines)


def test_missing_inputs_are_user_errors_naming_the_stage_to_run(cfg):
    from irm.stages.explain import run

    shutil.rmtree(Path(cfg.run_dir) / "rlhf")
    with pytest.raises(UserError, match="irm rlhf"):
        run(cfg)
    (Path(cfg.run_dir) / "mmcs.json").unlink()
    with pytest.raises(UserError, match="mmcs.json"):
        run(cfg)


def test_a_feature_index_beyond_the_dictionary_is_a_user_error(cfg):
    from irm.stages.explain import run

    path = Path(cfg.run_dir) / "mmcs.json"
    mmcs = json.loads(path.read_text())
    mmcs["layers"]["1"]["pairs"][0]["large"] = 99
    path.write_text(json.dumps(mmcs))
    with pytest.raises(UserError, match="feature 99 of layer 1's x2 dictionary"):
        run(cfg)


class ScriptedBackend:
    """An explainer that answers badly in the ways small models do: per feature (in a fixed rotation) the prompt's
    own example explanation, a list of tokens with activations, an empty answer, or a real explanation; it labels
    everything "related" and gives 3 detection verdicts whatever the number of texts."""

    name, model, params = "scripted", "bad-explainer", {}
    answers = ["years written as four-digit numbers, often release or production dates.",
               "the (2),  pleasant (6),  first (2), ...", "   ", "words of praise"]

    def __init__(self):
        self.explained = 0
        self.detect_calls = []

    def chat(self, messages):
        from irm.explain import prompts

        task = prompts.task_of(messages)
        if task == "explain":
            self.explained += 1
            return self.answers[(self.explained - 1) % len(self.answers)]
        if task == "label":
            return "1"
        self.detect_calls.append(messages)
        return "[1, 0, 1]"


def test_unusable_answers_are_counted_shown_and_never_labelled_related(cfg, monkeypatch, capsys):
    from irm.explain import explained_features, prompts, related_features
    from irm.stages import explain as stage

    backend = ScriptedBackend()
    monkeypatch.setattr(stage, "make_backend", lambda *a, **k: backend)
    cfg.explain.concurrency = 1  # the rotation above then runs in a known order
    stage.run(cfg)
    lines = lines_of(cfg)
    by_status = {}
    for ln in lines:
        by_status.setdefault(ln["status"].split(":")[0], []).append(ln)
    assert set(by_status) == {"echo", "unparseable", "ok", NOT_EXPLAINED}
    for ln in by_status["echo"] + by_status["unparseable"]:
        assert ln["label"] is None and ln["explanation"] is None and ln["score"] is None
        assert "label_answer" not in ln  # never even asked
    assert {ln["rejected_explanation"] for ln in by_status["echo"]} == {ScriptedBackend.answers[0]}
    for ln in by_status["ok"]:
        assert ln["explanation"] == "words of praise" and ln["label"] == 1
        s = ln["score"]
        assert s["accuracy"] is None and s["retried"] and "first: 3" in s["unscored_reason"]
    # Every detection and fuzzing request was asked twice (once more with the stricter format), then given up on.
    assert len(backend.detect_calls) == 2 * 2 * len(by_status["ok"])
    tasks = [prompts.task_of(m[:-2] if len(m) > 4 else m) for m in backend.detect_calls]  # a retry: 2 turns more
    assert sorted(tasks) == sorted(["detect", "fuzz"] * 2 * len(by_status["ok"]))
    related = related_features(cfg.run_dir)
    assert sum(map(len, related.values())) == sum(ln["role"] == "small" for ln in by_status["ok"])
    assert explained_features(cfg.run_dir, 0) == {layer: [] for layer in related}
    scores = json.loads((Path(cfg.run_dir) / "explain" / "scores.json").read_text())
    assert scores["explanations"]["ok"] == len(by_status["ok"])
    assert sum(v for k, v in scores["explanations"].items() if k.startswith("echo")) == len(by_status["echo"])
    assert scores["n_unparsed"] == scores["n_retried"] == len(by_status["ok"]) and scores["n_scored"] == 0
    out = capsys.readouterr().out
    assert "not usable" in out and "echo" in out


def test_related_features_without_explanations_is_a_user_error(tmp_path):
    from irm.explain import related_features

    with pytest.raises(UserError, match="irm explain"):
        related_features(tmp_path)



@pytest.mark.slow
def test_the_embedded_local_model_runs_the_stage_and_its_unusable_answers_are_flagged(in_tmp, template):
    """configs/quickstart.yaml's explain section with backend local (SmolLM2-135M-Instruct in process) on one layer
    of the test run: every answer is either an explanation or flagged with a status and never labelled; a rerun
    sends nothing to the model."""
    from conftest import ROOT
    from irm.cli import parse_config
    from irm.stages.explain import run

    cfg = parse_config("explain", ["--config", str(ROOT / "configs" / "quickstart.yaml"), "--run_dir",
                                   str(in_tmp / "run"), "--device", "cpu", "--explain.backend", "local",
                                   "--explain.max_features", "1", "--explain.max_new_tokens", "40"])
    shutil.copytree(template[0], cfg.run_dir)
    path = Path(cfg.run_dir) / "mmcs.json"
    mmcs = json.loads(path.read_text())
    path.write_text(json.dumps({"layers": {"1": mmcs["layers"]["1"]}}))
    run(cfg)
    lines = [ln for ln in lines_of(cfg) if ln["status"] != NOT_EXPLAINED]
    assert len(lines) == 2 * cfg.explain.max_features
    for ln in lines:
        assert ln["backend"] == "local" and ln["model"] == "smollm2-135m-instruct"
        assert ln["explanation_answer"].strip() and ln["label"] in (0, 1, None)
        if ln["explanation"] is None:
            assert ln["label"] is None and ln["status"] != "ok"
        else:  # a usable explanation was asked about, and its label is what the model's label answer says
            assert "label_answer" in ln
            first = ln["label_answer"].strip().lstrip("*").strip()[:1]
            if first in ("0", "1"):
                assert ln["label"] == int(first), ln["label_answer"]
    answers = (Path(cfg.run_dir) / "explain" / "answers.jsonl").read_text()
    assert answers
    run(cfg)
    assert (Path(cfg.run_dir) / "explain" / "answers.jsonl").read_text() == answers


def test_logit_lens_is_the_unembedding_times_the_unit_decoder_row(tmp_path):
    """Against numpy on a saved tiny GPT-NeoX: W_U with the final LayerNorm's gain, times the unit decoder row."""
    import torch

    from irm.config import ModelConfig
    from irm.explain.features import LOGIT_LENS_TOKENS, logit_lenses, unembedding
    from irm.models import load_model

    model, tokenizer = load_model(ModelConfig(name="tiny-gpt-neox", tiny_layers=2, tiny_d_model=32), seed=0)
    with torch.no_grad():
        model.gpt_neox.final_layer_norm.weight.uniform_(0.5, 2.0)
    model.save_pretrained(tmp_path / "rlhf" / "policy")
    w, how = unembedding(tmp_path, "cpu")
    assert "final_layer_norm" in how
    d = np.random.default_rng(0).normal(size=32)
    lens = logit_lenses(torch.tensor(d)[None, :], w, how, lambda i: f"t{i}")[0]
    w_u = model.get_output_embeddings().weight.detach().double().numpy()
    gain = model.gpt_neox.final_layer_norm.weight.detach().double().numpy()
    ref = (w_u * gain) @ (d / np.linalg.norm(d))
    order = np.argsort(-ref)
    assert [t for t, _ in lens["promoted"]] == [f"t{i}" for i in order[:LOGIT_LENS_TOKENS]]
    assert [t for t, _ in lens["suppressed"]] == [f"t{i}" for i in order[::-1][:LOGIT_LENS_TOKENS]]
    np.testing.assert_allclose([v for _, v in lens["promoted"]], ref[order[:LOGIT_LENS_TOKENS]], rtol=1e-4)
    # Without weights, or with decoder rows of another width, the dashboard says why instead.
    assert unembedding(tmp_path / "nothing", "cpu")[0] is None
    assert logit_lenses(torch.zeros(1, 64), w, how, str)[0]["method"] is None


def test_histogram_counts_the_windows_where_the_feature_fires():
    from irm.explain.features import histogram

    maxima = np.array([0.0, 0.0, 0.5, 1.0, 2.0, 4.0])
    h = histogram(maxima, 24)
    counts, edges = np.histogram([0.5, 1.0, 2.0, 4.0], bins=len(h["counts"]), range=(0, 4.0))
    assert h["counts"] == counts.tolist() and h["edges"] == pytest.approx(edges.tolist())
    assert h["windows_active"] == 4 and h["windows"] == 6
