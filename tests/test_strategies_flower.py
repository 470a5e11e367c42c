"""Flower's own strategies by name (strategies.flower, strategies.qfedavg): validated hyperparameters from
the Flower class's signature, the global arrays Flower's own ``Strategy.start`` gives on the same clients
(bit for bit: replies in node order both ways), the audit and a codec composing, resume after a kill."""

import json

import numpy as np
import pytest
import torch
import yaml
from flwr.app import ConfigRecord
from flwr.serverapp import strategy as flower

from fedsim.cli import main
from fedsim.engines import run_scenario
from fedsim.engines.identity import enter_server_identity
from fedsim.engines.inline import InlineGrid
from fedsim.run.apps import client_app, server_settings
from fedsim.run.metered import MeteredGrid
from fedsim.run.resume import main as resume_main
from fedsim.run.rounds import run_rounds
from fedsim.scenario import parse_scenario
from strategies import client_config, get_strategy, strategy_names
from strategies.compression import get_codec
from strategies.flower import FLOWER_CLASSES
from strategies.records import to_record
from tests.conftest import small_raw
from tests.test_resume import _assert_same_run, _killed

# Non-default hyperparameters, so that each is seen to reach Flower's class; 7 clients let Krum tolerate
# f = 2 (n >= 2f + 3) and Bulyan f = 1 (n >= 4f + 3).
HYPER = {
    "fedadam": {"eta": 0.05, "beta_1": 0.8, "tau": 0.01},
    "fedyogi": {"eta": 0.02, "beta_2": 0.9},
    "fedadagrad": {"eta": 0.05, "tau": 0.01},
    "fedavgm": {"server_learning_rate": 0.9, "server_momentum": 0.8},
    "fedmedian": {},
    "fedtrimmedavg": {"beta": 0.3},
    "krum": {"num_malicious_nodes": 2},
    "multikrum": {"num_malicious_nodes": 1, "num_nodes_to_select": 3},
    "bulyan": {"num_malicious_nodes": 1},
    "qfedavg": {"q": 0.5},
}
CLIENTS, ROUNDS, LR = 7, 3, 0.1


def _raw(name: str, **overrides):
    return small_raw(strategy={"name": name, **HYPER[name]}, data__num_clients=CLIENTS, train__rounds=ROUNDS,
                     train__lr=LR, **overrides)


class _InNodeOrder:
    """The inline grid with its replies sorted by node id (fedsim's round loop reads them in that order)."""

    def __init__(self, grid):
        self.grid = grid

    def send_and_receive(self, messages, *, timeout=None):
        return sorted(self.grid.send_and_receive(messages, timeout=timeout), key=lambda m: m.metadata.src_node_id)

    def __getattr__(self, name):
        return getattr(self.grid, name)


def _grid(scenario):
    enter_server_identity(1)
    return InlineGrid(client_app, scenario.data.num_clients, {"scenario-yaml": scenario.to_yaml()})


def _flower_class(name: str, params: dict):
    """Flower's own class with the hyperparameters, its sampling taking every node, no client evaluation."""
    extra = {"client_learning_rate": LR, "train_loss_key": "global_model_loss"} if name == "qfedavg" else {}
    cls = flower.QFedAvg if name == "qfedavg" else FLOWER_CLASSES[name]
    return cls(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=CLIENTS, min_evaluate_nodes=0,
               min_available_nodes=CLIENTS, **{**params, **extra})


# qfedavg and bulyan take 6-11 s here (Flower's own start loop): in the whole suite, not the fast set
@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in ("qfedavg", "bulyan") else n
                                  for n in sorted(HYPER)])
def test_three_rounds_equal_flowers_own_strategy_start(name, one_torch_thread):
    scenario = parse_scenario(_raw(name))
    spec = get_strategy(name)
    initial = to_record(scenario_model(scenario).state_dict())

    ours = run_rounds(spec.server(scenario.strategy_params(), server_settings(scenario)), MeteredGrid(_grid(scenario)),
                      get_codec("none"), initial, ROUNDS, timeout=60, observers=[])

    config = client_config(server_settings(scenario), 1)
    del config["server-round"]  # Flower's configure_train writes it
    theirs = _flower_class(name, HYPER[name]).start(_InNodeOrder(_grid(scenario)), initial, num_rounds=ROUNDS,
                                                    timeout=60, train_config=ConfigRecord(config)).arrays
    assert list(ours.keys()) == list(theirs.keys())
    moved = False
    for key in ours:
        a, b = ours[key].numpy(), theirs[key].numpy()
        assert a.dtype == b.dtype and np.array_equal(a, b), (name, key)
        moved |= not np.array_equal(a, initial[key].numpy())
    assert moved  # three rounds changed the model


def scenario_model(scenario):
    from fedsim.world.build import world_from_text

    return world_from_text(scenario.to_yaml()).new_model()


def test_every_flower_strategy_is_registered():
    assert set(HYPER) <= set(strategy_names())
    assert set(FLOWER_CLASSES) | {"qfedavg"} == set(HYPER)


def _validate(tmp_path, capsys, raw) -> tuple[int, str]:
    """``fedsim validate`` on ``raw``: (exit code, stderr)."""
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(raw))
    code = main(["validate", str(path)])
    return code, capsys.readouterr().err


