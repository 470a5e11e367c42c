"""Asynchronous strategies on the virtual clock (docs/time.md): FedBuff with equal round trips and a
buffer equal to the cohort is synchronous FedAvg; FedAsync's step is its mixing rule; an interrupted
asynchronous run resumes to the same steps; the audit attacks each update against the model its client
started from; update defenses run on asynchronous clients; the rules refuse what the loop cannot run."""

import json

import pytest
import torch
from flwr.app import ArrayRecord, MetricRecord, RecordDict

from fedsim.engines import run_scenario
from fedsim.run import apps, checkpoint
from fedsim.run.observers import ProgressObserver
from fedsim.run.resume import main as resume_main
from fedsim.run.results import read_metrics
from fedsim.scenario import parse_scenario
from fedsim.scenario.schema import ScenarioError
from strategies.asynchronous import AsyncUpdate, staleness_weight
from strategies.base import ServerSettings
from strategies.fedasync import FedAsyncParams, FedAsyncStrategy
from strategies.records import to_record, to_torch
from tests.conftest import small_raw
from tests.test_virtual_clock import _recording

EQUAL = {"step_s": 0.1, "latency_s": 0.05, "down_mbps": 10, "up_mbps": 10}  # every device alike
WALL = ("wall_s", "elapsed_s")


def _rows(out) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in WALL} for r in read_metrics(out)]


def test_fedbuff_with_equal_round_trips_and_a_full_buffer_is_fedavg(tmp_path, monkeypatch):
    # one batch a local epoch: every client runs as many steps, so every round trip is equal
    common = dict(data__num_clients=4, train__rounds=3, train__batch_size=10_000, train__local_epochs=3, system=EQUAL)
    seen = _recording(monkeypatch)
    run_scenario(parse_scenario(small_raw(**common)), tmp_path / "fedavg", progress=False)
    run_scenario(parse_scenario(small_raw(strategy={"name": "fedbuff", "concurrency": 4, "buffer": 4}, **common)),
                 tmp_path / "fedbuff", progress=False)
    sync, steps = seen[:3], seen[3:]
    for rnd, step in zip(sync, steps):
        assert [n.node_id for n in step.nodes] == [n.node_id for n in rnd.nodes]
        ours, theirs = to_torch(step.arrays), to_torch(rnd.arrays)
        assert all(torch.allclose(ours[k], theirs[k], atol=1e-6) for k in theirs)
    fedavg, fedbuff = _rows(tmp_path / "fedavg"), _rows(tmp_path / "fedbuff")
    assert [r["staleness"] for r in fedbuff] == [[0, 0, 0, 0]] * 3
    assert [r["virtual_time_s"] for r in fedbuff] == pytest.approx([r["virtual_time_s"] for r in fedavg], rel=1e-12)
    for a, b in zip(fedavg, fedbuff):
        assert (a["participants"], a["bytes_up"], a["bytes_down"]) == (b["participants"], b["bytes_up"], b["bytes_down"])
        assert b["accuracy"] == pytest.approx(a["accuracy"], abs=2e-3) and b["loss"] == pytest.approx(a["loss"], rel=1e-4)


def _update(value: float, staleness: int = 0) -> AsyncUpdate:
    arrays = to_record({"w": torch.full((3,), value)})
    return AsyncUpdate(RecordDict({"arrays": arrays, "metrics": MetricRecord({"num-examples": 1})}),
                       ArrayRecord(), staleness, 1.0)


