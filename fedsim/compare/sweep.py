"""``python -m fedsim sweep SWEEP.yaml``: a grid of scenarios, run as Ray tasks, resumable.

A sweep file names a base scenario and the keys to vary::

    name: defenses
    base: ../scenarios/quickstart.yaml      # relative to the sweep file
    set: {train.rounds: 5}                  # fixed overrides, applied to every run
    grid: {defense.variance: [1.0e-4, 1.0e-2], seed: [0, 1, 2]}   # crossed
    zip: {train.lr: [0.1, 0.05], train.batch_size: [8, 16]}      # zipped, crossed with the grid

Every expanded scenario is validated (and its data checked) before anything starts; the
first bad one is one line naming its run, exit 2. Each run writes its own run folder under
``sweeps/<name>/runs/<run>/`` exactly as ``python -m fedsim`` does. Re-running the same
sweep skips runs whose summary.json holds the same resolved scenario and redoes the rest
(an interrupted run's folder is cleared first). ``runs.csv`` gets one row per run, in
expansion order, from each run's own summary.json, audit.jsonl and metrics.jsonl; the
plots and ``report.html`` come from ``fedsim.compare.report``.

Runs are Ray tasks of one CPU each: ``--workers N`` starts a local Ray instance of N CPUs
(loopback only, never joining a cluster found in the environment); ``--address`` joins
an existing cluster, and only then. A run's engine must be ``inline`` (a ray-engine run
inside a Ray task would start a cluster of its own per run).
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ..run.outdir import OutputDirError, check_output_dir, check_output_path, claim_output_dir, hold_folder
from ..run.results import DiskFullError, atomic_write
from ..scenario.schema import Scenario, ScenarioError, apply_overrides, load_raw, parse_scenario
from .runs_csv import COLUMNS, more_figures, read_csv  # noqa: F401  (read_csv: the sweep's reader, also here)

SEP = "__"


class SweepFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    base: str
    set: dict[str, Any] = {}
    grid: dict[str, list[Any]] = {}
    zip: dict[str, list[Any]] = {}

    @field_validator("grid", "zip")
    @classmethod
    def _non_empty(cls, v: dict[str, list[Any]]) -> dict[str, list[Any]]:
        for key, values in v.items():
            if not values:
                raise ValueError(f"{key} has no values")
        return v

    @model_validator(mode="after")
    def _zip_lengths(self) -> "SweepFile":
        lengths = {len(v) for v in self.zip.values()}
        if len(lengths) > 1:
            raise ValueError(f"zip lists differ in length ({', '.join(map(str, sorted(lengths)))})")
        both = set(self.grid) & set(self.zip) | (set(self.set) & (set(self.grid) | set(self.zip)))
        if both:
            raise ValueError(f"{sorted(both)[0]} is given twice (set, grid, zip)")
        if self.name in (".", ".."):
            raise ValueError("name must not be . or ..")
        return self


@dataclass(frozen=True)
class SweepRun:
    name: str                 # the run folder's name, stable across re-runs of the sweep
    values: dict[str, Any]    # the swept keys and their values for this run
    scenario: Scenario


def _yaml_text(value: Any) -> str:
    """A value as an override's YAML text (JSON is YAML)."""
    return json.dumps(value)


def run_name(values: dict[str, Any]) -> str:
    """``key=value`` pairs joined by ``__``, with characters a folder name cannot hold replaced."""
    if not values:
        return "run"
    text = SEP.join(f"{k}={v if not isinstance(v, (dict, list)) else json.dumps(v, sort_keys=True)}"
                    for k, v in values.items())
    text = re.sub(r"[^A-Za-z0-9_.=+-]", "-", text)
    if len(text) > 150:  # keep folder names short; the values are in runs.csv anyway
        import hashlib

        text = text[:130] + "-" + hashlib.sha256(text.encode()).hexdigest()[:12]
    return text


