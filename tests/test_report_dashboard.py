"""The report's feature dashboards (issue 14.4), validation lift and ablation paired differences, from a hand-made
run directory: each explained feature gets a self-contained dashboard (tokens shaded by activation / the feature's
peak, a histogram with one bar per bin, the logit lens), unusable answers are shown as such, and the headline
numbers appear as the artifacts hold them."""

import json
import re
from pathlib import Path

import pytest

from irm.config import RunConfig
from irm.stages.report import run


def feature(index, label, status="ok", **extra):
    return {"layer": 2, "dictionary": "x1", "role": "small", "index": index, "label": label, "status": status,
            "explanation": extra.pop("explanation", "praise of acting"), "score": {"accuracy": 0.75},
            "backend": "offline", "model": "offline-top-token-summary", "max_activation": 4.0,
            "label_method": "rule, no LLM", "pair": {"dictionary": "x2", "index": 3, "cosine": 0.9},
            "records": [{"kind": "top", "tokens": ["the", " great", " film"], "activations": [0.0, 4.0, 1.0],
                         "discrete": [0, 10, 3]},
                        {"kind": "quantile", "tokens": ["a"], "activations": [0.5], "discrete": [1]}],
            "histogram": {"edges": [0.0, 1.0, 2.0, 3.0, 4.0], "counts": [5, 0, 2, 1], "windows_active": 8,
                          "windows": 20, "of": "max per window"},
            "logit_lens": {"method": "W_U @ unit decoder row", "promoted": [[" superb", 2.5], [" <&>", 1.0]],
                           "suppressed": [[" awful", -3.0], [" dull", -1.5]]},
            **extra}


@pytest.fixture
def made(tmp_path):
    cfg = RunConfig(run_dir=str(tmp_path / "run"), log_dir=str(tmp_path / "tb"))
    root = Path(cfg.run_dir)
    root.mkdir()
    lines = [feature(18, 1), feature(7, 0, explanation="dates"),
             feature(9, None, "echo: repeats the prompt's example explanation word for word", explanation=None,
                     rejected_explanation="years written as four-digit numbers")]
    (root / "explanations.jsonl").write_text("".join(json.dumps(ln) + "\n" for ln in lines), encoding="utf-8")
    vs = {"n_related": 1, "n_other": 1, "related_frequency": 0.5, "other_frequency": 0.25, "lift": 2.0,
          "difference": 0.25, "p_value": 0.0123, "test": "label permutation"}
    (root / "validation.json").write_text(json.dumps({
        "n_inputs": 40, "threshold": 3.0, "n_inputs_above": 12, "related": {"2": [18]}, "other": {"2": [7]},
        "related_frequency": 0.5, "average_frequency": 0.3, "vs_other_explained": {
            "inputs above threshold": vs,
            "enrichment over base rate": {**vs, "related_frequency": 1.8, "other_frequency": 0.1,
                                          "related_enrichment": 2.5, "other_enrichment": 1.25}}}))
    cond = {"mean": 0.5, "ci95": [0.25, 0.75], "diff_vs_before": {"mean": 0.0, "ci95": [-0.1, 0.1]}}
    (root / "ablation.json").write_text(json.dumps({
        "n_prompts": 16, "features": {"2": [18]}, "n_features": 1, "random_draws": 3,
        "random_control": "frequency-matched", "before": {"mean": 0.5, "ci95": [0.25, 0.75]},
        "modes": {"error": {"splice": cond, "ablated": cond, "random": cond,
                            "ablated_minus_splice": {"mean": -0.375, "ci95": [-0.5, -0.25], "p_value": 0.0004},
                            "ablated_minus_random": {"mean": -0.3125, "ci95": [-0.625, -0.0625],
                                                     "between_draw_std": 0.125, "interval": "two-level bootstrap"}}}}))
    run(cfg)
    return root


def dashboards(html: str) -> list[str]:
    return re.findall(r'<div class="fd" id="feature-.*?(?=<div class="fd" id=|<h2)', html, re.S)


