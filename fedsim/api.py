"""fedsim from Python: run a scenario or a sweep from a script or a notebook and get its results back.

    import fedsim

    run = fedsim.run("experiments/scenarios/quickstart.yaml", {"train.rounds": 5}, out="runs/qs5")
    run.metrics[-1]["accuracy"]     # metrics.jsonl, a dict per round
    run.dataframe()                 # the same as a pandas DataFrame (pandas installed)
    run.summary, run.audit, run.dir

``fedsim.run``, ``fedsim.load_scenario``, ``fedsim.sweep``, ``fedsim.Run`` and ``fedsim.SweepResult`` are
these functions and classes (``fedsim/__init__.py`` re-exports them lazily). A run does what
``python -m fedsim`` does, with the same checks before anything is written; bad input raises
``ScenarioError`` (one line naming the key path) or ``OutputDirError`` instead of exiting, and a run that
cannot go on raises ``RunStopped``. ``overrides`` are the dotted keys of ``--set``, with Python values.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas

    from .scenario.schema import Scenario


def load_scenario(scenario: str | Path | Scenario | Mapping[str, Any],
                  overrides: Mapping[str, Any] | None = None) -> Scenario:
    """A validated scenario from a YAML file's path, a ``Scenario`` or a mapping of sections, with
    ``overrides`` applied: ``{"train.rounds": 2, "defense": {"name": "noise", "variance": 0.01}}``, the
    dotted keys ``--set`` takes. Raises ``ScenarioError`` (one line naming the key path)."""
    import yaml

    from .scenario.schema import Scenario, ScenarioError, apply_overrides, load_raw, parse_scenario

    if isinstance(scenario, Scenario):
        raw = yaml.safe_load(scenario.to_yaml())
    elif isinstance(scenario, Mapping):
        raw = dict(scenario)
    elif isinstance(scenario, (str, Path)):
        raw = load_raw(scenario)
    else:
        raise TypeError(f"scenario: expected a path, a Scenario or a mapping, got {type(scenario).__name__}")
    if overrides is not None and not isinstance(overrides, Mapping):
        raise TypeError(f"overrides: expected a mapping of dotted keys to values, got {type(overrides).__name__}")
    items = []
    for key, value in (overrides or {}).items():
        if not isinstance(key, str):
            raise ScenarioError(f"overrides: a key must be a dotted key path such as 'train.rounds', got {key!r}")
        items.append(f"{key}={json.dumps(value)}")  # as --set's text (JSON is YAML), so one parser reads both
    return parse_scenario(apply_overrides(raw, items))


def checked(scenario: Scenario, *, check_data: bool = True) -> Scenario:
    """``scenario``, checked as a run checks it before writing anything: sizes that cannot be allocated, its
    data (``check_data``; the ray engine checks its data while Ray starts), the trackers' packages. Raises
    ``ScenarioError``."""
    from .scenario.schema import ScenarioError
    from .trackers import check_installed
    from .world.build import check_memory, checked_world
    from .world.memory import MemoryRefused

    try:
        check_memory(scenario)  # every engine: sizes that cannot be allocated are refused before anything loads
    except MemoryRefused as exc:
        raise ScenarioError(str(exc)) from None
    check_installed(scenario)
    if check_data or scenario.engine.name != "ray":
        checked_world(scenario.to_yaml())  # cached: the run reuses it
    return scenario


@dataclass
class Run:
    """A finished run, as its folder holds it."""

    dir: Path                        # the run's folder
    metrics: list[dict[str, Any]]    # metrics.jsonl: one dict per round
    summary: dict[str, Any]          # summary.json (with the resolved scenario under "scenario")
    audit: list[dict[str, Any]] = field(default_factory=list)  # audit.jsonl: one dict per audited (round, client)

    @classmethod
    def load(cls, run_dir: str | Path) -> Run:
        """A finished run's folder read back (``RunFileError`` naming a file fedsim did not write as it should)."""
        from .run.results import read_json_object, read_jsonl, read_metrics

        run_dir = Path(run_dir)
        audit = run_dir / "audit.jsonl"
        return cls(run_dir, read_metrics(run_dir), read_json_object(run_dir / "summary.json"),
                   read_jsonl(audit) if audit.is_file() else [])

    def dataframe(self) -> pandas.DataFrame:
        """The metrics as a pandas DataFrame, a row per round; nested fields as dotted columns
        (``train_metrics.train_loss``). Needs pandas."""
        try:
            import pandas
        except ImportError:
            raise ImportError("Run.dataframe() needs pandas: pip install pandas") from None
        return pandas.json_normalize(self.metrics)


def run(scenario: str | Path | Scenario | Mapping[str, Any], overrides: Mapping[str, Any] | None = None,
        out: str | Path | None = None, *, overwrite: bool = False, progress: bool | None = None) -> Run:
    """Run a scenario (a path, a ``Scenario`` or a mapping; ``overrides`` as ``load_scenario`` takes them) and
    return the finished ``Run``. Its folder is ``out``, else ``output.dir``, else ``runs/<name>``; one holding
    another run's results is refused unless ``overwrite``. ``progress``: the progress bar (default: the
    scenario's ``output.progress``). Raises ``ScenarioError``, ``OutputDirError`` (bad input, before anything
    is written), ``RunStopped`` (the run could not go on; its rounds so far are in the folder)."""
    from .engines import run_scenario
    from .run.outdir import claim_output_dir

    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")  # as the command line: Flower sends no telemetry
    resolved = checked(load_scenario(scenario, overrides), check_data=False)
    out_dir = Path(out if out is not None else resolved.output.dir or Path("runs") / resolved.name)
    with claim_output_dir(out_dir, overwrite=overwrite):
        run_scenario(resolved, out_dir, progress=resolved.output.progress if progress is None else progress)
    return Run.load(out_dir)


@dataclass
class SweepResult:
    """A finished sweep: its folder, each run (in the sweep's expansion order) and runs.csv's rows."""

    dir: Path
    runs: dict[str, Run]             # by run name (the run folder's, sweeps/<name>/runs/<run>)
    rows: list[dict[str, Any]]       # runs.csv: one dict per run, the swept keys and the figures

    def dataframe(self) -> pandas.DataFrame:
        """runs.csv as a pandas DataFrame. Needs pandas."""
        try:
            import pandas
        except ImportError:
            raise ImportError("SweepResult.dataframe() needs pandas: pip install pandas") from None
        return pandas.DataFrame(self.rows)


def sweep(sweep_file: str | Path, out: str | Path = "sweeps", *, workers: int = 1, address: str | None = None,
          progress: bool = False) -> SweepResult:
    """Run a sweep file as ``python -m fedsim sweep`` does (runs as Ray tasks, ``workers`` at once, or on the
    Ray cluster at ``address``; finished runs are kept and skipped) into ``out``/<name>. Raises
    ``ScenarioError`` (a bad sweep or run, before anything runs), ``OutputDirError``, ``RuntimeError`` (runs
    failed; the others are kept)."""
    from .compare.sweep import load_sweep, read_csv, run_sweep

    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")  # as the command line: Flower sends no telemetry
    spec, runs = load_sweep(sweep_file)
    root = run_sweep(spec, runs, out, workers=workers, address=address, progress=progress)
    return SweepResult(root, {r.name: Run.load(root / "runs" / r.name) for r in runs}, read_csv(root))
