"""FedAvg's aggregation is the example-weighted mean; FedProx with mu 0 is FedAvg;
sampling is seeded."""

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, Message, MessageType, MetricRecord, RecordDict

from fedsim.engines import run_scenario
from fedsim.engines.identity import enter_server_identity
from fedsim.run.results import read_metrics
from strategies.base import ServerSettings, TrainSettings, ClientData, sample_participants
from tests.clients import train_client
from strategies.fedavg import FedAvgStrategy
from strategies.fedprox import FedProxClient, FedProxParams


def _reply(node_id: int, arrays: dict, n: int) -> Message:
    enter_server_identity(1)
    ins = Message(RecordDict(), node_id, MessageType.TRAIN)
    ins.metadata.__dict__["_message_id"] = f"m{node_id}"
    content = RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
                          "metrics": MetricRecord({"num-examples": n})})
    reply = Message(content, reply_to=ins)
    reply.metadata.__dict__["_src_node_id"] = node_id
    return reply


def test_fedavg_is_example_weighted_mean():
    rng = np.random.default_rng(0)
    arrays = [{"w": rng.standard_normal((3, 4)).astype(np.float32), "b": rng.standard_normal(4).astype(np.float32)}
              for _ in range(3)]
    counts = [10, 30, 60]
    strategy = FedAvgStrategy(ServerSettings(seed=0, num_clients=3))
    agg, _ = strategy.aggregate_train(1, [_reply(1000 + i, a, n) for i, (a, n) in enumerate(zip(arrays, counts))])
    for key in ("w", "b"):
        expected = sum(n * a[key] for a, n in zip(arrays, counts)) / sum(counts)
        np.testing.assert_allclose(agg[key].numpy(), expected, rtol=1e-6, atol=1e-6)
        assert not np.allclose(agg[key].numpy(), np.mean([a[key] for a in arrays], axis=0))


def test_sampling_fixed_and_bernoulli_are_seeded():
    ids = list(range(1000, 1020))
    a = sample_participants(ids, 3, seed=1, participation=0.25, sampling="fixed")
    assert len(a) == 5 and a == sample_participants(ids, 3, 1, 0.25, "fixed")
    assert a != sample_participants(ids, 4, 1, 0.25, "fixed")
    sizes = [len(sample_participants(ids, r, 1, 0.3, "bernoulli")) for r in range(1, 200)]
    assert len(set(sizes)) > 3 and abs(np.mean(sizes) - 6) < 1.0
    assert sample_participants(ids, 7, 1, 0.3, "bernoulli") == sample_participants(ids, 7, 1, 0.3, "bernoulli")


def test_sampling_keeps_uint64_node_ids_exact():
    # SuperNode ids are random uint64 values; a float round trip would corrupt them.
    ids = [13279540858680754176, 7010060899336754176, 39397103170359280, 18446744073709551557]
    for sampling in ("fixed", "bernoulli"):
        for r in range(1, 20):
            assert set(sample_participants(ids, r, 0, 0.5, sampling)) <= set(ids)


def test_fedprox_mu0_equals_fedavg(tmp_path, small_scenario):
    avg = run_scenario(small_scenario(), tmp_path / "avg", progress=False)
    prox0 = run_scenario(small_scenario(strategy={"name": "fedprox", "mu": 0.0}), tmp_path / "p0", progress=False)
    run_scenario(small_scenario(strategy={"name": "fedprox", "mu": 1.0}), tmp_path / "p1", progress=False)
    key = lambda rows: [(r["accuracy"], r["loss"], r["train_loss"]) for r in rows]  # noqa: E731
    assert key(read_metrics(tmp_path / "avg")) == key(read_metrics(tmp_path / "p0"))
    assert key(read_metrics(tmp_path / "avg")) != key(read_metrics(tmp_path / "p1"))
    assert avg["accuracy"] == prox0["accuracy"]


def test_fedprox_pulls_towards_global():
    torch.manual_seed(0)
    x, y = torch.rand(64, 1, 8, 8), torch.randint(0, 10, (64,))
    data = ClientData(0, x, y, x[:0], y[:0])
    settings = TrainSettings(1, 0.5, 5, 16, 0.0, 0.0, seed=3)
    from fedsim.world.models import build_model

    drift = {}
    for mu in (0.0, 1.0):
        model = build_model("mlp", 1, 8, 10, hidden=(16,), seed=0)
        start = [p.detach().clone() for p in model.parameters()]
        train_client(FedProxClient(FedProxParams(mu=mu)), model, data, settings)
        drift[mu] = sum(float(((p.detach() - s) ** 2).sum()) for p, s in zip(model.parameters(), start))
    assert drift[1.0] < 0.7 * drift[0.0]


@pytest.mark.parametrize("participation,sampling", [(0.5, "fixed"), (0.5, "bernoulli")])
def test_participants_per_round(tmp_path, small_scenario, participation, sampling):
    s = small_scenario(train={"rounds": 4, "participation": participation, "sampling": sampling, "lr": 0.1})
    run_scenario(s, tmp_path, progress=False)
    rows = read_metrics(tmp_path)
    counts = [r["participants"] for r in rows]
    if sampling == "fixed":
        assert counts == [2, 2, 2, 2]
    else:
        assert all(1 <= c <= 4 for c in counts)
    # bytes that travelled scale with the clients that took part
    per_client = rows[0]["bytes_up"] / counts[0]
    assert all(r["bytes_up"] == pytest.approx(per_client * c) for r, c in zip(rows, counts))
