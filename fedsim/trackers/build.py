"""Building a run's trackers from the registry (``fedsim.trackers.TRACKERS``), checking their packages, and
a sweep's own tracking (MLflow's parent run)."""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path
from typing import Any, Callable

from ..scenario.schema import Scenario, ScenarioError
from . import TRACKERS


def check_installed(scenario: Scenario) -> None:
    """ScenarioError (one line, naming the extra to install) when a tracker the scenario asks for lacks its
    package. Reads the installed packages only (``find_spec``): nothing is imported or written."""
    for name in scenario.output.trackers:
        entry = TRACKERS[name]
        if importlib.util.find_spec(entry.package) is None:
            raise ScenarioError(f"output.trackers: {name} needs the {entry.package} package, which is not "
                                f"installed: pip install 'fedsim[{entry.extra}]'")


def build_trackers(scenario: Scenario, out_dir: str | Path, audit_rows: Callable[[], list[dict[str, Any]]],
                   tracking: dict[str, Any] | None = None) -> list:
    """The scenario's trackers, in the order it lists them. ``audit_rows()``: the audit's rows so far
    (reported when the run ends). ``tracking``: where a sweep's trackers report (``open_sweep``)."""
    check_installed(scenario)
    trackers = []
    for name in scenario.output.trackers:
        entry = TRACKERS[name]
        cls = getattr(importlib.import_module(entry.module), entry.cls)
        trackers.append(cls(scenario, Path(out_dir), audit_rows, (tracking or {}).get(name) or {}))
    return trackers


def open_sweep(name: str, root: str | Path, scenarios: list[Scenario]) -> dict[str, Any]:
    """A sweep's own tracking, for the trackers its runs ask for that have one (MLflow: the parent run every
    run reports under): ``{tracker name: its settings}``, passed to each run's ``build_trackers``."""
    wanted = {t for s in scenarios for t in s.output.trackers}
    tracking = {}
    for tracker in sorted(wanted):
        module = importlib.import_module(TRACKERS[tracker].module)
        if hasattr(module, "open_sweep"):
            tracking[tracker] = module.open_sweep(name, Path(root))
    return tracking


def close_sweep(tracking: dict[str, Any], root: str | Path, failed: bool) -> None:
    """End what ``open_sweep`` began (MLflow: the parent run, with runs.csv and the report as artifacts)."""
    for tracker, settings in tracking.items():
        importlib.import_module(TRACKERS[tracker].module).close_sweep(settings, Path(root), failed)