def test_fedasync_mixes_a_hand_made_sequence_by_its_rule():
    strategy = FedAsyncStrategy(ServerSettings(seed=0, num_clients=3), FedAsyncParams(concurrency=1, mixing=0.5))
    arrays = to_record({"w": torch.zeros(3)})
    for step, value in enumerate([1.0, 2.0, 3.0], start=1):  # staleness 0: alpha = mixing
        arrays, metrics = strategy.aggregate_updates(step, arrays, [_update(value)])
        assert metrics["alpha"] == 0.5
    assert to_torch(arrays)["w"].tolist() == [2.125] * 3  # 0.5, 1.25, 2.125
    stale = FedAsyncStrategy(ServerSettings(seed=0, num_clients=3),
                             FedAsyncParams(concurrency=1, mixing=0.5, staleness="hinge", staleness_a=1, staleness_b=1))
    _, metrics = stale.aggregate_updates(1, arrays, [_update(1.0, staleness=3)])
    assert metrics["alpha"] == 0.5 / (1 * (3 - 1) + 1)
    assert staleness_weight("polynomial", 3, 0.5, 0) == 0.5 and staleness_weight("constant", 9, 1, 0) == 1


def test_fedasync_one_client_at_a_time_is_never_stale_and_mixes_each_reply(tmp_path, monkeypatch):
    seen = _recording(monkeypatch)
    raw = small_raw(strategy={"name": "fedasync", "concurrency": 1, "mixing": 0.5}, train__rounds=3,
                    system={"step_s": {"dist": "uniform", "low": 0.01, "high": 0.1}})
    run_scenario(parse_scenario(raw), tmp_path / "run", progress=False)
    rows = _rows(tmp_path / "run")
    assert [r["staleness"] for r in rows] == [[0]] * 3
    assert [r["virtual_time_s"] for r in rows] == sorted(r["virtual_time_s"] for r in rows)
    for record in seen:
        (node,) = record.nodes
        sent, mine, new = (to_torch(a) for a in (record.arrays_sent, node.reply["arrays"], record.arrays))
        assert all(torch.allclose(new[k], 0.5 * sent[k] + 0.5 * mine[k], atol=1e-7) for k in new)
        assert record.virtual_s == pytest.approx(node.virtual_s)  # one call at a time: a step is its round trip


def test_an_interrupted_fedbuff_run_resumes_to_the_same_steps(tmp_path, monkeypatch):
    raw = small_raw(strategy={"name": "fedbuff", "concurrency": 3, "buffer": 2}, train__rounds=5,
                    system={"step_s": {"dist": "lognormal", "median": 0.02, "sigma": 1.0}})
    run_scenario(parse_scenario(raw), tmp_path / "alone", progress=False)
    alone = _rows(tmp_path / "alone")
    assert max(max(r["staleness"]) for r in alone) > 0  # really asynchronous

    class CtrlC(ProgressObserver):
        def on_round(self, record):
            super().on_round(record)
            if record.server_round == 4:
                raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(apps, "ProgressObserver", CtrlC)
        with pytest.raises(KeyboardInterrupt):
            run_scenario(parse_scenario(raw), tmp_path / "cut", progress=False)
    assert checkpoint.load(tmp_path / "cut").observers["async"]["in_flight"]  # calls still out at the cut
    assert resume_main([str(tmp_path / "cut"), "--quiet"]) == 0
    assert _rows(tmp_path / "cut") == alone