@pytest.mark.parametrize("strategy, key, message", [
    ({"name": "fedadam", "eta": "fast"}, "strategy.eta", "valid number"),
    ({"name": "fedadam", "momentum": 0.9}, "strategy.momentum", "unknown key for fedadam"),
    ({"name": "fedadam", "tau": 0}, "strategy.tau", "greater than 0"),
    ({"name": "fedyogi", "beta_2": 1.0}, "strategy.beta_2", "less than 1"),
    ({"name": "fedtrimmedavg", "beta": 0.5}, "strategy.beta", "less than 0.5"),
    ({"name": "fedavgm", "server_momentum": True}, "strategy.server_momentum", "true"),
    ({"name": "krum", "num_malicious_nodes": 2}, "strategy.num_malicious_nodes", "2f + 3 = 7"),
    ({"name": "bulyan", "num_malicious_nodes": 1}, "strategy.num_malicious_nodes", "4f + 3 = 7"),
    ({"name": "multikrum", "num_nodes_to_select": 5}, "strategy.num_nodes_to_select", "more than the 4"),
    ({"name": "fedadam", "eta_l": 0.3}, "strategy.eta_l", "train.lr (0.1)"),
    ({"name": "qfedavg", "train_loss_key": "loss"}, "strategy.train_loss_key", "global_model_loss"),
])
def test_bad_hyperparameters_are_one_line_exit_2_naming_the_key(tmp_path, capsys, strategy, key, message):
    code, err = _validate(tmp_path, capsys, small_raw(strategy=strategy))
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and key in lines[0] and message in lines[0], err


def test_validation_accepts_each_name_with_its_hyperparameters(tmp_path, capsys):
    for name in HYPER:
        assert _validate(tmp_path, capsys, _raw(name)) == (0, ""), name


@pytest.mark.parametrize("strategy, defense, key, message", [
    ("fedadam", {"name": "dp_user", "noise_multiplier": 0.5}, "defense.name", "fedadam has its own rule"),
    ("qfedavg", {"name": "dp_sgd", "noise_multiplier": 1.0, "max_grad_norm": 1.0}, "defense.name", "loss"),
])
def test_defenses_that_cannot_compose_are_refused_with_the_reason(tmp_path, capsys, strategy, defense, key,
                                                                  message):
    code, err = _validate(tmp_path, capsys, small_raw(strategy={"name": strategy}, defense=defense))
    assert code == 2 and key in err and message in err, err
    if defense["name"] == "dp_user":  # the strategies it does take, from the registry (tests register more)
        taken = err.split("FedAvg.aggregate_train (")[1].split(")")[0].split(", ")
        assert {"fedavg", "fedprox"} <= set(taken) and "fedadam" not in taken, err


def test_qfedavg_with_lr_decay_is_refused(tmp_path, capsys):
    code, err = _validate(tmp_path, capsys, small_raw(strategy={"name": "qfedavg"}, train__lr_decay=0.9))
    assert code == 2 and "train.lr_decay" in err, err


def test_fedadam_runs_with_an_audit_a_codec_and_dp_sgd(tmp_path, capsys):
    raw = small_raw(strategy={"name": "fedadam"}, upload={"codec": "topk", "ratio": 0.2},
                    audit={"attack": "ig", "every": 2, "clients": 1, "attack_config": {"iterations": 10}})
    assert _validate(tmp_path, capsys, raw) == (0, "")
    summary = run_scenario(parse_scenario(raw), tmp_path / "run", progress=False)
    assert summary["rounds"] == 2 and summary["failures_total"] == 0
    rows = [json.loads(line) for line in (tmp_path / "run" / "audit.jsonl").read_text().splitlines()]
    assert rows and all(r["round"] == 2 for r in rows)
    private = small_raw(strategy={"name": "fedyogi"}, defense={"name": "dp_sgd", "noise_multiplier": 1.0,
                                                                 "max_grad_norm": 1.0})
    assert run_scenario(parse_scenario(private), tmp_path / "dp", progress=False)["epsilon"] > 0


@pytest.mark.parametrize("name", ["fedadam", "krum"])
def test_killed_run_resumes_to_the_run_left_alone(tmp_path, name):
    raw = small_raw(strategy={"name": name}, train__rounds=15, data__num_clients=5)
    run_scenario(parse_scenario(raw), tmp_path / "alone", progress=False)
    killed = _killed(raw, tmp_path, rows=4)
    assert resume_main([str(killed), "--quiet"]) == 0
    _assert_same_run(killed, tmp_path / "alone")


def test_robust_aggregators_leave_the_replies_for_the_audit(one_torch_thread):
    """FedMedian pops the arrays out of the records it reads: fedsim hands it copies of the records."""
    scenario = parse_scenario(small_raw(strategy={"name": "fedmedian"}, train__rounds=1))
    seen = []

    class Replies:
        def on_start(self, arrays):
            pass

        def on_round(self, record):
            seen.extend(len(n.reply["arrays"]) for n in record.replies)

    spec = get_strategy("fedmedian")
    initial = to_record(scenario_model(scenario).state_dict())
    run_rounds(spec.server(scenario.strategy_params(), server_settings(scenario)), MeteredGrid(_grid(scenario)),
               get_codec("none"), initial, 1, timeout=60, observers=[Replies()])
    assert seen == [len(initial)] * scenario.data.num_clients
    torch.set_num_threads(1)


@pytest.mark.parametrize("name", ["krum", "fedavgm"])
def test_update_defenses_compose(tmp_path, name, one_torch_thread):
    """clip, prune and noise act on each client's update before Flower's class aggregates it."""
    defense = [{"name": "clip", "max_norm": 0.5}, {"name": "prune", "ratio": 0.5}, {"name": "noise", "variance": 1e-6}]
    plain = run_scenario(parse_scenario(small_raw(strategy={"name": name})), tmp_path / "plain", progress=False)
    defended = run_scenario(parse_scenario(small_raw(strategy={"name": name}, defense=defense)), tmp_path / "d",
                            progress=False)
    assert defended["failures_total"] == 0 and defended["accuracy"] > 0.1
    assert defended["accuracy"] != plain["accuracy"]  # the defenses changed what was aggregated
