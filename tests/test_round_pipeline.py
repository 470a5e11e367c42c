"""The round pipeline: numbers kept through the restructuring, one message per client, Flower's DP
wrappers composed with fedsim's strategies, and the round record's aggregated metrics."""

import json
import subprocess
import sys

import pytest
from flwr.supercore.privacy_accounting import GaussianPrivacyEvent, NeighboringRelation, PrivacyConfig, SamplingMethod
from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant

from fedsim.engines import run_scenario
from fedsim.run.results import read_metrics
from fedsim.scenario import ScenarioError, parse_scenario
from strategies import ClientAlgorithm, StrategySpec, register_strategy
from strategies.base import NoParams
from strategies.fedavg import FedAvgStrategy
from tests.conftest import small_raw
from tests.pipeline_baseline import PATH, STRATEGIES, run

BASELINE = json.loads(PATH.read_text())


@pytest.mark.parametrize("name", STRATEGIES)
def test_every_strategy_keeps_its_per_round_metrics(name):
    """Recorded before the round pipeline existed (tests/pipeline_baseline.py). Bit-identical on the
    machine that recorded them; float kernels may differ elsewhere, hence the tolerances."""
    rows = run(name)
    base = BASELINE[name]
    assert len(rows) == len(base)
    for row, old in zip(rows, base):
        for key in ("round", "bytes_up", "bytes_down", "participants", "failures"):
            assert row[key] == old[key], key
        for key in ("loss", "train_loss"):
            assert row[key] == pytest.approx(old[key], rel=1e-6), key
        assert row["accuracy"] == pytest.approx(old["accuracy"], abs=0.006)


def test_aggregated_train_metrics_reach_metrics_jsonl(tmp_path):
    """FedImpro's fake_loss (a client metric the strategy averages) is in every row."""
    raw = small_raw(strategy={"name": "fedimpro"}, train__rounds=2)
    run_scenario(parse_scenario(raw), tmp_path, progress=False)
    rows = read_metrics(tmp_path)
    assert all(r["train_metrics"]["fake_loss"] >= 0 for r in rows)
    assert rows[1]["train_metrics"]["fake_loss"] > 0  # round 2 trains on the shared estimates


class _Mutating(ClientAlgorithm):
    """Partition 0 vandalises its message; everyone reports the lr they were sent."""

    def train(self, job):
        seen = float(job.content["config"]["lr"])
        if job.data.partition_id == 0:
            job.content["config"]["lr"] = 123.0
            del job.content["arrays"]
        trainer = job.trainer()
        return job.upload(trainer, {**trainer.run(), "lr_seen": seen})


class _KeepReplies(FedAvgStrategy):
    def aggregate_train(self, server_round, replies):
        replies = list(replies)
        self.seen = [float(m.content["metrics"]["lr_seen"]) for m in replies]
        return super().aggregate_train(server_round, replies)


def test_a_client_that_mutates_its_message_changes_no_other_clients_inputs(tmp_path):
    strategies = []
    register_strategy(StrategySpec("test_mutating", NoParams,
                                   lambda p, s: strategies.append(_KeepReplies(s)) or strategies[-1], _Mutating))
    raw = small_raw(strategy={"name": "test_mutating"}, data__num_clients=3, train__rounds=1, train__lr=0.1)
    summary = run_scenario(parse_scenario(raw), tmp_path, progress=False)
    assert summary["failures_total"] == 0
    assert strategies[-1].seen == [0.1, 0.1, 0.1]


def _accountant_epsilon(noise: float, sampled: int, population: int, rounds: int, delta: float) -> float:
    acc = RdpAccountant(PrivacyConfig(target_delta=delta, population_size=population,
                                      neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
                                      sampling_method=SamplingMethod.NO_AMPLIFICATION))
    acc.compose(GaussianPrivacyEvent(noise_multiplier=noise, sample_size=sampled, population_size=population), rounds)
    return acc.get_epsilon(delta)


