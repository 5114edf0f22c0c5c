"""`python -m irm report`: report.md, report.html and summary.json of a run directory, from every stage's
artifacts (the sections, templates and plots are irm.report's)."""

from __future__ import annotations

import time
from pathlib import Path

from irm.artifacts import write_json, write_text
from irm.config import RunConfig
from irm.report import SECTIONS, Doc, ReportInputs, build_summary, findings_section
from irm.stages import artifact, mark_done


def run(cfg: RunConfig) -> dict:
    root = Path(cfg.run_dir)
    plots = artifact(root, "plots")
    plots.mkdir(parents=True, exist_ok=True)
    inputs = ReportInputs.read(cfg, root, plots)  # the tables and findings rows, built once for both outputs
    summary = build_summary(inputs)
    doc = Doc()
    doc.heading(f"irm report: {cfg.model.name}", 1)
    doc.para(
        f"Run directory {root}; reward: {cfg.reward.kind}; explainer backend: {cfg.explain.backend}"
        + (" (offline: deterministic token summaries, not an LLM)" if cfg.explain.backend == "offline" else "")
        + f"; generated {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}."
    )
    findings_section(doc, inputs)
    for section in SECTIONS:
        section(doc, inputs)
    outputs = {key: artifact(root, key) for key in ("summary", "report_md", "report_html")}
    write_json(outputs["summary"], summary)
    write_text(outputs["report_md"], doc.markdown())
    write_text(outputs["report_html"], doc.page(cfg.model.name))
    mark_done(cfg, "report", [*outputs.values(), plots])
    print(f"report: {outputs['report_html']}")
    return summary
