"""``runs.csv``'s figure columns and its reader: what the sweep writes and the report reads, shared
without either importing the other."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

COLUMNS = ["accuracy", "best_accuracy", "bytes_up_total", "bytes_down_total", "epsilon", "audit_worst_psnr",
           "audit_worst_ssim", "audit_worst_cw_ssim", "audit_label_accuracy", "audit_i2f_psnr", "audits",
           "failures_total", "wall_s"]


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
