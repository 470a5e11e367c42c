"""``python -m fedsim deploy SCENARIO [--superlink NAME] [--out DIR] [--app DIR]``: submit a
scenario to a SuperLink with `flwr run`, stream the run's logs (`flwr log --stream`) and exit
with the run's outcome: 0 when the ServerApp completed, 1 when it failed or was stopped
(with Flower's status details on stderr), 2 when the run could not be submitted: bad usage, a
scenario that does not validate (checked here first, as ``fedsim`` checks it, without the data:
no `flwr` is started), or a SuperLink that cannot be reached; each is one line on stderr.

The SuperLink connection (address, ``root-certificates``) comes from `flwr`'s config.toml
(``FLWR_HOME``), as for `flwr run`. The log streamer is started in its own process group and
stopped by its PID when the run ends or on Ctrl-C.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from ..console import EXIT_BAD_INPUT, EXIT_FAILED, Parser


def _flwr(*args: str, env=None, cwd=None, timeout: float = 120) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("flwr")
    return subprocess.run([str(exe if exe.exists() else "flwr"), *args], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=timeout)


def _json(text: str) -> dict:
    start = text.find("{")  # flwr may print a line before the JSON object
    return json.loads(text[start:]) if start >= 0 else {}


def _last_line(answer: dict, res: subprocess.CompletedProcess) -> str:
    """Flower's reason in one line: the last line of its error message (the lines before it are
    configuration warnings and the connection it used)."""
    text = str(answer.get("error-message") or "") or (res.stderr or "") or (res.stdout or "")
    lines = [line.strip(" \t│╭╮╰╯─") for line in text.splitlines()]
    lines = [line for line in lines if line]
    return (lines[-1] if lines else f"flwr run exited with code {res.returncode}")[:500]


def run_status(run_id: str, superlink: str | None, env=None, cwd=None) -> tuple[str, str]:
    """(status, details) of a run, e.g. ("finished:completed", "")."""
    res = _flwr("list", "--run-id", run_id, *([superlink] if superlink else []), "--format", "json", env=env, cwd=cwd)
    runs = _json(res.stdout).get("runs", []) if res.returncode == 0 else []
    if not runs:
        return "unknown", (res.stdout + res.stderr).strip()[-500:]
    return str(runs[0].get("status", "unknown")), str(runs[0].get("status-details") or "")


def follow(scenario: str | Path, superlink: str | None = None, out: str | Path | None = None, app: str | Path = ".",
           env=None, poll: float = 2.0, timeout: float | None = None, stream=sys.stdout) -> int:
    """Submit, stream logs, return the exit code (0 completed, 1 failed/stopped, 2 not submitted)."""
    scenario = Path(scenario).resolve()
    config = f'scenario="{scenario}" progress=false' + (f' out-dir="{Path(out).resolve()}"' if out else "")
    try:
        res = _flwr("run", str(app), *([superlink] if superlink else []), "--run-config", config, "--format", "json",
                    env=env, cwd=app, timeout=min(120, timeout) if timeout else 120)
    except subprocess.TimeoutExpired as exc:
        print(f"fedsim deploy: error: the run was not submitted: `flwr run` gave no answer within {exc.timeout:.0f} s",
              file=sys.stderr)
        return EXIT_BAD_INPUT
    except OSError as exc:  # no flwr executable
        print(f"fedsim deploy: error: the run was not submitted: cannot start flwr ({exc.strerror or exc})",
              file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        answer = _json(res.stdout)
    except ValueError:
        answer = {}
    run_id = answer.get("run-id") if res.returncode == 0 else None
    if not run_id:
        print(f"fedsim deploy: error: the run was not submitted: {_last_line(answer, res)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(f"fedsim deploy: run {run_id} submitted", file=stream, flush=True)
    exe = Path(sys.executable).with_name("flwr")
    logs = subprocess.Popen([str(exe if exe.exists() else "flwr"), "log", run_id, *([superlink] if superlink else []),
                             "--stream"], stdout=stream if stream is not sys.stdout else None,
                            stderr=subprocess.STDOUT, env=env, cwd=app, start_new_session=True)
    deadline = None if timeout is None else time.monotonic() + timeout
    status, details = "unknown", ""
    try:
        while True:
            status, details = run_status(run_id, superlink, env=env, cwd=app)
            if status.startswith("finished"):
                break
            if deadline is not None and time.monotonic() > deadline:
                details = f"no result within {timeout:.0f} s (status {status})"
                status = "timeout"
                break
            time.sleep(poll)
        try:  # let the streamer print the run's last lines
            logs.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
    finally:
        if logs.poll() is None:
            try:
                os.killpg(logs.pid, signal.SIGTERM)
                logs.wait(timeout=10)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                try:
                    os.killpg(logs.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
    if status == "finished:completed":
        print(f"fedsim deploy: run {run_id} completed", file=stream, flush=True)
        return 0
    print(f"fedsim deploy: run {run_id} {status}" + (f": {details}" if details else ""), file=sys.stderr)
    return EXIT_FAILED


def check_scenario(path: str | Path) -> None:
    """What the run command checks before it writes anything (``fedsim.cli.prepare``) but the data:
    that lives on the SuperNodes (``fedsim.deploy.node_data``). ScenarioError, one line, if bad."""
    from ..scenario.schema import ScenarioError, load_scenario
    from ..world.build import check_memory
    from ..world.memory import MemoryRefused

    scenario = load_scenario(path)
    try:
        check_memory(scenario)
    except MemoryRefused as exc:
        raise ScenarioError(str(exc)) from None


def main(argv: list[str] | None = None) -> int:
    ap = Parser(prog="fedsim deploy", description=__doc__.split("\n\n")[0])  # usage errors: one line, exit 2
    ap.add_argument("scenario", help="scenario YAML (its path is passed to the apps)")
    ap.add_argument("--superlink", help="SuperLink connection name in flwr's config.toml (default: its default)")
    ap.add_argument("--out", help="results folder on the SuperLink's machine (default: output.dir or runs/<name>)")
    ap.add_argument("--app", default=".", help="the Flower app folder (this repository)")
    ap.add_argument("--timeout", type=float, help="give up (exit 1) after this many seconds")
    args = ap.parse_args(argv)
    if args.timeout is not None and not (args.timeout > 0 and math.isfinite(args.timeout)):
        print(f"fedsim: error: --timeout: must be a positive number of seconds, got {args.timeout:g}", file=sys.stderr)
        return EXIT_BAD_INPUT
    from ..scenario.schema import ScenarioError

    try:  # the scenario is checked here, as `fedsim` checks it, before anything is submitted
        check_scenario(args.scenario)
    except KeyboardInterrupt:
        print("fedsim deploy: interrupted during start-up; nothing was submitted", file=sys.stderr)
        return 130
    except ScenarioError as exc:
        print(f"fedsim: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        return follow(args.scenario, args.superlink, args.out, args.app, timeout=args.timeout)
    except KeyboardInterrupt:
        print("fedsim deploy: interrupted (the run goes on on the SuperLink: `flwr stop RUN_ID`)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
