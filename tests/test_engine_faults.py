"""The fault suite (issue 13): dead actors, hung clients, runs where every client fails, and
where the ray engine may run (a bad or unreachable address, a client no node can host).

One Ray instance (2 CPUs, module fixture) serves the ray runs here. The faulty clients are
plug-in strategies that reach the actors through ``RayGrid(setup=...)``, as in
tests/test_engine_ray.py. Only 127.0.0.1 is ever contacted.

(All clients failing through the CLI, exit 1 with the reason printed, is
tests/test_engine_inline.py's lr-overflow test; here it is actors that cannot start.)
"""

from __future__ import annotations

import contextlib
import os
import socket
import tempfile
import threading
import time

import pytest
import yaml
from flwr.app import ConfigRecord

from fedsim.run.apps import server_app
from fedsim.engines import RUN_ID, server_context
from fedsim.engines.identity import enter_server_identity
from fedsim.engines.inline import NODE_ID_BASE, InlineGrid
from fedsim.run.observers import AllClientsFailed
from fedsim.run.results import read_metrics
from strategies import ClientAlgorithm, StrategySpec, Upload, register_strategy
from strategies.base import NoParams
from strategies.fedavg import FedAvgStrategy
from tests import fault_hooks
from tests.conftest import small_raw

ray = pytest.importorskip("ray")

KILLER, HUNG, HANG_ROUND = 0, 3, 2  # partition ids; the round in which HUNG hangs
RELEASE = threading.Event()  # inline: the server lets the hung client go
HUNG_THREADS: list[threading.Thread] = []  # inline: the thread the hung client hangs in


class CountingClient(ClientAlgorithm):
    """FedAvg's local SGD that counts its calls in Context.state; subclasses misbehave first."""

    def count(self, job) -> None:
        state = job.state
        calls = int(state["probe"]["calls"]) if "probe" in state else 0
        state["probe"] = ConfigRecord({"calls": calls + 1})

    def misbehave(self, job) -> None:
        pass

    def train(self, job) -> Upload:
        self.count(job)
        self.misbehave(job)
        trainer = job.trainer()
        trainer.run()
        return job.upload(trainer)


class KillerClient(CountingClient):
    def misbehave(self, job) -> None:
        if job.data.partition_id == KILLER:
            os._exit(3)  # its actor's process dies, as on a segfault or an OOM kill


class SleepingClient(CountingClient):
    """Hangs in HANG_ROUND (on ray, where its actor is killed long before it would wake)."""

    def misbehave(self, job) -> None:
        if job.data.partition_id == HUNG and job.settings.server_round == HANG_ROUND:
            time.sleep(120)


LATE, LATE_TIMEOUT, LATE_BY = 1, 2.0, 0.5  # partition that answers LATE_BY s after engine.timeout_s in HANG_ROUND
ONCE_KILLER = 0  # partition that kills its actor in HANG_ROUND, once (a marker file says it has)
KILL_MARKER = os.path.join(tempfile.gettempdir(), "fedsim-tests-once-killer.marker")  # the actors see this path


class LateClient(CountingClient):
    """Trains, then holds the GIL in one C call (libc usleep through ctypes.PyDLL) until LATE_BY s
    past the time-out: the actor can say nothing meanwhile, and its reply is ready at once after."""

    def train(self, job) -> Upload:
        started = time.monotonic()
        upload = super().train(job)
        if job.data.partition_id == LATE and job.settings.server_round == HANG_ROUND:
            import ctypes

            left = LATE_TIMEOUT + LATE_BY - (time.monotonic() - started)
            ctypes.PyDLL(None).usleep(ctypes.c_uint(int(max(left, 0) * 1e6)))
        return upload


