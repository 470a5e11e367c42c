"""``runs.csv``'s figure columns and its reader: what the sweep writes and the report reads, shared
without either importing the other."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

# Figures a run's summary.json holds under the same name (absent: an empty cell): the empirical epsilon of
# the scenario's privacy section (fedsim.privacy.run: its 95% lower bound, the paper's point estimate with its
# bootstrap interval) and the threat it was estimated for.
SUMMARY_COLUMNS = ["epsilon_est", "epsilon_est_point", "epsilon_est_low", "epsilon_est_high", "epsilon_est_threat"]
# Figures taken from a run's audit.jsonl: the worst (largest) value of the row key over its audited rows
# (membership inference, fedsim.audit.membership; read from the rows, so a run whose reconstructions
# were not scored still gets them).
AUDIT_MAX_COLUMNS = {"audit_worst_membership_auc": "membership_auc",
                     "audit_worst_membership_tpr": "membership_tpr_at_0.1%_fpr"}
# Text columns from the audit rows: the membership attack (loss or lira) of the run's audits.
AUDIT_TEXT_COLUMNS = {"membership_attack": "membership_attack"}

COLUMNS = ["accuracy", "best_accuracy", "bytes_up_total", "bytes_down_total", "epsilon", *SUMMARY_COLUMNS,
           "audit_worst_psnr", "audit_worst_ssim", "audit_worst_cw_ssim", "audit_label_accuracy", "audit_i2f_psnr",
           *AUDIT_MAX_COLUMNS, *AUDIT_TEXT_COLUMNS, "audits", "failures_total", "wall_s"]


def more_figures(summary: dict[str, Any], audit: list[dict[str, Any]]) -> dict[str, Any]:
    """The SUMMARY_COLUMNS and AUDIT_MAX_COLUMNS of one run, from its summary and audit rows (None where the
    run has no such figure)."""
    row = {key: summary.get(key) for key in SUMMARY_COLUMNS}
    for column, key in AUDIT_MAX_COLUMNS.items():
        row[column] = max((r[key] for r in audit if isinstance(r.get(key), (int, float))), default=None)
    for column, key in AUDIT_TEXT_COLUMNS.items():
        row[column] = next((r[key] for r in audit if isinstance(r.get(key), str)), None)
    return row


def read_csv(root: str | Path) -> list[dict[str, Any]]:
    """runs.csv back as dicts with numbers as numbers (empty cells: None)."""
    rows = list(csv.DictReader((Path(root) / "runs.csv").read_text().splitlines()))
    return [{k: _parse(v) for k, v in row.items()} for row in rows]


def _parse(text: str) -> Any:
    if text == "":
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text