def test_one_self_contained_dashboard_per_explained_feature(made):
    html = (made / "report.html").read_text()
    boards = dashboards(html)
    assert len(boards) == 3
    assert not re.search(r"<script|<link|src=\"http|href=\"http|url\(", html)  # nothing fetched over a network
    first = boards[0]
    # Tokens shaded by activation / the feature's peak (4.0): 0, 1 and 0.25, then the quantile window's 0.125;
    # values in the tooltip.
    shades = re.findall(r'rgba\(255,110,0,([0-9.]+)\)" title="([^"]+)"', first)
    assert shades == [("0.0", "0"), ("1.0", "4"), ("0.25", "1"), ("0.125", "0.5")]
    heights = [float(h) for h in re.findall(r'<rect [^>]*height="([0-9.]+)"', first)]
    assert heights == [90.0, 0.0, 36.0, 18.0]  # one bar per bin, counts 5, 0, 2, 1 scaled to the tallest
    assert "superb" in first and "awful" in first and "&lt;&amp;&gt;" in first  # escaped, not raw HTML
    assert "related to the reward" in first and "0.750" in first
    assert "not related" in boards[1]
    assert "echo: repeats" in boards[2] and "years written as four-digit numbers" in boards[2]
    md = (made / "report.md").read_text()
    assert "3 feature dashboards" in md


def test_unusable_explanations_are_counted_and_never_shown_as_related(made):
    md = (made / "report.md").read_text()
    assert "1 echo: repeats the prompt's example explanation word for word" in md
    row = next(line for line in md.splitlines() if line.startswith("| 2 | x1 | 9 |"))
    assert "yes" not in row and "echo" in row


def test_validation_lift_and_ablation_paired_differences_are_shown(made):
    md = (made / "report.md").read_text()
    assert re.search(r"\| inputs above threshold \| 1 \| 1 \| 0\.500 \| 0\.250 \| 2\.000 \| 0\.012 \|", md)
    assert re.search(r"ablated - splice only \| -0\.375 \| \[-0\.500, -0\.250\] \| 4\.00e-04", md)
    assert re.search(r"ablated - frequency-matched random features \| -0\.312 \| \[-0\.625, -0\.062\] \| "
                     r"between-draw sd 0\.125", md)


def test_findings_rows_for_validation_and_ablation(made):
    from irm.findings import NOT_DISTINGUISHABLE, SUPPORTED, build_findings

    rows = {r["claim"]: r for r in build_findings(made)}
    val = next(r for c, r in rows.items() if c.startswith("the features labelled related"))
    assert val["verdict"] == SUPPORTED and "enrichment over base rate 2.50 (z 1.80" in val["number"]
    assert "enrichment 1.25 (z 0.10), raw frequency 0.250" in val["control"]
    abl = [r for r in build_findings(made) if r["claim"].startswith("ablating")]
    assert [r["verdict"] for r in abl] == [SUPPORTED, SUPPORTED]
    assert "splice with nothing ablated" in abl[0]["control"] and "firing frequency" in abl[1]["control"]
    # A drop whose interval reaches 0 is not distinguishable; a rise is contradicted.
    path = made / "ablation.json"
    data = json.loads(path.read_text())
    error = data["modes"]["error"]
    error["ablated_minus_splice"]["ci95"] = [-0.5, 0.1]
    error["ablated_minus_random"]["ci95"] = [0.1, 0.3]
    path.write_text(json.dumps(data))
    rows = [r for r in build_findings(made) if r["claim"].startswith("ablating")]
    # one-sided like the claim: a rise is not a verdict on "lowers", the detail says so
    assert [r["verdict"] for r in rows] == [NOT_DISTINGUISHABLE, NOT_DISTINGUISHABLE]
    assert "the claim's reverse" in rows[1]["detail"] and "reverse" not in rows[0]["detail"]


def test_summary_carries_the_lift_and_the_paired_differences(made):
    s = json.loads((made / "summary.json").read_text())
    assert s["validation"]["vs_other_explained"]["inputs above threshold"]["lift"] == 2.0
    assert s["validation"]["vs_other_explained"]["inputs above threshold"]["p_value"] == 0.0123
    paired = s["ablation"]["paired"]["error"]
    assert paired["ablated_minus_splice"]["ci95"] == [-0.5, -0.25]
    assert paired["ablated_minus_random"]["between_draw_std"] == 0.125
