"""The same apps deploy unchanged: a real SuperLink and two SuperNodes on loopback, `flwr run`,
and the per-round metrics equal the inline engine's for the same seed."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import yaml

from fedsim.run.results import read_metrics

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(cmd, log: Path, env) -> subprocess.Popen:
    # Own process group: a SuperNode spawns ClientApp processes we must stop too.
    return subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env, start_new_session=True)


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(what())
        time.sleep(0.5)


def test_flwr_run_on_superlink_and_supernodes(tmp_path):
    scenario = {"name": "deploy", "seed": 3, "data": {"dataset": "digits", "num_clients": 2},
                "model": {"name": "mlp", "hidden": [16]}, "train": {"rounds": 2},
                "audit": {"threat": "gradient", "batch_size": 1, "clients": 1, "attack": "idlg",
                          "attack_config": {"steps": 5}},
                "output": {"plot": False, "progress": False}}
    scenario_path = tmp_path / "deploy.yaml"
    scenario_path.write_text(yaml.safe_dump(scenario))
    home = tmp_path / "flwr-home"
    home.mkdir()
    link_port = _free_port()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "test"\n[superlink.test]\naddress = "127.0.0.1:{link_port}"\ninsecure = true\n')
    # The SuperLink and SuperNodes start Flower's other executables by name: the venv's bin
    # must be on PATH even when the tests run as .venv/bin/python without an activated venv.
    env = {**os.environ, "FLWR_HOME": str(home), "FLWR_TELEMETRY_ENABLED": "0",
           "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
           "PATH": os.pathsep.join([str(BIN), os.environ.get("PATH", "")])}
    procs = []
    try:
        link_log = tmp_path / "superlink.log"
        procs.append(_start([str(BIN / "flower-superlink"), "--insecure", "--host", "127.0.0.1",
                             "--port", str(link_port), "--database", str(tmp_path / "state.db")], link_log, env))
        _wait_for(lambda: "Uvicorn running" in link_log.read_text(), 60,
                  lambda: "SuperLink did not start:\n" + link_log.read_text()[-2000:])
        for i in range(2):
            procs.append(_start([str(BIN / "flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{link_port}",
                                 "--node-config", f"partition-id={i} num-partitions=2",
                                 "--host", "127.0.0.1", "--port", str(_free_port())], tmp_path / f"node{i}.log", env))
        out = tmp_path / "out"
        run = subprocess.run([str(BIN / "flwr"), "run", ".", "test", "--run-config",
                              f'scenario="{scenario_path}" out-dir="{out}" progress=false'],
                             cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
        assert run.returncode == 0, run.stdout + run.stderr
        _wait_for(lambda: (out / "summary.json").exists(), 240,
                  lambda: "the deployed run did not finish:\n" + link_log.read_text()[-2000:])
    finally:
        for p in procs:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for p in procs:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)

    from fedsim.engines import run_scenario
    from fedsim.scenario import parse_scenario

    run_scenario(parse_scenario(scenario), tmp_path / "inline", progress=False)
    key = lambda rows: [(r["round"], r["accuracy"], r["loss"], r["bytes_up"], r["failures"]) for r in rows]  # noqa
    assert key(read_metrics(out)) == key(read_metrics(tmp_path / "inline"))
    # The deployed server attacks as well but has no client data to score with: it says so.
    deployed = [json.loads(line) for line in (out / "audit.jsonl").read_text().splitlines()]
    simulated = [json.loads(line) for line in (tmp_path / "inline" / "audit.jsonl").read_text().splitlines()]
    assert [r["round"] for r in deployed] == [r["round"] for r in simulated] == [1, 2]
    assert all(r["psnr"] is None and "no ground truth" in r["note"] for r in deployed)
    assert all((out / "audit" / r["reconstruction"]).exists() for r in deployed)
    assert all(r["psnr"] is not None and r["note"] == "" for r in simulated)
