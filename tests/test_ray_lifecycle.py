"""A Ray instance fedsim starts is stopped completely (and without Ray's one-second stall), whatever
stops the run: SIGTERM is handled as Ctrl-C, an interrupt while Ray starts is one true line, and kill -9
of the driver leaves no Ray process behind (issue 21 item 10)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from fedsim.engines import run_scenario
from fedsim.scenario import parse_scenario
from tests.conftest import small_raw

ray = pytest.importorskip("ray")


def test_stop_local_ray_ends_every_process_ray_started():
    import ray._private.worker as ray_worker

    from fedsim.engines.ray_cluster import start_local_ray, stop_local_ray

    if ray.is_initialized():
        pytest.skip("another test module holds a Ray instance")
    start_local_ray(num_cpus=1)
    node = ray_worker._global_node
    processes = [info.process for infos in node.all_processes.values() for info in infos]
    assert len(processes) >= 3  # GCS, raylet, the autoscaler monitor, ...
    stop_local_ray()
    assert not ray.is_initialized()
    still_running = [p.args[0] if isinstance(p.args, list) else p.args for p in processes if p.poll() is None]
    assert not still_running, still_running


def test_a_ray_address_in_the_environment_does_not_decide_where_a_local_run_goes():
    """RAY_ADDRESS (or a `ray start` cluster file) must not make fedsim join, or fail to join, a
    cluster: only engine.ray.address / sweep --address join one."""
    code = ("from fedsim.engines.ray_cluster import start_local_ray, stop_local_ray\nimport ray\nstart_local_ray(1)\n"
            "print('cpus', ray.cluster_resources().get('CPU'))\nstop_local_ray()\n")
    env = {**os.environ, "RAY_ADDRESS": "127.0.0.1:1"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "cpus 1.0" in proc.stdout


# ----------------------------------------------------------------------------- issue 21 item 10: signals, kill -9
# Each test starts `python -m fedsim` (a run or a sweep) on Ray and signals it: SIGTERM is handled as Ctrl-C
# (one line, exit 130, resumable, Ray stopped), an interrupt while Ray starts names no file that is not
# there, and kill -9 of the driver leaves no Ray process behind (the watchdog in fedsim.engines.ray_cluster).

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "HF_HUB_OFFLINE": "1"}
WALL = ("wall_s", "elapsed_s")
NEEDS_PROC = pytest.mark.skipif(not os.path.isdir("/proc"), reason="finds the run's processes in /proc (Linux)")


def _descendants(pid: int) -> dict[int, str]:
    """Every live process below ``pid`` (from /proc), with its command line."""
    parents: dict[int, int] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                stat = Path(f"/proc/{name}/stat").read_text()
            except OSError:
                continue
            fields = stat.rpartition(")")[2].split()
            if fields[0] != "Z":
                parents[int(name)] = int(fields[1])
    found, todo = {}, [pid]
    while todo:
        parent = todo.pop()
        for child, ppid in parents.items():
            if ppid == parent and child not in found:
                found[child] = _cmdline(child)
                todo.append(child)
    return found


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def _alive(pids) -> dict[int, str]:
    """Those of ``pids`` still running (a zombie has ended)."""
    alive = {}
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
        except OSError:
            continue
        if state != "Z":
            alive[pid] = _cmdline(pid)
    return alive


def _wait_until(condition, proc, timeout=120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, f"it ended first: {proc.communicate()[1][-2000:]}"
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def _rows(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    if not path.is_file():
        return []
    return [{k: v for k, v in json.loads(line).items() if k not in WALL}
            for line in path.read_text().splitlines(keepends=True) if line.endswith("\n")]


def _fedsim(*args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "fedsim", *map(str, args), "--quiet"], cwd=REPO, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _scenario(tmp_path: Path, engine: str, rounds: int) -> Path:
    path = tmp_path / "scenario.yaml"
    path.write_text(yaml.safe_dump(small_raw(train__rounds=rounds, engine={"name": engine})))
    return path


def _gone_within(pids, seconds: float) -> dict[int, str]:
    """Those of ``pids`` still alive after up to ``seconds``."""
    deadline = time.monotonic() + seconds
    while _alive(pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    return _alive(pids)


@NEEDS_PROC
@pytest.mark.parametrize("engine", ["inline", "ray"])
def test_sigterm_is_handled_as_ctrl_c_and_the_run_resumes_to_the_same_metrics(tmp_path, engine):
    """Was (ray): Ray's C++ stack dump on stderr and exit 15."""
    path, out = _scenario(tmp_path, engine, rounds=30), tmp_path / "out"
    proc = _fedsim(path, "--out", out)
    _wait_until(lambda: len(_rows(out)) >= 2, proc)
    ray_processes = _descendants(proc.pid)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert len(err.strip().splitlines()) == 1 and "SIGTERM received" not in err and "Traceback" not in err, err
    assert err.startswith("fedsim: interrupted;") and f"python -m fedsim resume {out}" in err, err
    assert not (out / "summary.json").exists() and (out / "checkpoint.pkl").is_file()
    assert not _gone_within(ray_processes, 5)  # Ray was shut down with the run
    resumed = subprocess.run([sys.executable, "-m", "fedsim", "resume", str(out), "--quiet"], cwd=REPO, env=ENV,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    # the same run left alone (inline, in this process: the ray engine gives the inline engine's metrics)
    run_scenario(parse_scenario(small_raw(train__rounds=30)), tmp_path / "alone", progress=False)
    assert _rows(out) == _rows(tmp_path / "alone") and len(_rows(out)) == 30


@NEEDS_PROC
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_an_interrupt_while_ray_starts_names_no_file_that_is_not_there(tmp_path, signum):
    """Was: 'rounds completed so far are in OUT/metrics.jsonl', a file no round had written."""
    path, out = _scenario(tmp_path, "ray", rounds=3), tmp_path / "out"
    proc = _fedsim(path, "--out", out)
    _wait_until(lambda: any("raylet" in cmd for cmd in _descendants(proc.pid).values()), proc)
    assert not _rows(out)
    ray_processes = _descendants(proc.pid)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith("fedsim: interrupted before round 1 finished") and "metrics.jsonl" not in err, err
    assert not out.exists()  # nothing was kept: the same command starts again
    assert not _gone_within(ray_processes, 5)


def _sweep(tmp_path: Path, rounds: int) -> Path:
    base = tmp_path / "base.yaml"
    base.write_text(yaml.safe_dump(small_raw(train__rounds=rounds)))
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({"name": "tiny", "base": "base.yaml", "grid": {"seed": [0, 1]}}))
    return path


