"""The run report from a hand-made run directory: its tables carry the artifacts' numbers, strings and dicts read as
text rather than JSON, every plot is drawn, inlined in the HTML and linked from the Markdown, and the SAE curves
come back from TensorBoard with every logged point, once."""

import csv
import json
import re
from pathlib import Path

import pytest

from irm.config import RunConfig
from irm.stages.report import run
from irm.report.plots import sae_curves

FEATURES = {"2": [18], "3": [422, 7]}


def _write(root: Path, name: str, obj) -> None:
    (root / name).write_text(json.dumps(obj), encoding="utf-8")


@pytest.fixture
def made(tmp_path):
    """A run directory holding one hand-written artifact per stage the report reads, and its SAE event files."""
    cfg = RunConfig(run_dir=str(tmp_path / "run"), log_dir=str(tmp_path / "tb"))
    root = Path(cfg.run_dir)
    root.mkdir()
    (root / "config.yaml").write_text("run_dir: run\nseed: 0\n", encoding="utf-8")
    ci = [0.1, 0.3]
    _write(root, "reward_eval.json", {
        "base": {"mean": 0.125, "ci95": ci, "n": 8}, "tuned": {"mean": 0.4375, "ci95": ci, "n": 8},
        "difference": {"mean": 0.3125, "ci95": ci, "n": 8, "p_value": 0.02}, "new_tokens": 8, "prefix_tokens": 8,
        "examples": [{"prefix": "the film", "base": " was bad", "base_reward": -1.5, "tuned": " was great",
                      "tuned_reward": 2.25}]})
    _write(root, "divergence.json", {"values": [0.2601, 0.2652, 0.2613, 0.2677], "top_k": [3, 1], "k": 2,
                                     "measure": "sum of Frobenius norms"})
    _write(root, "mmcs.json", {"layers": {"2": {"max": 0.625, "hungarian": 0.5, "sizes": [64, 128]},
                                          "3": {"max": 0.75, "hungarian": 0.25, "sizes": [64, 128]}}})
    (root / "explanations.jsonl").write_text(
        json.dumps({"layer": 2, "dictionary": "x1", "index": 18, "explanation": "praise of acting", "label": 1,
                    "score": {"accuracy": 0.8}, "backend": "offline", "model": None}) + "\n"
        + json.dumps({"layer": 3, "dictionary": "x1", "index": 422, "explanation": "dates", "label": 0,
                      "score": {"accuracy": None}, "backend": "offline", "model": None}) + "\n", encoding="utf-8")
    with open(root / "lexicon.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=["word", "true", "reconstructed", "raw", "heldout", "seen"])
        w.writeheader()
        for i, word in enumerate(["awful", "bad", "fine", "good", "great"]):
            w.writerow({"word": word, "true": i - 2.0, "reconstructed": 1.5 * (i - 2), "raw": 10.0 * (i - 2),
                        "heldout": i % 2, "seen": 1 - i % 2})
    _write(root, "kendall.json", {
        "all": {"n": 5, "tau": 0.875, "p": 0.0, "ci95": [0.5, 1.0]},
        "negative": {"n": 2, "tau": 1.0, "p": 0.5, "ci95": None},
        "heldout": {"n": 2, "tau": 0.625, "p": 1.25e-85, "ci95": [0.25, 0.75]},
        "sign_agreement": 0.8, "mapping": {"bound": 4.0}})
    _write(root, "validation.json", {
        "inputs": "every token position of each text", "n_inputs": 40, "threshold": 3.0, "n_inputs_above": 12,
        "related": FEATURES, "related_frequency": 0.4375, "average_frequency": 0.3125,
        "per_layer": {"2": {"n_related": 1, "related_frequency": 0.5625, "average_frequency": 0.1875}}})
    before = {"mean": -0.0625, "ci95": [-0.25, 0.125]}
    cond = {"mean": 0.0625, "ci95": [-0.125, 0.25], "diff_vs_before": {"mean": 0.125, "ci95": [0.0, 0.25]}}
    _write(root, "ablation.json", {
        "n_prompts": 16, "n_features": 3, "features": FEATURES, "random_draws": 2, "before": before,
        "after": {"mean": 0.0625}, "modes": {"reconstruction": {c: cond for c in ("splice", "ablated", "random")},
                                              "error": {c: cond for c in ("splice", "ablated", "random")}}})
    from torch.utils.tensorboard import SummaryWriter

    for layer in (2, 3):
        writer = SummaryWriter(str(Path(cfg.log_dir) / "run" / "sae" / f"layer-{layer:02d}"))
        for step in range(0, 100, 4):
            for d in ("x1", "x2"):
                writer.add_scalar(f"train/{d}/mse", 1.0 / (step + 1), step)
                writer.add_scalar(f"train/{d}/nmse", 0.5 / (step + 1), step)
                writer.add_scalar(f"train/{d}/l0", 10.0 + step, step)
                writer.add_scalar(f"train/{d}/l1", 99.0, step)
            writer.add_scalar("train/loss", 2.0, step)
        writer.add_scalar("val/x1/mse", 0.02, 99)
        writer.close()
    resumed = SummaryWriter(str(Path(cfg.log_dir) / "run" / "sae" / "layer-02"))  # a second event file, one directory
    for step in (100, 104):
        resumed.add_scalar("train/x1/mse", 0.01, step)
    resumed.close()
    summary = run(cfg)
    return root, summary, (root / "report.md").read_text(encoding="utf-8"), (root / "report.html").read_text(
        encoding="utf-8")


def test_tables_show_the_numbers_of_the_summary(made):
    _, s, md, _ = made
    assert f"| tuned | {s['reward']['tuned_mean']:.3f} |" in md
    assert f"| all | 5 | {s['kendall']['all']['tau']:.3f} |" in md
    for layer, v in s["mmcs"].items():
        assert f"| {layer} | 64 | 128 | {v['max']:.3f} | {v['hungarian']:.3f} |" in md
    assert f"| tuned model, no splice (before) | {s['ablation']['before']:.3f} |" in md
    assert f"{s['validation']['related_frequency']:.3f}" in md and f"| {s['validation']['n_inputs_above']} |" in md


def test_summary_holds_the_artifacts_numbers_and_is_built_from_the_tables_the_report_renders(made):
    """summary.json's numbers equal the artifacts' (read here with json, not through irm), and they come from the
    table objects the report renders: a value changed in one table object shows in both the summary and the table."""
    from irm.report import Doc, ReportInputs, build_summary, reward_section

    root, s, _, _ = made
    art = {name: json.loads((root / name).read_text()) for name in ("reward_eval.json", "kendall.json", "mmcs.json",
                                                                    "validation.json", "ablation.json")}
    assert s["reward"] | {"paired_difference_tuned_minus_base": None} == {
        "base_mean": 0.125, "tuned_mean": 0.4375, "base_ci95": [0.1, 0.3], "tuned_ci95": [0.1, 0.3],
        "paired_difference_tuned_minus_base": None}
    assert s["kendall"] == {k: {f: art["kendall.json"][k].get(f) for f in ("tau", "p", "ci95", "n")}
                            for k in ("all", "negative", "heldout")}
    assert {layer: (v["max"], v["hungarian"]) for layer, v in s["mmcs"].items()} == {
        layer: (v["max"], v["hungarian"]) for layer, v in art["mmcs.json"]["layers"].items()}
    assert s["ablation"]["before"] == -0.0625 and s["ablation"]["after"] == 0.0625 and s["ablation"]["n_features"] == 3
    assert s["validation"]["related_frequency"] == 0.4375 and s["validation"]["n_inputs_above"] == 12

    inputs = ReportInputs.read(RunConfig(run_dir=str(root)), root, root / "plots")
    inputs.tables["reward"].rows["tuned"]["mean"] = 9.8125
    doc = Doc()
    reward_section(doc, inputs)
    assert build_summary(inputs)["reward"]["tuned_mean"] == 9.8125 and "| tuned | 9.812 |" in "\n".join(doc.md)


def test_strings_and_dicts_in_tables_are_text_not_json(made):
    _, _, md, page = made
    assert "| inputs | every token position of each text |" in md
    assert "layer 2: 18; layer 3: 422, 7" in md
    for text in (md, page):
        assert '"every token' not in text and '{"2"' not in text and "&quot;every" not in text


def test_a_p_value_that_underflowed_to_zero_is_not_printed_as_zero(made):
    _, _, md, _ = made
    assert "| all | 5 | 0.875 | < 1e-300 |" in md
    assert "1.25e-85" in md


def test_every_plot_is_drawn_linked_from_the_markdown_and_inlined_in_the_html(made):
    root, _, md, page = made
    links = re.findall(r"!\[[^]]*\]\(([^)]+)\)", md)
    assert sorted(Path(p).name for p in links) == ["ablation.png", "layer_divergence.png", "lexicon_scatter.png",
                                                   "sae_loss.png"]
    for p in links:
        assert (root / p).is_file(), p
    assert page.count('src="data:image/png;base64,') == len(links)
    assert not re.search(r'src="(?!data:)', page)


def test_divergence_table_marks_the_chosen_layers(made):
    _, _, md, _ = made
    assert "| 3 | 0.2677 | yes |" in md and "| 1 | 0.2652 | yes |" in md and "| 0 | 0.2601 |  |" in md


def test_sae_curves_hold_every_logged_point_of_the_plotted_metrics(made, tmp_path):
    curves = sae_curves(RunConfig(run_dir=str(tmp_path / "run"), log_dir=str(tmp_path / "tb")))
    assert sorted(curves) == ["layer-02", "layer-03"]
    tags = curves["layer-02"]
    assert set(tags) == {f"train/{d}/{m}" for d in ("x1", "x2") for m in ("mse", "nmse", "l0")} | {"val/x1/mse"}
    assert [s for s, _ in tags["train/x1/mse"]] == list(range(0, 100, 4)) + [100, 104]  # each point once
    assert [s for s, _ in curves["layer-03"]["train/x1/mse"]] == list(range(0, 100, 4))
    assert tags["train/x2/nmse"][1] == (4, pytest.approx(0.1))
