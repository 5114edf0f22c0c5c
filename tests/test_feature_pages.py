"""Feature pages (issue 24.4) and fuzzing with at-chance marks (issue 24.6): every feature of mmcs.json's pairs gets
a page (density, top and quantile windows, logit effect, explanation and scores) in report.html and in SAEDashboard's
Neuronpedia JSON; detection and fuzzing scores carry a Clopper-Pearson interval and an at-chance mark. Checked
against hand-worked numbers, numpy counts of the test run directory's codes, scipy's beta quantiles and
SAEDashboard's own schema (its loader class when installed, the schema written out below otherwise)."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from explain_rundir import LAYERS, PERM, build_run, codes
from irm.artifacts import read_jsonl
from irm.explain import prompts, scoring

# --- scores -------------------------------------------------------------------------------------------------------


def hand_metrics(pred, truth):
    """Accuracy, precision, recall, F1 counted one pair at a time (0 for a ratio with nothing to count)."""
    tp = fp = fn = tn = 0
    for p, t in zip(pred, truth):
        if p and t:
            tp += 1
        elif p and not t:
            fp += 1
        elif t:
            fn += 1
        else:
            tn += 1
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"accuracy": (tp + tn) / len(truth), "precision": precision, "recall": recall, "f1": f1}


@pytest.mark.parametrize("seed", range(6))
def test_torchmetrics_detection_metrics_equal_a_hand_count(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 30))
    truth = rng.integers(0, 2, n).tolist()
    pred = ([0] * n if seed == 0 else [1] * n if seed == 1 else rng.integers(0, 2, n).tolist())
    got = scoring.metrics(pred, truth)
    for key, want in hand_metrics(pred, truth).items():
        assert got[key] == pytest.approx(want, abs=1e-6), key


def test_metrics_hand_worked():
    # tp 2, fp 1, fn 1, tn 1: accuracy 3/5, precision 2/3, recall 2/3, F1 2/3; no positive guess: all ratios 0
    assert scoring.metrics([1, 1, 1, 0, 0], [1, 1, 0, 1, 0]) == pytest.approx(
        {"accuracy": 0.6, "precision": 2 / 3, "recall": 2 / 3, "f1": 2 / 3})
    assert scoring.metrics([0, 0], [1, 0]) == {"accuracy": 0.5, "precision": 0.0, "recall": 0.0, "f1": 0.0}


@pytest.mark.parametrize("k,n,at_chance", [(10, 10, False), (9, 10, False), (8, 10, True), (5, 10, True),
                                           (1, 10, False), (0, 10, False), (3, 4, True), (14, 20, True),
                                           (15, 20, False)])
def test_clopper_pearson_interval_and_at_chance(k, n, at_chance):
    from scipy.stats import beta

    lo = beta.ppf(0.025, k, n - k + 1) if k > 0 else 0.0
    hi = beta.ppf(0.975, k + 1, n - k) if k < n else 1.0
    got = scoring.chance_interval(k, n)
    assert got["ci95"] == pytest.approx([lo, hi], abs=1e-9)
    assert got["at_chance"] is at_chance and at_chance == bool(lo <= 0.5 <= hi)


def test_a_score_carries_its_interval_and_the_summary_marks_means_at_chance():
    truth = [1, 0, 1, 0, 1, 0, 1, 0, 1, 0]
    perfect = scoring.score(lambda m: str(truth), "x", ["t"] * 10, truth)
    guess = scoring.score(lambda m: str([1] * 10), "x", ["t"] * 10, truth)
    assert perfect["accuracy"] == 1.0 and perfect["at_chance"] is False
    assert guess["accuracy"] == 0.5 and guess["at_chance"] is True and guess["ci95"][0] < 0.5 < guess["ci95"][1]
    line = lambda i, s: {"layer": 1, "dictionary": "x1", "index": i, "score": s, "fuzz": s}  # noqa: E731
    summary = scoring.summarise([line(0, perfect), line(1, guess), line(2, perfect)])
    for s in (summary, summary["fuzz"]):
        assert s["n_scored"] == 3 and s["n_at_chance"] == 1
        accs = np.array([1.0, 0.5, 1.0])
        half = 4.302652729911275 * accs.std(ddof=1) / np.sqrt(3)  # t(0.975, 2)
        assert s["accuracy_ci95"] == pytest.approx([accs.mean() - half, accs.mean() + half])
        assert s["at_chance"] is True  # the interval over 3 features reaches below 0.5
    assert summary["features"][1]["at_chance"] is True and summary["features"][0]["at_chance"] is False


# --- fuzzing ------------------------------------------------------------------------------------------------------


def test_fuzz_set_highlights_the_firing_tokens_or_as_many_random_quiet_ones():
    windows = [([" the", " great", " film", " was", " great"], np.array([0.0, 2.0, 0.0, 0.0, 1.0])),
               ([" a", " dull", " plot"], np.array([0.0, 0.5, 0.0])),
               ([" all", " fire"], np.array([1.0, 2.0]))]  # fires everywhere: cannot be fuzzed
    texts, truth = scoring.fuzz_set(windows, np.random.default_rng(0))
    assert sorted(truth) == [0, 0, 1, 1]
    right = sorted(t for t, y in zip(texts, truth) if y == 1)
    assert right == [" a <<dull>> plot", " the <<great>> film was <<great>>"]
    wrong = [t for t, y in zip(texts, truth) if y == 0]
    for text in wrong:
        marked = prompts.read_highlights(text)
        assert marked and not {"great", "dull"} & set(" ".join(marked).split())
        plain = text.replace("<<", "").replace(">>", "")
        assert plain in (" the great film was great", " a dull plot")
        if plain.startswith(" the"):
            assert len(" ".join(marked).split()) == 2  # as many random tokens as fire (2)


def test_highlight_keeps_spaces_outside_the_marks_and_joins_word_level_tokens():
    assert prompts.highlight([" the", " great", " film"], [False, True, True]) == " the <<great film>>"
    assert prompts.highlight(["the", "great", "film"], [True, False, True], " ") == "<<the>> great <<film>>"


def test_offline_backend_answers_fuzzing_by_the_highlighted_words():
    from irm.explain.backends import OfflineBackend

    texts = ["the <<great>> film", "the great <<film>>", "<<the great>> film"]
    messages = prompts.fuzz_messages('top-activating tokens "great" (100%)', texts)
    assert prompts.task_of(messages) == "fuzz"
    answer = OfflineBackend().chat(messages)
    assert prompts.parse_detection(answer, 3) == [1, 0, 1]


# --- the stage's pages and the Neuronpedia export -----------------------------------------------------------------

# sae-dashboard 0.8.0's NeuronpediaDashboardBatch / Feature / Activation fields (sae_dashboard/neuronpedia/
# neuronpedia_dashboard.py), written out: its loader passes every key to the constructor, so another key fails.
NUMBER = {"type": "number"}
NUMBERS = {"type": "array", "items": NUMBER}
STRINGS = {"type": "array", "items": {"type": "string"}}
ACTIVATION = {"type": "object", "additionalProperties": False, "required": ["bin_min", "bin_max", "bin_contains",
                                                                             "tokens", "values"],
              "properties": {"bin_min": NUMBER, "bin_max": NUMBER, "bin_contains": NUMBER, "tokens": STRINGS,
                             "values": NUMBERS, "qualifying_token_index": {"type": "integer"},
                             "dfa_values": NUMBERS, "dfa_maxValue": NUMBER,
                             "dfa_targetIndex": {"type": "integer"}}}
FEATURE = {"type": "object", "additionalProperties": False, "required": ["feature_index", "activations"],
           "properties": {
               "feature_index": {"type": "integer"},
               **{k: {"type": "array", "items": {"type": "integer"}}
                  for k in ("neuron_alignment_indices", "correlated_neurons_indices", "correlated_features_indices")},
               **{k: NUMBERS for k in ("neuron_alignment_values", "neuron_alignment_l1", "correlated_neurons_l1",
                                       "correlated_neurons_pearson", "correlated_features_l1",
                                       "correlated_features_pearson", "neg_values", "pos_values",
                                       "freq_hist_data_bar_values", "freq_hist_data_bar_heights",
                                       "logits_hist_data_bar_heights", "logits_hist_data_bar_values",
                                       "decoder_weights_dist", "vector")},
               "neg_str": STRINGS, "pos_str": STRINGS, "frac_nonzero": NUMBER,
               "n_prompts_total": {"type": "integer"}, "n_tokens_in_prompt": {"type": "integer"},
               "dataset": {"type": "string"}, "activations": {"type": "array", "items": ACTIVATION}}}
BATCH = {"type": "object", "additionalProperties": False, "required": ["model_id", "layer", "sae_set", "features"],
         "properties": {"model_id": {"type": "string"}, "layer": {"type": "integer"}, "sae_set": {"type": "string"},
                        "sae_id_suffix": {"type": ["string", "null"]},
                        "features": {"type": "array", "items": FEATURE}}}


@pytest.fixture(scope="module")
def ran(tmp_path_factory):
    """The explain stage run once on the tiny config over the test run directory (tests/explain_rundir.py); tests
    that change its files work on a copy."""
    from conftest import TINY_YAML
    from irm.cli import parse_config
    from irm.stages.explain import run
    from irm.sae import sae_dir
    from irm.sae.export import write_sparsity

    root = tmp_path_factory.mktemp("pages")
    cfg = parse_config("pipeline", ["--config", str(TINY_YAML), "--run_dir", str(root / "run"),
                                    "--log_dir", str(root / "logs")])
    data = build_run(root / "run", n_docs=150)
    held_out = np.linspace(0.01, 0.08, 8)  # the sae stage's held-out frequencies, for layer 1's x1 only
    write_sparsity(sae_dir(cfg.run_dir, 1, 1), held_out)
    run(cfg)
    return cfg, data, held_out


def copy_of(ran, tmp_path):
    import dataclasses

    cfg = dataclasses.replace(ran[0], run_dir=str(tmp_path / "run"), log_dir=str(tmp_path / "logs"))
    shutil.copytree(ran[0].run_dir, cfg.run_dir)
    return cfg


def test_every_shared_feature_has_its_density_from_the_cache_and_the_sparsity_file(ran):
    cfg, data, held_out = ran
    lines = read_jsonl(Path(cfg.run_dir) / "explanations.jsonl")
    assert len(lines) == 2 * 2 * len(PERM)  # every feature of both dictionaries' pairs, in both layers
    for ln in lines:
        acts = data[ln["layer"]][0]
        c = codes(acts, ln["dictionary"])[:, ln["index"]]
        d = ln["density"]
        assert d["tokens_active"] == int((c > 0).sum()) and d["tokens_total"] == len(c)
        assert d["tokens"] == pytest.approx((c > 0).mean())
        assert d["windows"] == pytest.approx(ln["histogram"]["windows_active"] / ln["histogram"]["windows"])
        if ln["layer"] == 1 and ln["dictionary"] == "x1":
            assert d["held_out"] == pytest.approx(held_out[ln["index"]], rel=1e-5)
        else:
            assert d["held_out"] is None
        quantiles = [r for r in ln["records"] if r["kind"] == "quantile"]
        assert len(quantiles) == cfg.explain.n_quantile
        for r in quantiles:  # its window's maximum lies in the bin it was drawn from
            lo, hi, share = r["bin"]
            assert lo - 1e-6 <= max(r["activations"]) <= hi + 1e-6 and 0 < share < 1


def test_the_neuronpedia_export_has_saedashboard_schema_and_the_lines_numbers(ran):
    import jsonschema

    from irm.explain import neuronpedia
    from irm.stages import artifact

    cfg = ran[0]
    root = artifact(cfg.run_dir, "neuronpedia")
    lines = {(ln["layer"], ln["dictionary"], ln["index"]): ln
             for ln in read_jsonl(Path(cfg.run_dir) / "explanations.jsonl")}
    folders = sorted(p.name for p in root.iterdir())
    assert folders == [f"layer-{layer:02d}-{d}" for layer in LAYERS for d in ("x1", "x2")]
    for layer in LAYERS:
        for d in ("x1", "x2"):
            batch = json.loads((root / neuronpedia.folder(layer, d) / neuronpedia.BATCH).read_text())
            jsonschema.validate(batch, BATCH)
            assert batch["layer"] == layer and batch["sae_set"] == f"irm-{d}"
            assert batch["model_id"] == cfg.model.name  # the SAEs' cfg.json name (a tiny model keeps its alias)
            assert len(batch["features"]) == len(PERM)
            for f in batch["features"]:
                ln = lines[(layer, d, f["feature_index"])]
                assert f["frac_nonzero"] == ln["density"]["tokens"]
                assert f["freq_hist_data_bar_heights"] == ln["histogram"]["counts"]
                assert [a["tokens"] for a in f["activations"]] == [r["tokens"] for r in ln["records"]]
                for a in f["activations"]:
                    assert a["values"][a["qualifying_token_index"]] == max(a["values"])
                top = [a for a in f["activations"] if a["bin_min"] == -1]
                assert len(top) == sum(r["kind"] == "top" for r in ln["records"])
                assert all(a["bin_max"] == pytest.approx(ln["max_activation"]) for a in top)
            rows = read_jsonl(root / neuronpedia.folder(layer, d) / neuronpedia.EXPLANATION_ROWS)
            explained = sorted(i for (la, di, i), ln in lines.items() if la == layer and di == d and ln["explanation"])
            assert [int(r["index"]) for r in rows] == explained
            assert all(r["layer"] == f"{layer}-irm-{d}" and r["description"] for r in rows)


def test_the_export_opens_in_saedashboards_own_loader(ran):
    loader = pytest.importorskip("sae_dashboard.neuronpedia.neuronpedia_dashboard",
                                 reason="pip install --no-deps sae-dashboard (its loader needs only numpy)")
    from irm.explain import neuronpedia
    from irm.stages import artifact

    path = artifact(ran[0].run_dir, "neuronpedia") / neuronpedia.folder(1, "x1") / neuronpedia.BATCH
    data = json.loads(path.read_text())
    batch = loader.NeuronpediaDashboardBatch(**data)
    assert len(batch.features) == len(PERM)
    assert batch.to_dict()["features"][0]["activations"] == data["features"][0]["activations"]


def test_logit_effect_goes_to_pos_and_neg_fields():
    from irm.config import RunConfig
    from irm.explain import neuronpedia

    line = {"index": 3, "max_activation": 2.0, "density": {"tokens": 0.25},
            "histogram": {"edges": [0.0, 1.0, 2.0], "counts": [3, 1], "windows": 10},
            "logit_lens": {"promoted": [[" good", 1.5], [" fine", 0.5]], "suppressed": [[" bad", -2.0]],
                           "histogram": {"edges": [-2.0, 0.0, 2.0], "counts": [7, 9]}},
            "records": [{"kind": "top", "tokens": ["a"], "activations": [2.0]},
                        {"kind": "quantile", "tokens": ["b"], "activations": [0.5], "bin": [0.2, 0.6, 0.4]}]}
    f = neuronpedia.feature(line, RunConfig())
    assert (f["pos_str"], f["pos_values"], f["neg_str"], f["neg_values"]) == ([" good", " fine"], [1.5, 0.5],
                                                                             [" bad"], [-2.0])
    assert f["freq_hist_data_bar_values"] == [0.5, 1.5] and f["logits_hist_data_bar_values"] == [-1.0, 1.0]
    assert f["logits_hist_data_bar_heights"] == [7, 9] and f["n_prompts_total"] == 10
    assert [(a["bin_min"], a["bin_max"], a["bin_contains"]) for a in f["activations"]] == [(-1, 2.0, -1),
                                                                                            (0.2, 0.6, 0.4)]


def test_report_pages_for_features_beyond_the_cap_and_at_chance_marks(ran, tmp_path):
    import re

    from irm.report import Doc, ReportInputs, features_section

    cfg = copy_of(ran, tmp_path)
    path = Path(cfg.run_dir) / "explanations.jsonl"
    lines = read_jsonl(path)
    ok = next(ln for ln in lines if ln["status"] == "ok")
    ok["fuzz"]["at_chance"] = True  # one fuzzing score at chance
    path.write_text("".join(json.dumps(ln) + "\n" for ln in lines))
    doc = Doc()
    features_section(doc, ReportInputs.read(cfg, Path(cfg.run_dir), Path(cfg.run_dir)))
    html, md = "\n".join(doc.html), "\n".join(doc.md)
    boards = re.findall(r'<div class="fd" id="feature-(\d+)-(x\d)-(\d+)"', html)
    assert len(boards) == len(lines)  # a page for every shared feature, explained or not
    assert "16 more features of the shared pairs have a page below but no explanation" in md
    assert html.count('class="tag chance"') == sum(bool((ln.get("score") or {}).get("at_chance"))
                                                   + bool((ln.get("fuzz") or {}).get("at_chance")) for ln in lines)
    assert "(at chance)" in md and "Activation density: fires on" in html and "Quantile windows" in html
    assert "drawn from windows with max" in html


@pytest.mark.slow
def test_report_html_renders_in_headless_chromium(ran, tmp_path):
    """The report's pages as a browser draws them: a screenshot (folded groups unfolded) under the test's tmp dir, kept
    for a reader to look at, not blank, and the page as Chromium parsed it holds every feature page."""
    import subprocess

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("no chromium (apt-get install -y chromium)")
    from irm.stages.report import run as report

    cfg = copy_of(ran, tmp_path)
    report(cfg)
    html = Path(cfg.run_dir) / "report.html"
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}"]
    shot = tmp_path / "report.png"
    opened = tmp_path / "report_open.html"  # the folded groups of pages unfolded, so the screenshot shows them
    opened.write_text(html.read_text(encoding="utf-8").replace("<details>", "<details open>"), encoding="utf-8")
    subprocess.run([chromium, *flags, f"--screenshot={shot}", "--window-size=1280,4000", opened.as_uri()],
                   check=True, capture_output=True, timeout=120)
    dom = subprocess.run([chromium, *flags, "--dump-dom", html.as_uri()], check=True, capture_output=True,
                         timeout=120, text=True).stdout
    from PIL import Image

    image = np.asarray(Image.open(shot).convert("RGB"))
    assert image.shape[:2] == (4000, 1280) and image.std() > 5  # something drawn, not a blank page
    n = len(read_jsonl(Path(cfg.run_dir) / "explanations.jsonl"))
    assert dom.count('class="fd"') == n and "Feature dashboards" in dom
    print(f"screenshot: {shot}")


def test_logit_lenses_in_chunks_equal_numpy_per_direction(monkeypatch):
    import torch

    from irm.explain import features

    monkeypatch.setattr(features, "LENS_CHUNK", 2)  # 5 directions: chunks of 2, 2 and 1
    rng = np.random.default_rng(3)
    w_VD, d_FD = rng.normal(size=(40, 6)), rng.normal(size=(5, 6))
    lenses = features.logit_lenses(torch.tensor(d_FD), torch.tensor(w_VD, dtype=torch.float32), "how", str)
    for d, lens in zip(d_FD, lenses):
        logits = w_VD @ (d / np.linalg.norm(d))
        order = np.argsort(-logits)
        assert [int(t) for t, _ in lens["promoted"]] == order[:features.LOGIT_LENS_TOKENS].tolist()
        assert [int(t) for t, _ in lens["suppressed"]] == order[::-1][:features.LOGIT_LENS_TOKENS].tolist()
        np.testing.assert_allclose([v for _, v in lens["promoted"]], logits[order[:features.LOGIT_LENS_TOKENS]],
                                   rtol=1e-5)
        counts, edges = np.histogram(logits, bins=features.HISTOGRAM_BINS)
        assert lens["histogram"]["counts"] == counts.tolist()
        np.testing.assert_allclose(lens["histogram"]["edges"], edges, rtol=1e-5, atol=1e-6)