def test_an_audited_fedbuff_run_attacks_each_update_against_the_model_its_client_started_from(tmp_path, monkeypatch):
    from attacks.objective import leaf_parameters, local_sgd_update
    from fedsim.audit.observer import AuditObserver

    jobs, records = [], _recording(monkeypatch)
    real = AuditObserver.update_job

    def keep(self, record, node):  # the job as built, beside the row its attack writes
        jobs.append((record, node, real(self, record, node)))
        return jobs[-1][2]

    monkeypatch.setattr(AuditObserver, "update_job", keep)
    raw = small_raw(strategy={"name": "fedbuff", "concurrency": 3, "buffer": 2}, train__rounds=3,
                    system={"step_s": {"dist": "lognormal", "median": 0.02, "sigma": 1.0}},
                    audit={"attack": "ig", "attack_config": {"iterations": 2}, "clients": 2})
    run_scenario(parse_scenario(raw), tmp_path / "run", progress=False)
    rows = {(r["round"], r["client"]): r for r in map(json.loads, (tmp_path / "run" / "audit.jsonl").read_text().splitlines())}
    assert len(rows) == len(jobs) == sum(len(r.replies) for r in records)
    stale = [(rec, node, job) for rec, node, job in jobs if int(node.config["server-round"]) < rec.server_round]
    assert stale  # some updates trained from an older model than the step's
    for record, node, job in stale:
        obs, started_from = job.observation, to_torch(node.sent["arrays"])
        attacked = dict(obs.model.named_parameters())
        assert all(torch.equal(attacked[k], started_from[k]) for k in attacked)
        now = to_torch(record.arrays_sent)
        assert not all(torch.equal(attacked[k], now[k]) for k in attacked)
        # the observation is coherent: the client's true data replayed from that model gives the update it sent
        replay = local_sgd_update(obs.model, leaf_parameters(obs.model), job.true_images, job.true_labels, lr=obs.lr,
                                  schedule=obs.schedule, create_graph=False)
        assert all(torch.allclose(r, u, atol=1e-5) for r, u in zip(replay, obs.update))
        row = rows[(record.server_round, node.partition_id)]
        assert row["exact_replay"] and "trained from the model sent for step" in row["note"]


def test_update_defenses_transform_each_asynchronous_update_against_the_model_it_trained_from(tmp_path, monkeypatch):
    records = _recording(monkeypatch)
    raw = small_raw(strategy={"name": "fedbuff", "concurrency": 3, "buffer": 2}, train__rounds=3,
                    system={"step_s": {"dist": "lognormal", "median": 0.02, "sigma": 1.0}},
                    defense=[{"name": "prune", "ratio": 0.5}, {"name": "clip", "max_norm": 0.05}])
    run_scenario(parse_scenario(raw), tmp_path / "run", progress=False)
    replies = [(r, n) for r in records for n in r.replies]
    assert any(int(n.config["server-round"]) < r.server_round for r, n in replies)  # stale ones among them
    for _, node in replies:
        mine, sent = to_torch(node.reply["arrays"]), to_torch(node.sent["arrays"])
        delta = {k: mine[k].double() - sent[k].double() for k in sent}
        assert sum(float(d.pow(2).sum()) for d in delta.values()) ** 0.5 <= 0.05 + 1e-6  # clipped last
        assert all((d == 0).double().mean() >= 0.5 for d in delta.values())             # pruned first


@pytest.mark.parametrize("overrides, line", [
    (dict(strategy={"name": "fedbuff"}), "strategy.concurrency: 10 clients training at once"),
    (dict(strategy={"name": "fedbuff", "concurrency": 2}), "system: fedbuff handles completions in virtual-time"),
    (dict(strategy={"name": "fedasync", "concurrency": 2}, system={}, train__deadline_s=1.0),
     "train.deadline_s: an asynchronous strategy waits for no round"),
    (dict(strategy={"name": "fedbuff", "concurrency": 2}, system={}, upload={"codec": "countsketch", "ratio": 0.2}),
     "upload.codec: countsketch decodes a round's replies together"),
    (dict(strategy={"name": "fedbuff", "concurrency": 2}, system={},
          defense={"name": "dp_user", "noise_multiplier": 1.0, "clipping_norm": 1.0}),
     "defense.name: dp_user: Flower's DP wrappers clip and noise"),
    (dict(strategy={"name": "fedbuff", "concurrency": 2}, system={}, defense={"name": "dp_sgd", "target_epsilon": 5.0}),
     "defense.target_epsilon: dp_sgd calibrates target_epsilon to train.rounds"),
    (dict(strategy={"name": "fedbuff", "concurrency": 2}, system={}, privacy={"canaries": 10}),
     "privacy: canaries join a synchronous round's aggregate"),
])
def test_what_the_asynchronous_loop_cannot_run_is_one_line(overrides, line):
    with pytest.raises(ScenarioError) as exc:
        parse_scenario(small_raw(**overrides))
    assert str(exc.value).startswith(line)
