"""Findings first (README "What the numbers mean"): each claim of the paper, its number, its control, and a verdict that
follows from an interval or a p-value, never from hard-coded wording.

`build_findings(run_dir)` returns `summary.json["findings"]`: rows {claim, number, control, verdict, detail}, one per
claim whose artifacts exist, in the order of `ROW_BUILDERS`. To add a claim, write one function `(root: Path) ->
dict | list[dict] | None`, in the module of its group of claims (a new group: a new module, imported below at its
place in the table), that reads its stage's artifact (None when the artifact is missing: the claim was not
measured), builds the row with `finding(...)` and a verdict from one of the verdict functions (`irm.findings.verdicts`),
and decorate it with `@row_builder` (or append it to `ROW_BUILDERS`).

The three verdicts, for a claim "the effect is above the control's value", at one convention for the whole table:
two-sided level ALPHA = 0.05, i.e. 2.5% in each direction (a 95% interval, or a one-sided p-value against ALPHA / 2):
- "supported": the 95% interval lies wholly above the control's value (or p < alpha / 2 in the claimed direction);
- "contradicted": it lies wholly below (or p < alpha / 2 in the opposite direction);
- "not distinguishable from the control": anything else, including an interval that touches the control's value.
Across the table the rows' two-sided p-values (`p_value`) are Holm-corrected (`holm`): a row whose corrected p is
not below ALPHA is "not distinguishable" whatever its own interval says, so the chance that any row of a run is a
false positive stays at ALPHA. A row without a p-value keeps its own verdict and says it is outside the correction.
A claim whose stage ran but had nothing to measure (no feature labelled related, so nothing to validate or ablate; an
undefined held-out tau) gets the row "not tested", with the reason: a claim that silently drops out of the table
reads as no problem.

Every row names its calibration key (`irm.calibration`): `build_findings` adds the false-positive rate measured in
the harness's null worlds (the largest over the finding's null families) and, for a "not distinguishable" row, the
smallest effect this run could have detected with 80% power, from the run's calibration.json when it has one.

The modules: `verdicts` (the verdicts and the p-value arithmetic they read), `rows` (a row, the builder registry, the
artifact reader, the number formats), `table` (`build_findings`: Holm's correction and the calibration harness's
numbers), and one module of row builders per group of claims, imported below in the table's order: `reward`
(table 7), `layers` (4.2), `control` (5.1), `features` (eq. 2, tables 6 and 5), `own_reward` (issue 23), `diff`
(issue 27).
"""

from __future__ import annotations

# The claim modules register their rows on import: this order is the table's.
from irm.findings.reward import REWARD_CLAIM, paired_reward, planted_words_learned, reward_raised, reward_row
from irm.findings.layers import layer_outlier_test, layer_row, layers_moved
from irm.findings.control import (RESAMPLED, SAE_FIT_RATIO, delta_row, delta_tau_row, differs_from_base, generalises,
                                  heldout_row, lexicon_reconstructed, lexicon_rows, permutation_two_sided,
                                  tau_against_null)
from irm.findings.features import (ABLATION_CLAIM, VALIDATION_CLAIM, ablation_lowers_reward, ablation_row, ce_gaps,
                                   chance_p, dictionaries_share_features, mmcs_row,
                                   related_features_fire_where_r_is_high, validation_row)
from irm.findings.own_reward import (PLANTED_CLAIM, PLANTED_RULE, planted_row, planted_shift, planted_words_moved,
                                     tau_against_vader)
from irm.findings.diff import (DIFF_ABLATION_CLAIM, DIFF_SPECIFIC_CLAIM, diff_ablation_lowers_reward,
                               diff_latents_about_reward, diff_tuned_specific, permutation_row)
from irm.findings.rows import FIELDS, ROW_BUILDERS, Row, RowBuilder, finding, interval, num, p_text, row_builder
from irm.findings.table import ADDED, CERTIFIED, build_findings, calibrated, correct, read_certified
from irm.findings.verdicts import (ALPHA, CONTRADICTED, NOT_DISTINGUISHABLE, NOT_TESTED, SUPPORTED, VERDICTS, Z_POWER,
                                   holm, interval_mde, permutation_p, two_sided, verdict_from_interval, verdict_from_p,
                                   verdict_from_two_sided)

__all__ = ["ABLATION_CLAIM", "ADDED", "ALPHA", "CERTIFIED", "CONTRADICTED", "DIFF_ABLATION_CLAIM",
           "DIFF_SPECIFIC_CLAIM", "FIELDS", "NOT_DISTINGUISHABLE", "NOT_TESTED", "PLANTED_CLAIM", "PLANTED_RULE",
           "RESAMPLED", "REWARD_CLAIM", "ROW_BUILDERS", "SAE_FIT_RATIO", "SUPPORTED", "VALIDATION_CLAIM", "VERDICTS",
           "Z_POWER", "ablation_lowers_reward", "ablation_row", "build_findings", "calibrated", "ce_gaps", "chance_p",
           "correct", "delta_row", "delta_tau_row", "dictionaries_share_features", "diff_ablation_lowers_reward",
           "diff_latents_about_reward", "diff_tuned_specific", "differs_from_base", "finding", "generalises",
           "heldout_row", "holm", "interval", "interval_mde", "layer_outlier_test", "layer_row", "layers_moved",
           "lexicon_reconstructed", "lexicon_rows", "mmcs_row", "num", "p_text", "paired_reward", "permutation_p",
           "permutation_row", "permutation_two_sided", "planted_row", "planted_shift", "planted_words_learned",
           "planted_words_moved", "read_certified", "related_features_fire_where_r_is_high", "reward_raised",
           "reward_row", "Row", "row_builder", "RowBuilder", "tau_against_null", "tau_against_vader", "two_sided",
           "validation_row", "verdict_from_interval", "verdict_from_p", "verdict_from_two_sided"]