@NEEDS_PROC
def test_sigterm_on_a_sweep_is_handled_as_ctrl_c_and_the_sweep_finishes_after(tmp_path):
    """Was: Ray's C++ stack dump on stderr and exit 1."""
    path = _sweep(tmp_path, rounds=20)
    runs = tmp_path / "out" / "tiny" / "runs"
    proc = _fedsim("sweep", path, "--out", tmp_path / "out", "--workers", 2)
    _wait_until(lambda: runs.is_dir() and any(len(_rows(run)) >= 1 for run in runs.iterdir()), proc)
    ray_processes = _descendants(proc.pid)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert len(err.strip().splitlines()) == 1 and "SIGTERM received" not in err and "Traceback" not in err, err
    assert err.startswith("fedsim: interrupted;"), err
    assert not _gone_within(ray_processes, 5)
    again = subprocess.run([sys.executable, "-m", "fedsim", "sweep", str(path), "--out", str(tmp_path / "out"),
                            "--workers", "2", "--quiet"], cwd=REPO, env=ENV, capture_output=True, text=True,
                           timeout=300)
    assert again.returncode == 0, again.stderr
    assert all(len(_rows(run)) == 20 for run in runs.iterdir())


@NEEDS_PROC
@pytest.mark.parametrize("what", ["run", "sweep"])
def test_kill_9_of_the_driver_leaves_no_ray_process_behind(tmp_path, what):
    """Was: Ray's dashboard and runtime-env agents (the raylet's children) ran on for about a minute."""
    if what == "run":
        proc = _fedsim(_scenario(tmp_path, "ray", rounds=30), "--out", tmp_path / "out")
    else:
        proc = _fedsim("sweep", _sweep(tmp_path, rounds=30), "--out", tmp_path / "out", "--workers", 2)
    worker = "ray::ClientAppActor" if what == "run" else "ray::_run_task"
    wanted = ("ray::DashboardAgent", "ray::RuntimeEnvAgent", worker)  # the agents, and a worker at work
    _wait_until(lambda: all(any(cmd.startswith(w) for cmd in _descendants(proc.pid).values()) for w in wanted), proc)
    ray_processes = _descendants(proc.pid)
    proc.kill()
    proc.communicate()
    left = _gone_within(ray_processes, 10)
    assert not left, left
