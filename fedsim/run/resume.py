"""``python -m fedsim resume RUN_DIR [--quiet]``: continue an interrupted run from its checkpoint.

The run goes on from the last round its checkpoint holds (``fedsim.run.checkpoint``; every
``output.checkpoint_every`` rounds), on the engine of the scenario stored in RUN_DIR/scenario.yaml,
and ends with the metrics.jsonl rows and summary.json the run would have had left alone (the
wall-time fields aside). Rounds metrics.jsonl holds beyond the checkpoint are dropped and redone.

The run holds RUN_DIR as a fresh run holds its output folder (``fedsim.run.outdir``, ``resume=True``):
a resume while another process still writes the folder (the original run, another resume) is refused.

Exit codes: 0 when the run completed (a run already complete says so on stderr and exits 0, so a
scheduler may retry ``resume`` blindly until it succeeds); 2, with one line on stderr, when RUN_DIR is
not a fedsim run, is in use by another run or cannot be written (read-only), has no checkpoint, or the
checkpoint, scenario.yaml, metrics.jsonl or summary.json cannot be read as fedsim wrote it; 130
on Ctrl-C (the checkpoint stays: resume again); 1 when every client failed, as for a fresh run, or
when the disk is full (one line naming the file; resume again once there is space).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

from ..console import EXIT_BAD_INPUT, Parser


def _parser() -> argparse.ArgumentParser:
    p = Parser(prog="fedsim resume", description="Continue an interrupted run from its checkpoint.")
    p.add_argument("run_dir", help="the run's output folder (holds scenario.yaml, metrics.jsonl, checkpoint.pkl)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def _fail(message: str) -> int:
    print(f"fedsim: error: {message}", file=sys.stderr)
    return EXIT_BAD_INPUT


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    run_dir = Path(args.run_dir)
    if not (run_dir / "scenario.yaml").is_file() or not (run_dir / "metrics.jsonl").is_file():
        return _fail(f"{run_dir} is not a fedsim run folder (it needs scenario.yaml and metrics.jsonl)")
    if (run_dir / "summary.json").is_file():
        from .results import RunFileError, read_json_object

        try:  # complete only if its summary is one fedsim wrote (it is written atomically)
            read_json_object(run_dir / "summary.json")
        except RunFileError as exc:
            return _fail(str(exc))
        try:
            finished = _finish_outputs(run_dir)
        except (RunFileError, OSError) as exc:
            return _fail(str(exc))
        done = f"finished its outputs ({', '.join(finished)})" if finished else "nothing to do"
        print(f"fedsim: {run_dir} is already complete (summary.json exists); {done}", file=sys.stderr)
        return 0
    try:
        return _resume(run_dir, progress=not args.quiet)
    except KeyboardInterrupt:  # the checkpoint is written atomically: whenever this came, it is intact
        print(f"fedsim: interrupted; rounds completed so far are in {run_dir / 'metrics.jsonl'}; continue with "
              f"`python -m fedsim resume {run_dir}`", file=sys.stderr)
        return 130


def _finish_outputs(run_dir: Path) -> list[str]:
    """What a kill between summary.json and the end of the run left undone: the plots the scenario asks for
    (from metrics.jsonl and audit.jsonl, as the run draws them) and the removal of its stale checkpoint.
    Returns what was done."""
    from .checkpoint import CHECKPOINT
    from .results import ResultsWriter, has_virtual_time, read_jsonl, read_metrics
    from ..scenario.schema import ScenarioError, load_scenario

    done = []
    try:
        plot = load_scenario(run_dir / "scenario.yaml").output.plot
    except ScenarioError:
        plot = False  # a scenario that no longer validates: no plots to promise
    if plot:
        writer = ResultsWriter.reopen(run_dir, read_metrics(run_dir))
        if writer.rows and not (run_dir / "accuracy.png").is_file():
            writer.plot_accuracy()
            done.append("accuracy.png")
        if has_virtual_time(writer.rows) and not (run_dir / "accuracy_time.png").is_file():
            writer.plot_accuracy_over_time()
            done.append("accuracy_time.png")
        audit = run_dir / "audit.jsonl"
        rows = read_jsonl(audit) if audit.is_file() else []
        if rows and writer.rows and not (run_dir / "audit_psnr.png").is_file():
            writer.plot_audit(rows)
            done.append("audit_psnr.png")
    if (run_dir / CHECKPOINT).is_file():
        (run_dir / CHECKPOINT).unlink()
        done.append(f"removed the stale {CHECKPOINT}")
    return done


def _resume(run_dir: Path, progress: bool) -> int:
    from .checkpoint import CheckpointError, disk_full_line, kept_rows, load
    from .outdir import OutputDirError, claim_output_dir
    from .results import DiskFullError, RunFileError
    from ..scenario.schema import ScenarioError, load_scenario
    from ..trackers import check_installed
    from ..world.build import checked_world

    with contextlib.ExitStack() as held:
        try:  # the folder is this run's from here on: a run still writing it (the original one) refuses us
            held.enter_context(claim_output_dir(run_dir, resume=True))
        except OutputDirError as exc:
            return _fail(f"output folder {exc}")
        stored = run_dir / "scenario.yaml"
        try:  # read as a scenario file is (UTF-8, strict YAML, a size limit), named in every message
            scenario = load_scenario(stored)
        except ScenarioError as exc:
            return _fail(str(exc) if str(exc).startswith(str(stored)) else f"{stored}: {exc}")
        try:
            # Checked before anything in RUN_DIR changes: a bad checkpoint leaves the run as it was.
            ckpt = load(run_dir, scenario.to_yaml())
            kept_rows(run_dir, ckpt.server_round)
            del ckpt
            if scenario.engine.name != "ray":  # the ray engine checks its data while Ray starts
                checked_world(scenario.to_yaml())
            check_installed(scenario)  # the packages of its trackers
        except (ScenarioError, CheckpointError, RunFileError) as exc:
            return _fail(str(exc))

        from ..console import print_table
        from ..engines import run_scenario
        from .rounds import RunStopped

        try:
            summary = run_scenario(scenario, run_dir, progress=scenario.output.progress and progress, resume=True)
        except (ScenarioError, CheckpointError, RunFileError) as exc:
            return _fail(str(exc))
        except RunStopped as exc:  # every client failed, or the model diverged
            print(f"fedsim: error: {exc}; rounds so far are in {run_dir / 'metrics.jsonl'}", file=sys.stderr)
            return 1
        except DiskFullError as exc:  # every file as it was before the failed write: resume again
            print(disk_full_line(exc, run_dir), file=sys.stderr)
            return 1
    print_table(summary, run_dir)
    return 0
