"""What every tracker shares: the ``Tracker`` observer and the numbers of a metrics.jsonl row it reports.

A tracker is a ``RoundObserver`` (it sees the start and every round's finished row, after the results
writer) with two more events that only the server's run knows: ``finish`` (the run's summary is written:
report the audit, the files, close) and ``stopped`` (the run ended with an exception: mark it so; a
resumed run reopens it from the tracker's ``state_dict``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable

from ..run.rounds import RoundObserver
from ..scenario.schema import Scenario


class Tracker(RoundObserver):
    """One experiment tracker of one run (``fedsim.trackers.TRACKERS``)."""

    def __init__(self, scenario: Scenario, out_dir: Path, audit_rows: Callable[[], list[dict[str, Any]]],
                 tracking: dict[str, Any]):
        """``audit_rows()``: the audit's rows (audit.jsonl's), complete at ``finish``; ``tracking``: this
        tracker's settings from a sweep (``open_sweep``), empty for a run of its own."""
        self.scenario, self.out_dir, self.audit_rows, self.tracking = scenario, Path(out_dir), audit_rows, tracking

    def finish(self, summary: dict[str, Any]) -> None:
        """The run ended and wrote summary.json (and its plots)."""

    def stopped(self, error: BaseException) -> None:
        """The run ended with ``error`` (Ctrl-C included) before ``finish``."""


def numbers(row: dict[str, Any], sep: str) -> Iterator[tuple[str, float]]:
    """Every finite number in a metrics.jsonl ``row`` but ``round`` (the step), nested dicts and lists
    flattened into names joined by ``sep`` (``train_metrics/train_loss``); text and None are left out."""
    for key, value in row.items():
        if key != "round":
            yield from _flat(str(key), value, sep)


def _flat(name: str, value: Any, sep: str) -> Iterator[tuple[str, float]]:
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _flat(f"{name}{sep}{k}", v, sep)
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            yield from _flat(f"{name}{sep}{i}", v, sep)
    elif isinstance(value, (int, float)) and math.isfinite(value):  # bools too, as 0 and 1
        yield name, float(value)


# audit.jsonl's figures reported per audited round (each the worst case over the round's audited clients:
# the highest, as in summary.json's audit_worst_*)
AUDIT_FIGURES = ("psnr", "ssim", "cw_ssim", "label_accuracy", "membership_auc")


def audit_by_round(rows: list[dict[str, Any]]) -> dict[int, dict[str, float]]:
    """Per audited round, the worst case (the maximum over its clients) of each of ``AUDIT_FIGURES`` that
    its rows score (a deployed run's unscored rows give none)."""
    rounds: dict[int, dict[str, float]] = {}
    for row in rows:
        figures = rounds.setdefault(int(row["round"]), {})
        for key in AUDIT_FIGURES:
            value = row.get(key)
            if isinstance(value, (int, float)) and math.isfinite(value):
                figures[key] = max(figures.get(key, -math.inf), float(value))
    return {r: f for r, f in sorted(rounds.items()) if f}


_RECONSTRUCTION = re.compile(r"round-(?P<round>[0-9]+)-client-(?P<client>[0-9]+)\.png")


def reconstructions(out_dir: Path) -> list[tuple[int, int, Path]]:
    """The audit's reconstruction grids in ``out_dir``/audit (fedsim.audit): (round, client, path), in order."""
    found = []
    folder = out_dir / "audit"
    for path in folder.iterdir() if folder.is_dir() else ():
        m = _RECONSTRUCTION.fullmatch(path.name)
        if m is not None:
            found.append((int(m["round"]), int(m["client"]), path))
    return sorted(found)
