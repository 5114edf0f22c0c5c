"""The report of a run directory (`python -m irm report`, irm.stages.report): every table and plot of the paper as
report.md, a self-contained report.html (plots inlined), and summary.json (the headline numbers, machine-readable).

The sections (sections.py, claims.py, features.py, diffing.py) add blocks to a Doc (doc.py); the
Jinja2 templates in irm/templates/report*.j2 render them; the figures are plots.py's. The tables are objects
(tables.py) holding the artifacts' raw values, built once (ReportInputs) and read by the sections and by
summary.py, which builds summary.json from them."""

from __future__ import annotations

from irm.report.diffing import diff_section
from irm.report.claims import control_section, findings_section
from irm.report.doc import Doc
from irm.report.features import dashboard_section, features_section
from irm.report.sections import (ablation_section, base_control_section, configuration_section,
                                 dictionaries_section, divergence_section, kendall_section, lexicon_section,
                                 reward_section, validation_section)
from irm.report.summary import build_summary
from irm.report.tables import ReportInputs

__all__ = ["SECTIONS", "Doc", "ReportInputs", "build_summary", "reward_section", "control_section", "dashboard_section", "features_section",
           "findings_section"]

# The report's sections after the findings, in order: one function per paper table or figure.
SECTIONS = (reward_section, divergence_section, dictionaries_section, features_section, lexicon_section,
            kendall_section, base_control_section, validation_section, ablation_section, diff_section,
            configuration_section)
