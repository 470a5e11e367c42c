"""The ray engine: inline's metrics for one seed, client state across rounds, failures as replies.

One Ray instance serves every test here (module fixture). The probe strategy reaches the
actors through ``RayGrid(setup=...)``: the actors import this module (Ray puts the
driver's working directory, the repository root, on their path) and register it.
"""

from __future__ import annotations

import json
import os

import pytest
from flwr.app import ConfigRecord

from fedsim.run.apps import server_app
from fedsim.engines import RUN_ID, run_scenario, server_context
from fedsim.engines.identity import enter_server_identity
from fedsim.engines.inline import NODE_ID_BASE
from strategies import ClientAlgorithm, StrategySpec, Upload, register_strategy
from strategies.base import NoParams
from strategies.fedavg import FedAvgStrategy

ray = pytest.importorskip("ray")

FAILING, CRASHING, CRASH_ROUND = 1, 2, 2  # partition ids; the round in which CRASHING kills its actor


class ProbeClient(ClientAlgorithm):
    """FedAvg's local SGD that counts its calls in Context.state, and misbehaves on purpose."""

    def train(self, job) -> Upload:
        state = job.state
        seen = state["probe"] if "probe" in state else ConfigRecord({"calls": 0, "pids": []})
        state["probe"] = ConfigRecord({"calls": int(seen["calls"]) + 1, "pids": [*seen["pids"], os.getpid()]})
        if job.data.partition_id == FAILING:
            raise RuntimeError("probe: this client always fails")
        if job.data.partition_id == CRASHING and job.settings.server_round == CRASH_ROUND:
            os._exit(3)  # the actor process dies mid-call, as on a segfault or an OOM kill
        trainer = job.trainer()
        trainer.run()
        return job.upload(trainer)


PROBE = StrategySpec(name="ray-probe", params=NoParams, server=lambda params, settings: FedAvgStrategy(settings),
                     client=ProbeClient)


def register_probe() -> None:
    register_strategy(PROBE)


register_probe()  # in the driver; RayGrid(setup=register_probe) does it in each actor


def rows(out_dir) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.fast  # the fast set's run on Ray (tests/conftest.py): Ray's start-up, a few seconds
def test_ray_matches_inline_round_by_round(local_ray, small_scenario, tmp_path):
    inline = small_scenario(train__rounds=3)
    on_ray = small_scenario(train__rounds=3, engine__name="ray", engine__ray={"num_actors": 2})
    run_scenario(inline, tmp_path / "inline", progress=False)
    summary = run_scenario(on_ray, tmp_path / "ray", progress=False)
    assert summary["engine"] == "ray" and summary["rounds"] == 3
    keys = ("round", "accuracy", "loss", "train_loss", "bytes_up", "bytes_down", "participants", "failures")
    a, b = rows(tmp_path / "inline"), rows(tmp_path / "ray")
    assert [{k: r[k] for k in keys} for r in a] == [{k: r[k] for k in keys} for r in b]
    assert ray.is_initialized()  # a Ray it did not start is left running


def test_state_survives_rounds_and_failures_do_not_stop_the_run(local_ray, small_scenario, tmp_path):
    from fedsim.engines.ray import RayGrid

    rounds = 3
    scenario = small_scenario(train__rounds=rounds, strategy={"name": "ray-probe"})
    enter_server_identity(RUN_ID)
    context = server_context(scenario, tmp_path, progress=False)
    client_config = {"scenario-yaml": context.run_config["scenario-yaml"]}
    with RayGrid(scenario.data.num_clients, client_config, scenario.engine.ray.model_copy(update={"num_actors": 2}),
                 RUN_ID, setup=register_probe) as grid:
        server_app(grid, context)
        states = {node - NODE_ID_BASE: ctx.state["probe"] for node, ctx in grid.contexts.items()}

    # Each node's count went up once a round, whichever actor served it; the crashed call's
    # update died with its process, as it would with a SuperNode's ClientApp process.
    # CRASHING's batchmate (num_actors 2: two per call) died with it: a failure too (issue 21 (4)).
    crash_reasons = rows(tmp_path)[CRASH_ROUND - 1]["failure_reasons"]
    mates = {int(n) - NODE_ID_BASE for n, r in crash_reasons.items() if r.startswith("ClientApp actor died")}
    assert CRASHING in mates and len(mates) == 2, crash_reasons
    calls = {pid: int(s["calls"]) for pid, s in states.items()}
    assert calls == {p: rounds - (p in mates) for p in range(4)}
    assert len({p for s in states.values() for p in s["pids"]}) >= 2  # several processes served

    failures = [r["failures"] for r in rows(tmp_path)]
    assert failures == [1 + len(mates) if r == CRASH_ROUND else 1 for r in range(1, rounds + 1)]
    assert all(r["participants"] == 4 - f for r, f in zip(rows(tmp_path), failures))


def test_bad_data_is_bad_input_before_any_output(local_ray, tmp_path, capsys):
    """The ray engine checks the data while Ray starts; a failure is still one line and exit 2."""
    import yaml

    from fedsim.cli import main
    from tests.conftest import small_raw

    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(small_raw(engine__name="ray", data__dataset="mnist",
                                             data__root=str(tmp_path / "nowhere"))))
    out = tmp_path / "out"
    assert main([str(path), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("fedsim: error: data"), err
    assert not out.exists()


def test_more_actors_than_the_cluster_has_cpus_is_bad_input(local_ray, tmp_path, capsys):
    import yaml

    from fedsim.cli import main
    from tests.conftest import small_raw

    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(small_raw(engine__name="ray", engine__ray={"num_actors": 3})))  # cluster: 2 CPUs
    out = tmp_path / "out"
    assert main([str(path), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "fedsim: error: engine.ray.num_actors: 3 actors need 3 CPUs; the Ray cluster has 2", err
    assert not out.exists()


def test_device_round_matches_inline_on_cpu(local_ray, tmp_path):
    """engine.device on ray, given explicitly: the last device torch sees (cpu here; cuda, with a GPU share
    per client actor, where there is one): the metrics are the inline run's without a device setting (on
    the CPU bit for bit; tests/test_devices.py)."""
    from fedsim.scenario import parse_scenario
    from tests.conftest import small_raw
    from tests.test_devices import DEVICE_ROUND, DEVICES, _assert_same, _metrics

    device = DEVICES[-1]
    baseline = {} if device == "cpu" else {"engine__device": "cpu"}
    run_scenario(parse_scenario(small_raw(**DEVICE_ROUND, **baseline)), tmp_path / "inline", progress=False)
    raw = small_raw(**DEVICE_ROUND, engine__name="ray", engine__device=device,
                    engine__ray={"num_actors": 1, "num_gpus_per_client": 0.5 if device == "cuda" else 0.0})
    run_scenario(parse_scenario(raw), tmp_path / "ray", progress=False)
    _assert_same(_metrics(tmp_path / "ray"), _metrics(tmp_path / "inline"), device)
