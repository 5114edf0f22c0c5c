"""`python -m irm report`: every table and plot of the paper, filled from one run directory, as report.md, a
self-contained report.html (plots inlined), and summary.json (the headline numbers, machine-readable).

The sections (sections.py, claims.py, features.py, diffing.py) add blocks to a Doc (doc.py); the
Jinja2 templates in irm/templates/report*.j2 render them; the figures are plots.py's, summary.json summary.py's."""

from __future__ import annotations

import time
from pathlib import Path

from irm.artifacts import write_json, write_text
from irm.config import RunConfig
from irm.report.diffing import diff_section
from irm.report.claims import control_section, findings_section
from irm.report.doc import Doc
from irm.report.features import dashboard_section, features_section
from irm.report.sections import (ablation_section, base_control_section, configuration_section,
                                 dictionaries_section, divergence_section, kendall_section, lexicon_section,
                                 reward_section, validation_section)
from irm.report.summary import build_summary
from irm.stages import artifact, mark_done

__all__ = ["SECTIONS", "Doc", "build_summary", "control_section", "dashboard_section", "features_section",
           "findings_section", "run"]

# The report's sections after the findings, in order: one function per paper table or figure.
SECTIONS = (reward_section, divergence_section, dictionaries_section, features_section, lexicon_section,
            kendall_section, base_control_section, validation_section, ablation_section, diff_section,
            configuration_section)


def run(cfg: RunConfig) -> dict:
    root = Path(cfg.run_dir)
    plots = artifact(root, "plots")
    plots.mkdir(parents=True, exist_ok=True)
    summary = build_summary(root)
    doc = Doc()
    doc.heading(f"irm report: {cfg.model.name}", 1)
    doc.para(
        f"Run directory {root}; reward: {cfg.reward.kind}; explainer backend: {cfg.explain.backend}"
        + (" (offline: deterministic token summaries, not an LLM)" if cfg.explain.backend == "offline" else "")
        + f"; generated {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}."
    )
    findings_section(doc, root, summary)
    for section in SECTIONS:
        section(doc, cfg, root, plots)
    outputs = {key: artifact(root, key) for key in ("summary", "report_md", "report_html")}
    write_json(outputs["summary"], summary)
    write_text(outputs["report_md"], doc.markdown())
    write_text(outputs["report_html"], doc.page(cfg.model.name))
    mark_done(cfg, "report", [*outputs.values(), plots])
    print(f"report: {outputs['report_html']}")
    return summary