@pytest.mark.parametrize("clipping", ["client", "server"])
def test_fedavg_under_flowers_dp_wrapper_reports_flowers_epsilon(tmp_path, clipping):
    dp = {"name": "dp_user", "clipping": clipping, "noise_multiplier": 0.8, "clipping_norm": 0.5, "delta": 1e-4}
    raw = small_raw(train__rounds=3, defense=dp)
    summary = run_scenario(parse_scenario(raw), tmp_path / "a", progress=False)
    rows = read_metrics(tmp_path / "a")
    assert summary["failures_total"] == 0 and [r["participants"] for r in rows] == [4, 4, 4]
    for r in rows:
        assert r["epsilon"] == pytest.approx(_accountant_epsilon(0.8, 4, 4, r["round"], 1e-4), rel=1e-9)
        assert r["delta"] == 1e-4
    assert rows[0]["epsilon"] < rows[1]["epsilon"] < rows[2]["epsilon"]
    # The noise is seeded: the same scenario gives the same run; without DP the model differs.
    run_scenario(parse_scenario(raw), tmp_path / "b", progress=False)
    assert [r["loss"] for r in read_metrics(tmp_path / "b")] == [r["loss"] for r in rows]
    run_scenario(parse_scenario(small_raw(train__rounds=3)), tmp_path / "plain", progress=False)
    assert read_metrics(tmp_path / "plain")[-1]["loss"] != rows[-1]["loss"]


def test_fedprox_composes_with_the_dp_wrapper(tmp_path):
    raw = small_raw(strategy={"name": "fedprox", "mu": 0.1}, train__rounds=2, defense={"name": "dp_user"})
    assert run_scenario(parse_scenario(raw), tmp_path, progress=False)["failures_total"] == 0


@pytest.mark.parametrize("strategy", ["scaffold", "fedspeed", "fedce", "fedimpro"])
def test_strategies_with_their_own_aggregation_are_refused_under_dp_user(strategy):
    with pytest.raises(ScenarioError, match=r"^defense\.name: dp_user .*FedAvg\.aggregate_train"):
        parse_scenario(small_raw(strategy={"name": strategy}, defense={"name": "dp_user"}))


def test_dp_user_needs_fixed_sampling():
    with pytest.raises(ScenarioError, match=r"^train\.sampling: "):
        parse_scenario(small_raw(train__sampling="bernoulli", defense={"name": "dp_user"}))


def test_scaffold_under_dp_user_is_one_line_and_exit_2(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("strategy: {name: scaffold}\ndefense: {name: dp_user, noise_multiplier: 1.0}\n")
    proc = subprocess.run([sys.executable, "-m", "fedsim", str(path), "--out", str(tmp_path / "out")],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and "defense.name" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_bad_defense_settings_name_the_key():
    with pytest.raises(ScenarioError, match=r"^defense\.noise_multiplier: "):
        parse_scenario(small_raw(defense={"name": "dp_user", "noise_multiplier": -1}))
    with pytest.raises(ScenarioError, match=r"^defense\.name: unknown defense 'dpsgd'"):
        parse_scenario(small_raw(defense={"name": "dpsgd"}))


def test_the_client_follows_its_message_not_its_scenario_copy():
    """The node's scenario copy says SCAFFOLD option II; the message says option I: option I runs."""
    from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict

    from fedsim.run.apps import client_app
    from fedsim.engines.identity import enter_server_identity
    from fedsim.world import world_from_text
    from strategies import ServerSettings, client_config
    from strategies.records import to_numpy, to_record

    text = parse_scenario(small_raw(strategy={"name": "scaffold", "variant": "II"})).to_yaml()
    model = world_from_text(text).new_model()
    c = {n: 0 * p.detach() for n, p in model.named_parameters()}
    enter_server_identity(1)

    def delta_c(variant: str):
        settings = ServerSettings(seed=0, num_clients=4, strategy="scaffold",
                                  strategy_params=json.dumps({"variant": variant}))
        content = RecordDict({"arrays": to_record(model.state_dict()), "config": ConfigRecord(client_config(settings, 1)),
                              "scaffold.c": to_record(c)})
        msg = Message(content, 1000, MessageType.TRAIN, group_id="1")
        msg.metadata.__dict__["_message_id"] = "m"
        context = Context(run_id=1, node_id=1000, node_config={"partition-id": 0, "num-partitions": 4},
                          state=RecordDict(), run_config={"scenario-yaml": text})
        return to_numpy(client_app(msg, context).content["scaffold.delta_c"])

    one, two, one_again = delta_c("I"), delta_c("II"), delta_c("I")
    assert all((one[k] == one_again[k]).all() for k in one)
    assert any(not (one[k] == two[k]).all() for k in one)


def test_strategies_and_defenses_never_import_fedsim():
    """The packages depend downward only (fedsim composes them), so there is no import cycle."""
    code = ("import sys, strategies, defenses\n"
            "from strategies import strategy_names, get_strategy\n"
            "[get_strategy(n) for n in strategy_names()]\n"
            "import strategies.compression\n"
            "print(sorted(m for m in sys.modules if m == 'fedsim' or m.startswith('fedsim.')))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
