"""Command line: ``python -m fedsim SCENARIO.yaml [--set k.p=v ...] [--out DIR]`` runs a
scenario; ``python -m fedsim validate SCENARIO.yaml`` only checks it; ``python -m fedsim
sweep SWEEP.yaml`` runs a grid of scenarios (``fedsim.compare.sweep``) and ``python -m fedsim report
DIR`` writes a run's or a sweep's HTML page (``fedsim.compare.report``); ``python -m fedsim deploy
SCENARIO.yaml --superlink NAME`` runs it on a SuperLink, streaming its logs (``fedsim.deploy.follow``).

Bad input (file, keys, values, data that cannot be loaded, sizes that cannot be allocated, an
output directory that cannot be used) is one line on stderr and exit code 2, before any output
directory exists. A run holds its output directory for as long as it runs (``fedsim.run.outdir``):
a second run on it exits 2, and one holding an earlier run's results needs ``--overwrite``.
Ctrl-C during start-up is one line and exit code 130, with nothing written; Ctrl-C during the run is one line
(what the folder holds, and how to go on) and exit code 130. SIGTERM is handled as Ctrl-C is. A full disk (or
quota) is one line naming the file and exit code 1; every file is as it was before that write, and
``fedsim resume`` continues the run once there is space (when a checkpoint was written).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import warnings
from pathlib import Path

from .console import EXIT_BAD_INPUT, Parser, print_table


def _parser(validate: bool) -> argparse.ArgumentParser:
    p = Parser(prog="fedsim validate" if validate else "fedsim",
               description="Check a scenario." if validate else "Run a federated-learning scenario.")
    p.add_argument("scenario", help="scenario YAML file")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help="override a scenario key (repeatable), e.g. --set train.rounds=5")
    if not validate:
        p.add_argument("--out", help="output directory (default: output.dir or runs/<name>)")
        p.add_argument("--quiet", action="store_true", help="no progress bar")
        p.add_argument("--overwrite", action="store_true",
                       help="replace the results of an earlier run in the output directory (cleared first)")
    return p


def prepare(path: str, overrides: list[str], *, check_data: bool = True):
    """Validate the scenario (and its data, if ``check_data``) before anything is written.

    Raises ScenarioError on bad input. The ray engine checks the data itself, while Ray
    starts (RayGrid), still before any output exists.
    """
    from .api import checked  # the checks fedsim.run() makes too
    from .scenario.schema import load_scenario

    return checked(load_scenario(path, overrides), check_data=check_data)


def interrupted_line(out_dir: Path) -> str:
    """The one line for a run interrupted (Ctrl-C, SIGTERM) after it claimed ``out_dir``, saying what the
    folder really holds. Before round 1 ended (e.g. while Ray starts) there is no result: what the run
    wrote (scenario.yaml, an empty metrics.jsonl) is removed, so the same command starts it again."""
    from .run.checkpoint import CHECKPOINT
    from .run.outdir import clear_results
    from .run.results import RunFileError, read_metrics

    try:
        rounds = len(read_metrics(out_dir)) if (out_dir / "metrics.jsonl").is_file() else 0
    except (RunFileError, OSError):
        rounds = None  # unreadable: say nothing about its rounds, remove nothing
    if rounds == 0:
        try:
            clear_results(out_dir)
        except OSError:
            pass  # the line below still holds: no round finished
        return "fedsim: interrupted before round 1 finished; no results were kept: run the same command again"
    done = f"{rounds} rounds completed" if rounds is not None else "the rounds completed"
    if (out_dir / CHECKPOINT).is_file():
        return (f"fedsim: interrupted; {done} so far are in {out_dir / 'metrics.jsonl'}; continue with "
                f"`python -m fedsim resume {out_dir}`")
    return (f"fedsim: interrupted; {done} so far are in {out_dir / 'metrics.jsonl'}, but no checkpoint was "
            f"written yet (output.checkpoint_every), so it cannot be resumed: run it again with --overwrite")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    if argv and argv[0] == "sweep":
        from .compare.sweep import main as sweep_main

        return sweep_main(argv[1:])
    if argv and argv[0] == "deploy":
        from .deploy.follow import main as deploy_main

        return deploy_main(argv[1:])
    if argv and argv[0] == "report":
        from .compare.report import main as report_main

        return report_main(argv[1:])
    if argv and argv[0] == "resume":
        from .run.resume import main as resume_main

        return resume_main(argv[1:])
    validate = bool(argv) and argv[0] == "validate"
    args = _parser(validate).parse_args(argv[1:] if validate else argv)
    # Start-up (validation, data check, imports, the output folder) writes nothing until the
    # folder is claimed: Ctrl-C here is one line, exit 130; warnings libraries raise while a
    # scenario is checked are shown only if it passes (the one line says what is wrong).
    with contextlib.ExitStack() as held:
        try:
            from .run.outdir import OutputDirError, claim_output_dir
            from .scenario.schema import ScenarioError

            try:
                with warnings.catch_warnings(record=True) as caught:
                    scenario = prepare(args.scenario, args.overrides, check_data=validate)
            except ScenarioError as exc:
                print(f"fedsim: error: {exc}", file=sys.stderr)
                return EXIT_BAD_INPUT
            for w in caught:
                warnings.showwarning(w.message, w.category, w.filename, w.lineno)
            if validate:
                print(f"{args.scenario}: ok ({scenario.name}, {scenario.data.num_clients} clients, "
                      f"{scenario.strategy.name}, {scenario.train.rounds} rounds, engine {scenario.engine.name})")
                return 0

            from .engines import run_scenario
            from .run.results import DiskFullError
            from .run.rounds import RunStopped

            if args.out is not None and (not args.out.strip() or "\0" in args.out):  # "" was ignored silently
                print(f"fedsim: error: --out: must be a folder path, got {args.out!r}", file=sys.stderr)
                return EXIT_BAD_INPUT
            out_dir = Path(args.out if args.out is not None else scenario.output.dir or Path("runs") / scenario.name)
            try:
                held.enter_context(claim_output_dir(out_dir, overwrite=args.overwrite))
            except OutputDirError as exc:
                print(f"fedsim: error: output folder {exc}", file=sys.stderr)
                return EXIT_BAD_INPUT
        except KeyboardInterrupt:
            print("fedsim: interrupted during start-up; nothing was written", file=sys.stderr)
            return 130
        try:
            summary = run_scenario(scenario, out_dir, progress=scenario.output.progress and not args.quiet)
        except ScenarioError as exc:  # data the engine found bad before writing anything
            print(f"fedsim: error: {exc}", file=sys.stderr)
            return EXIT_BAD_INPUT
        except KeyboardInterrupt:  # Ctrl-C or SIGTERM (fedsim.console.sigterm_as_ctrl_c); the folder is still held
            print(interrupted_line(out_dir), file=sys.stderr)
            return 130
        except RunStopped as exc:  # every client failed, or the model diverged
            print(f"fedsim: error: {exc}; rounds so far are in {out_dir / 'metrics.jsonl'}", file=sys.stderr)
            return 1
        except DiskFullError as exc:  # every file as it was before the failed write: resumable
            from .run.checkpoint import disk_full_line

            print(disk_full_line(exc, out_dir), file=sys.stderr)
            return 1
    print_table(summary, out_dir)
    return 0