class OnceKillerClient(CountingClient):
    """Kills its actor's process once (as an OOM kill or kill -9 would), wherever it runs: a batchmate
    re-sent alone would succeed, and the death would leave no trace."""

    def misbehave(self, job) -> None:
        if job.data.partition_id == ONCE_KILLER and job.settings.server_round == HANG_ROUND:
            try:
                fd = os.open(KILL_MARKER, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                return
            os.close(fd)
            os._exit(3)


class WaitingClient(CountingClient):
    """Hangs in HANG_ROUND until the server (ReleasingFedAvg, same process: inline) lets it go,
    then changes its Context, as a late call may: the Grid must never see that."""

    def misbehave(self, job) -> None:
        if job.data.partition_id == HUNG and job.settings.server_round == HANG_ROUND:
            HUNG_THREADS.append(threading.current_thread())
            RELEASE.wait(60)
            self.count(job)


class ReleasingFedAvg(FedAvgStrategy):
    """Lets the hung inline client go in round HANG_ROUND + 1 and waits until its thread has ended."""

    def aggregate_train(self, server_round, replies):
        if server_round == HANG_ROUND + 1 and HUNG_THREADS:
            RELEASE.set()
            HUNG_THREADS[0].join(30)
            assert not HUNG_THREADS[0].is_alive()
        return super().aggregate_train(server_round, replies)


def register_faulty() -> None:
    for name, client, server in (("killer", KillerClient, FedAvgStrategy), ("sleeper", SleepingClient, FedAvgStrategy),
                                 ("waiter", WaitingClient, ReleasingFedAvg),
                                 ("late", LateClient, FedAvgStrategy), ("once-killer", OnceKillerClient, FedAvgStrategy)):
        register_strategy(StrategySpec(name=f"faults-{name}", params=NoParams, client=client,
                                       server=lambda params, settings, server=server: server(settings)))


register_faulty()  # in the driver; RayGrid(setup=register_faulty) does it in each actor


def _run(grid_factory, scenario, out_dir) -> dict[int, int]:
    """Run ``scenario`` on the Grid ``grid_factory(client_config)`` makes; returns each partition's
    call count as its Context in the Grid says."""
    enter_server_identity(RUN_ID)
    context = server_context(scenario, out_dir, progress=False)
    client_config = {"scenario-yaml": context.run_config["scenario-yaml"]}
    grid = grid_factory(client_config)
    with grid if hasattr(grid, "__enter__") else contextlib.nullcontext():
        server_app(grid, context)
        return {node - NODE_ID_BASE: int(ctx.state["probe"]["calls"]) if "probe" in ctx.state else 0
                for node, ctx in grid.contexts.items()}


def _ray_grid(scenario, **ray_config):
    from fedsim.engines.ray import RayGrid

    def make(client_config, setup=register_faulty, client_app=None):
        return RayGrid(scenario.data.num_clients, client_config, scenario.engine.ray.model_copy(update=ray_config),
                       RUN_ID, setup=setup, client_app=client_app)
    return make


def _main(tmp_path, capsys, **overrides):
    """The CLI on a small ray scenario: (exit code, stderr lines, seconds, output dir)."""
    from fedsim.cli import main

    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(small_raw(engine__name="ray", **overrides)))
    out = tmp_path / "out"
    started = time.monotonic()
    code = main([str(path), "--out", str(out)])
    return code, capsys.readouterr().err.strip().splitlines(), time.monotonic() - started, out


# ---------------------------------------------------------------------------- where ray runs


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def loopback():
    """Ray's address canonicalisation keeps 127.0.0.1 (not the machine's address) under this switch."""
    from fedsim.engines.ray_cluster import bind_ray_to_loopback

    bind_ray_to_loopback()


def test_a_malformed_ray_address_is_one_line_exit_2(tmp_path, capsys):
    code, err, _, out = _main(tmp_path, capsys, engine__ray={"address": "head.example:port"})
    assert code == 2 and len(err) == 1 and err[0].startswith("fedsim: error: engine.ray.address:"), err
    assert not out.exists()