def expand(sweep: SweepFile) -> list[dict[str, Any]]:
    """Every run's swept values: the grid crossed (first key slowest), each crossed with the zip."""
    grid_keys = list(sweep.grid)
    combos = [dict(zip(grid_keys, vs)) for vs in itertools.product(*(sweep.grid[k] for k in grid_keys))]
    n_zip = len(next(iter(sweep.zip.values()))) if sweep.zip else 0
    zipped = [{k: sweep.zip[k][i] for k in sweep.zip} for i in range(n_zip)] or [{}]
    return [{**g, **z} for g in combos for z in zipped]


def load_sweep(path: str | Path) -> tuple[SweepFile, list[SweepRun]]:
    """Parse the sweep file and validate every run's scenario; raises ScenarioError (one line)."""
    path = Path(path)
    raw = load_raw(path)
    try:
        sweep = SweepFile(**raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "sweep"
        msg = err["msg"].removeprefix("Value error, ")
        raise ScenarioError(f"{path}: {where}: {msg}") from None
    except TypeError:
        raise ScenarioError(f"{path}: top level must be a mapping") from None
    try:
        return sweep, expand_runs(sweep, path.parent)
    except ScenarioError as exc:
        raise ScenarioError(f"{path}: {exc}" if str(exc).startswith("two runs") else str(exc)) from None


def expand_runs(sweep: SweepFile, folder: str | Path = ".") -> list[SweepRun]:
    """Every run of ``sweep`` with its validated scenario (``base`` relative to ``folder``)."""
    base = Path(sweep.base) if Path(sweep.base).is_absolute() else Path(folder) / sweep.base
    base_raw = load_raw(base)
    fixed = [f"{k}={_yaml_text(v)}" for k, v in sweep.set.items()]
    runs, names = [], set()
    from ..trackers import check_installed
    from ..world.build import checked_world

    for values in expand(sweep):
        name = run_name(values)
        if name in names:
            raise ScenarioError(f"two runs would share the folder {name!r}")
        names.add(name)
        overrides = fixed + [f"{k}={_yaml_text(v)}" for k, v in values.items()]
        try:
            scenario = parse_scenario(apply_overrides(base_raw, overrides))
            if scenario.engine.name != "inline":
                raise ScenarioError("engine.name: a sweep's runs use the inline engine (Ray runs the sweep)")
            checked_world(scenario.to_yaml())  # the data loads (cached per data/model/seed)
            check_installed(scenario)  # the packages of its trackers
        except ScenarioError as exc:
            raise ScenarioError(f"sweep run {name}: {exc}") from None
        runs.append(SweepRun(name, values, scenario))
    return runs


# ----------------------------------------------------------------------------- running


def completed(run_dir: Path, scenario: Scenario) -> bool:
    """Whether ``run_dir`` holds a finished run of exactly this scenario.

    The stored scenario is validated again first, so a setting added since with its default
    (a new key that changes nothing the run did) does not make a finished run look stale."""
    summary = run_dir / "summary.json"
    if not summary.is_file():
        return False
    try:
        stored = parse_scenario(json.loads(summary.read_text()).get("scenario"))
    except (OSError, json.JSONDecodeError, ScenarioError, ValueError, TypeError):
        return False
    return stored.model_dump(mode="json") == scenario.model_dump(mode="json")


def _run_task(scenario_yaml: str, run_dir: str, tracking: dict | None = None) -> dict:
    """One run, in a Ray worker (or in-process): a fresh folder, the scenario, its summary. ``tracking``:
    the sweep's trackers (``fedsim.trackers.open_sweep``: MLflow's parent run)."""
    import os

    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    from ..engines import run_scenario
    from ..scenario.schema import scenario_from_text

    # An interrupted or stale run is redone from nothing: the claim clears its results (only
    # fedsim's files: run_sweep has refused folders holding others) and holds the folder.
    with claim_output_dir(run_dir, overwrite=True) as path:
        return run_scenario(scenario_from_text(scenario_yaml), path, progress=False, tracking=tracking)


def run_sweep(sweep: SweepFile, runs: list[SweepRun], out: str | Path, *, workers: int = 1,
              address: str | None = None, progress: bool = True) -> Path:
    """Run what is not done yet; write runs.csv and the report. Returns the sweep folder.

    Every output path is checked before anything is written (OutputDirError, one line), and
    the sweep's folder is held (``fedsim.run.outdir.hold_folder``) while the sweep runs: a second
    sweep of the same name into the same folder is refused rather than redoing the same runs."""
    root = Path(out) / sweep.name
    check_output_path(root)
    for r in runs:
        try:
            check_output_path(root / "runs" / r.name)
        except OutputDirError as exc:
            raise OutputDirError(f"sweep run {r.name}: output folder {exc}") from None
    root.mkdir(parents=True, exist_ok=True)
    with hold_folder(root):
        todo = [r for r in runs if not completed(root / "runs" / r.name, r.scenario)]
        for r in todo:  # each is cleared and redone: refuse a folder holding files fedsim did not write
            try:
                check_output_dir(root / "runs" / r.name, overwrite=True)
            except OutputDirError as exc:
                raise OutputDirError(f"sweep run {r.name}: output folder {exc}") from None
        (root / "runs").mkdir(exist_ok=True)
        atomic_write(root / "sweep.yaml", yaml.safe_dump(sweep.model_dump(mode="json"), sort_keys=False))
        _run_todo(sweep, runs, todo, root, workers=workers, address=address, progress=progress)
    return root


def _run_todo(sweep: SweepFile, runs: list[SweepRun], todo: list[SweepRun], root: Path, *, workers: int,
              address: str | None, progress: bool) -> None:
    from ..trackers import close_sweep, open_sweep

    # The sweep's own tracking (an MLflow parent run, its runs' children), opened before any run starts
    tracking = open_sweep(sweep.name, root, [r.scenario for r in runs])
    try:
        _run_tasks(sweep, runs, todo, root, workers=workers, address=address, progress=progress, tracking=tracking)
    except BaseException:
        close_sweep(tracking, root, failed=True)
        raise
    close_sweep(tracking, root, failed=False)


def _run_tasks(sweep: SweepFile, runs: list[SweepRun], todo: list[SweepRun], root: Path, *, workers: int,
               address: str | None, progress: bool, tracking: dict) -> None:
    import ray

    from ..engines.ray_cluster import join_ray, start_local_ray, stop_local_ray

    if todo:
        if address is not None:
            join_ray(address)  # checked first: an unreachable address is one line in seconds, not a hang
        else:
            start_local_ray(workers)
        task = ray.remote(num_cpus=1, max_retries=0)(_run_task)
        try:
            pending = {task.remote(r.scenario.to_yaml(), str((root / "runs" / r.name).resolve()), tracking): r
                       for r in todo}
            failures = _wait_all(pending, len(runs), len(runs) - len(todo), progress)
        finally:
            if address is None:
                stop_local_ray()
            else:
                ray.shutdown()
        if failures:
            write_csv(root, runs)
            first = next(iter(failures.items()))
            raise RuntimeError(f"{len(failures)} of {len(todo)} runs failed; {first[0]}: {first[1]}")
    write_csv(root, runs)
    from .report import write_report

    write_report(root)


def _wait_all(pending: dict, total: int, done_before: int, progress: bool) -> dict[str, str]:
    import ray
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    failures: dict[str, str] = {}
    with Progress(TextColumn("sweep"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("{task.description}"), disable=not progress, transient=False) as bar:
        job = bar.add_task("", total=total, completed=done_before)
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            run = pending.pop(ready[0])
            try:
                ray.get(ready[0])
                bar.update(job, advance=1, description=run.name)
            except Exception as exc:  # the run's own error, one line
                full = exc if isinstance(exc, DiskFullError) else getattr(exc, "cause", None)
                if isinstance(full, DiskFullError):  # the other runs would fail the same way: stop the sweep
                    raise DiskFullError(full.path, full.quota) from None
                failures[run.name] = str(exc).strip().splitlines()[-1]
                bar.update(job, advance=1, description=f"{run.name} FAILED")
    return failures


# ----------------------------------------------------------------------------- runs.csv

def run_row(run_dir: Path) -> dict[str, Any]:
    """The figures of one finished run, from its own files."""
    summary = json.loads((run_dir / "summary.json").read_text())
    audit = []
    if (run_dir / "audit.jsonl").is_file():
        audit = [json.loads(line) for line in (run_dir / "audit.jsonl").read_text().splitlines() if line.strip()]
    scored = [r for r in audit if r.get("psnr") is not None]
    worst = max(scored, key=lambda r: r["psnr"]) if scored else None
    return {
        "accuracy": summary["accuracy"], "best_accuracy": summary["best_accuracy"],
        "bytes_up_total": summary["bytes_up_total"], "bytes_down_total": summary["bytes_down_total"],
        "epsilon": summary.get("epsilon"),
        "audit_worst_psnr": worst["psnr"] if worst else None,
        "audit_worst_ssim": max((r["ssim"] for r in scored if r.get("ssim") is not None), default=None),
        "audit_worst_cw_ssim": max((r["cw_ssim"] for r in scored if r.get("cw_ssim") is not None), default=None),
        "audit_label_accuracy": max((r["label_accuracy"] for r in scored if r.get("label_accuracy") is not None),
                                    default=None),
        # I2F's prediction for the worst-PSNR audit (only where a defense or codec perturbed the upload)
        "audit_i2f_psnr": worst.get("i2f_psnr") if worst else None,
        "audits": len(audit), "failures_total": summary["failures_total"], "wall_s": summary["wall_s"],
        **more_figures(summary, audit),
    }


def write_csv(root: Path, runs: list[SweepRun]) -> None:
    keys = list(dict.fromkeys(k for r in runs for k in r.values))
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["run", *keys, *COLUMNS])
    for r in runs:
        run_dir = root / "runs" / r.name
        if not completed(run_dir, r.scenario):
            continue
        row = run_row(run_dir)
        writer.writerow([r.name, *(_cell(r.values.get(k)) for k in keys), *(_cell(row[c]) for c in COLUMNS)])
    atomic_write(root / "runs.csv", buf.getvalue())


def _cell(value: Any) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return ""
    if isinstance(value, (dict, list)):
        return json.dumps(value, sort_keys=True)
    return repr(value) if isinstance(value, float) else str(value)


def main(argv: list[str]) -> int:
    import argparse
    import os
    import sys

    from ..console import EXIT_BAD_INPUT, Parser

    p = Parser(prog="fedsim sweep", description="Run a grid of scenarios (resumable).")
    p.add_argument("sweep", help="sweep YAML file")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="parallel runs (local Ray CPUs)")
    p.add_argument("--address", help="join this existing Ray cluster instead of starting one")
    p.add_argument("--out", default="sweeps", help="parent folder of the sweep's folder (default: sweeps)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    if args.workers < 1:
        print("fedsim: error: --workers must be >= 1", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        sweep, runs = load_sweep(args.sweep)
    except ScenarioError as exc:
        print(f"fedsim: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("fedsim: interrupted during start-up; nothing was written", file=sys.stderr)
        return 130
    if args.address is not None:  # before any output: a bad or unreachable address is bad input
        from ..engines.ray_cluster import check_ray_address

        try:
            check_ray_address(args.address)
        except ScenarioError as exc:
            print(f"fedsim: error: --address: {str(exc).removeprefix('engine.ray.address: ')}", file=sys.stderr)
            return EXIT_BAD_INPUT
    start = time.perf_counter()
    try:
        root = run_sweep(sweep, runs, args.out, workers=args.workers, address=args.address, progress=not args.quiet)
    except ScenarioError as exc:  # joining the cluster failed after the check (e.g. a version mismatch)
        print(f"fedsim: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except OutputDirError as exc:
        print(f"fedsim: error: {exc if str(exc).startswith('sweep run') else f'output folder {exc}'}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except RuntimeError as exc:
        print(f"fedsim: error: {exc}", file=sys.stderr)
        return 1
    except DiskFullError as exc:  # finished runs are kept; an unfinished one is redone by the next sweep
        print(f"fedsim: error: {exc}; finished runs are kept: free some space and run the sweep again",
              file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"fedsim: interrupted; finished runs are kept, re-run the sweep to do the rest", file=sys.stderr)
        return 130
    print(f"{len(runs)} runs in {time.perf_counter() - start:.1f} s: {root / 'runs.csv'}, {root / 'report.html'}")
    return 0