@pytest.mark.parametrize("listening", [False, True], ids=["refused", "silent"])
def test_an_unreachable_ray_address_is_one_line_exit_2_within_seconds(loopback, tmp_path, capsys, listening):
    """Refused at once; a port that accepts but never answers after the 3 s deadline (ray.init
    would retry both for minutes)."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        if listening:
            server.listen()
        port = server.getsockname()[1]
        code, err, took, out = _main(tmp_path, capsys, engine__ray={"address": f"127.0.0.1:{port}"})
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith(f"fedsim: error: engine.ray.address: cannot reach a Ray cluster at 127.0.0.1:{port}")
    assert took < 15, took  # imports and the data included; the address itself: <= 3 s
    assert not out.exists()


def test_auto_joins_only_what_ray_address_names(loopback, tmp_path, capsys, monkeypatch):
    port = _free_port()
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{port}")
    code, err, _, _ = _main(tmp_path, capsys, engine__ray={"address": "auto"})
    assert code == 2 and f"cannot reach a Ray cluster at auto (127.0.0.1:{port})" in err[0], err


def test_the_address_check_passes_a_live_ray_head(local_ray):
    import ray._private.worker as ray_worker

    from fedsim.engines.ray_cluster import check_ray_address

    address = ray_worker._global_node.gcs_address  # the module's own instance, on 127.0.0.1
    assert address.startswith("127.0.0.1:") and check_ray_address(address) == address


def test_a_client_no_node_can_host_is_refused_before_round_1(local_ray, tmp_path, capsys):
    code, err, _, out = _main(tmp_path, capsys, engine__ray={"num_cpus_per_client": 3})  # cluster: 2 CPUs
    assert code == 2 and err == ["fedsim: error: engine.ray.num_cpus_per_client: 3 CPUs per client actor, but the "
                                 "largest Ray node has 2: no client could ever run"], err
    assert not out.exists()


# ---------------------------------------------------------------------------- dead actors


def test_ray_run_trains_on_when_an_actor_dies_every_round(local_ray, small_scenario, tmp_path):
    """Partition KILLER kills its actor's process in each of 10 rounds: every round the dead
    actor is replaced, KILLER fails with the reason and everyone else trains (but round 1's batchmate)."""
    rounds = 10
    scenario = small_scenario(train__rounds=rounds, strategy={"name": "faults-killer"})
    calls = _run(_ray_grid(scenario, num_actors=2), scenario, tmp_path)

    rows = read_metrics(tmp_path)
    assert [r["round"] for r in rows] == list(range(1, rounds + 1))
    # Round 1: KILLER's batchmate dies with it (issue 21 (4): each lost call is a failure); from then
    # on both run alone until they answer, so only KILLER fails.
    assert [(r["participants"], r["failures"]) for r in rows] == [(2, 2)] + [(3, 1)] * (rounds - 1), rows
    killer = str(NODE_ID_BASE + KILLER)
    assert all(r["failure_reasons"][killer].startswith("ClientApp actor died: ") for r in rows)
    assert all(v.startswith("ClientApp actor died: ") for v in rows[0]["failure_reasons"].values())
    assert rows[-1]["accuracy"] > rows[0]["accuracy"] + 0.1, [r["accuracy"] for r in rows]
    mate = {int(n) - NODE_ID_BASE for n in rows[0]["failure_reasons"]} - {KILLER}
    assert calls == {p: 0 if p == KILLER else rounds - (p in mate) for p in range(4)}  # a dead call's Context is never kept


@pytest.fixture
def kill_marker():
    with contextlib.suppress(FileNotFoundError):
        os.remove(KILL_MARKER)
    yield KILL_MARKER
    with contextlib.suppress(FileNotFoundError):
        os.remove(KILL_MARKER)


def test_an_actor_that_dies_holding_two_messages_fails_both(local_ray, small_scenario, tmp_path, kill_marker):
    """Issue 21 (4): ONCE_KILLER's actor dies in HANG_ROUND while it holds ONCE_KILLER's message and a
    batchmate's (num_actors 2, 4 clients: two per call). Each lost call is a failure naming the dead
    actor (before: both were re-sent alone, succeeded, and the death left no trace); the run goes on."""
    rounds = 3
    scenario = small_scenario(train__rounds=rounds, strategy={"name": "faults-once-killer"})
    calls = _run(_ray_grid(scenario, num_actors=2), scenario, tmp_path / "out")
    assert os.path.exists(kill_marker)
    rows = read_metrics(tmp_path / "out")
    assert [(r["participants"], r["failures"]) for r in rows] == [(4, 0), (2, 2), (4, 0)], rows
    reasons = rows[HANG_ROUND - 1]["failure_reasons"]
    assert str(NODE_ID_BASE + ONCE_KILLER) in reasons and len(reasons) == 2, reasons
    assert all(reason.startswith("ClientApp actor died: ") for reason in reasons.values()), reasons
    lost = {int(node) - NODE_ID_BASE for node in reasons}
    assert calls == {p: rounds - (p in lost) for p in range(4)}  # a dead call's Context is never kept


def test_actors_that_cannot_start_fail_their_clients_and_the_run_stops(local_ray, small_scenario, tmp_path):
    """The budget that once left dead actors in the pool: now every round gets fresh actors, each
    client fails with the start-up's reason, and FailureWatch stops the run after 3 rounds."""
    scenario = small_scenario(train__rounds=10)
    make = _ray_grid(scenario, num_actors=1)
    with pytest.raises(AllClientsFailed, match=r"rounds 1-3; stopping \(last reason: ClientApp actor could not "
                                               r"start: .*RuntimeError: probe: this actor cannot start"):
        _run(lambda config: make(config, setup=fault_hooks.cannot_start, client_app=fault_hooks.idle_app),
             scenario, tmp_path)
    rows = read_metrics(tmp_path)
    assert [r["participants"] for r in rows] == [0, 0, 0]


# ---------------------------------------------------------------------------- hung clients


def _hung_rows(tmp_path, rounds):
    rows = read_metrics(tmp_path)
    assert [r["round"] for r in rows] == list(range(1, rounds + 1))
    return rows, str(NODE_ID_BASE + HUNG)


def test_ray_gives_up_a_hung_call_and_the_node_is_back_next_round(local_ray, small_scenario, tmp_path):
    rounds, timeout = 3, 4.0
    scenario = small_scenario(train__rounds=rounds, strategy={"name": "faults-sleeper"}, engine={"timeout_s": timeout})
    started = time.monotonic()
    calls = _run(_ray_grid(scenario, num_actors=2), scenario, tmp_path)
    rows, hung = _hung_rows(tmp_path, rounds)
    assert time.monotonic() - started < 60
    # HUNG shared its actor's batch with another client: that one's finished reply is kept.
    assert [(r["participants"], r["failures"]) for r in rows] == [(4, 0), (3, 1), (4, 0)]
    assert rows[1]["failure_reasons"] == {hung: f"timeout: no reply within engine.timeout_s ({timeout:g} s)"}
    assert rows[1]["wall_s"] < timeout + 10
    assert calls == {0: 3, 1: 3, 2: 3, HUNG: 2}  # the given-up call's Context never came back


def test_ray_counts_a_reply_after_the_timeout_as_a_timeout(local_ray, small_scenario, tmp_path):
    """Issue 21 (4): LATE answers LATE_BY s after engine.timeout_s; that reply is a failure with reason
    timeout, as a missing one is (before: kept as a success, the Grid waiting up to FINISHED_WAIT_S for it)."""
    rounds = 3
    scenario = small_scenario(train__rounds=rounds, strategy={"name": "faults-late"},
                              engine={"timeout_s": LATE_TIMEOUT})
    calls = _run(_ray_grid(scenario, num_actors=2), scenario, tmp_path)
    rows, _ = _hung_rows(tmp_path, rounds)
    late = str(NODE_ID_BASE + LATE)
    assert [(r["participants"], r["failures"]) for r in rows] == [(4, 0), (3, 1), (4, 0)], rows
    assert rows[1]["failure_reasons"] == {late: f"timeout: no reply within engine.timeout_s ({LATE_TIMEOUT:g} s)"}
    assert calls[LATE] == rounds - 1  # the late call's Context never came back


def test_inline_watchdog_times_a_hung_client_out_and_the_run_goes_on(small_scenario, tmp_path):
    """Inline cannot stop the hung call: its node is busy (an error reply at once) until the call
    returns, then trains again; what the late call did to its Context is dropped."""
    RELEASE.clear(), HUNG_THREADS.clear()
    rounds, timeout = 5, 1.5
    scenario = small_scenario(train__rounds=rounds, strategy={"name": "faults-waiter"}, engine={"timeout_s": timeout})
    from fedsim.run.apps import client_app

    calls = _run(lambda config: InlineGrid(client_app, scenario.data.num_clients, config, RUN_ID), scenario, tmp_path)
    rows, hung = _hung_rows(tmp_path, rounds)
    assert [(r["participants"], r["failures"]) for r in rows] == [(4, 0), (3, 1), (3, 1), (4, 0), (4, 0)]
    assert rows[1]["failure_reasons"] == {hung: f"timeout: no reply within engine.timeout_s ({timeout:g} s)"}
    assert rows[2]["failure_reasons"][hung].startswith(f"timeout: node busy: its call of round {HANG_ROUND} ")
    assert timeout <= rows[1]["wall_s"] < timeout + 2
    assert calls == {0: rounds, 1: rounds, 2: rounds, HUNG: rounds - 2}  # the late call's +2 never landed


SPIN_TIMEOUT, SPIN_ROUNDS = 2.0, 4


def _spin_raw(name):
    return small_raw(train__rounds=SPIN_ROUNDS, strategy={"name": f"faults-{name}"}, engine={"timeout_s": SPIN_TIMEOUT})


def _healthy_numbers(rows):
    """Each round's metrics, which come from the three healthy clients alone (SPIN_NODE fails every round)."""
    failing = str(NODE_ID_BASE + fault_hooks.SPIN_NODE)
    assert [(r["participants"], r["failures"], list(r["failure_reasons"])) for r in rows] == \
        [(3, 1, [failing])] * SPIN_ROUNDS, rows
    return [(r["accuracy"], r["loss"], r["train_loss"], r["bytes_up"]) for r in rows]


@pytest.fixture(scope="module")
def without_the_hang(tmp_path_factory):
    """The healthy clients' numbers when SPIN_NODE fails at once instead of training on."""
    from fedsim.run.apps import client_app
    from fedsim.scenario import parse_scenario

    fault_hooks.register_spinner()
    scenario, out = parse_scenario(_spin_raw("failing")), tmp_path_factory.mktemp("failing")
    _run(lambda config: InlineGrid(client_app, scenario.data.num_clients, config, RUN_ID), scenario, out)
    return _healthy_numbers(read_metrics(out))


def test_an_inline_call_given_up_while_training_changes_no_healthy_client(without_the_hang, tmp_path):
    """Issue 21 (2): the given-up call trains on, in place, through rounds 2-4 while the healthy
    clients train; it must not share their model: their numbers are exactly those of the run
    without it (before the fix, the one model object per process was shared: other numbers, or
    'modified by an inplace operation' failures)."""
    from fedsim.run.apps import client_app
    from fedsim.scenario import parse_scenario

    fault_hooks.STOP_SPINNING.clear(), fault_hooks.SPIN_THREADS.clear()
    scenario = parse_scenario(_spin_raw("spinner"))
    try:
        _run(lambda config: InlineGrid(client_app, scenario.data.num_clients, config, RUN_ID), scenario, tmp_path)
        assert [t.is_alive() for t in fault_hooks.SPIN_THREADS] == [True]  # it trained on through the whole run
    finally:
        fault_hooks.STOP_SPINNING.set()
        for thread in fault_hooks.SPIN_THREADS:
            thread.join(60)
    rows = read_metrics(tmp_path)
    assert rows[0]["failure_reasons"][str(NODE_ID_BASE + fault_hooks.SPIN_NODE)].startswith("timeout: no reply")
    assert _healthy_numbers(rows) == without_the_hang


def _cli(name, folder):
    """``python -m fedsim`` (its __main__, as run from a shell) on _spin_raw(name), in a process of its
    own: (the process, seconds, output folder)."""
    import subprocess
    import sys
    from pathlib import Path

    folder.mkdir()
    path, out = folder / "s.yaml", folder / "out"
    path.write_text(yaml.safe_dump(_spin_raw(name)))
    code = ("import runpy, sys\nfrom tests import fault_hooks\nfault_hooks.register_spinner()\n"
            f"sys.argv = ['fedsim', {str(path)!r}, '--out', {str(out)!r}, '--quiet']\n"
            "runpy.run_module('fedsim', run_name='__main__', alter_sys=True)\n")
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=Path(__file__).parents[1], timeout=120)
    return proc, time.monotonic() - started, out


def test_the_cli_exits_with_its_own_code_while_a_given_up_call_trains_on(tmp_path):
    """``python -m fedsim`` ends while the given-up call is still inside torch: exit 0 with the
    summary written and the healthy numbers of the same CLI run without the hang (before the fix:
    exit 134, 'terminate called without an active exception', or 139, after summary.json was written)."""
    proc, took, out = _cli("spinner", tmp_path / "spinner")
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-3000:])
    assert took < 50  # it did not wait for the 60 s call
    assert "final accuracy" in proc.stdout, proc.stdout
    assert (out / "summary.json").is_file()
    failing, _, failing_out = _cli("failing", tmp_path / "failing")
    assert failing.returncode == 0, failing.stderr[-3000:]
    assert _healthy_numbers(read_metrics(out)) == _healthy_numbers(read_metrics(failing_out))


def test_a_sweep_with_an_unreachable_address_is_one_line_exit_2_within_seconds(loopback, tmp_path, capsys):
    """``fedsim sweep --address`` goes through the same check as engine.ray.address, before any output."""
    from fedsim.cli import main

    (tmp_path / "base.yaml").write_text(yaml.safe_dump(small_raw()))
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump({"name": "s", "base": "base.yaml",
                                                         "grid": {"train.lr": [0.1, 0.2]}}))
    out = tmp_path / "out"
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        port = server.getsockname()[1]
        start = time.monotonic()
        code = main(["sweep", str(tmp_path / "sweep.yaml"), "--out", str(out), "--address", f"127.0.0.1:{port}"])
        took = time.monotonic() - start
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith(f"fedsim: error: --address: cannot reach a Ray cluster at 127.0.0.1:{port}"), err
    assert took < 15, took
    assert not out.exists()
