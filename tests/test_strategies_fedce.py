"""FedCE: contribution weights, the minus model, reporting."""

import math

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, RecordDict

from fedsim.engines import run_scenario
from fedsim.world.models import build_model
from fedsim.run.results import read_metrics
from fedsim.scenario import parse_scenario
from strategies.base import ClientData, ServerSettings, TrainSettings
from tests.clients import train_client
from strategies.fedce import (LAST_MODEL_KEY, FedCEClient, FedCEParams, FedCEStrategy, accuracy, combine,
                              gradient_cosines, minus_model)
from strategies.stateful import Reply, to_record
from tests.conftest import small_raw


def _strategy(n, **kw):
    s = FedCEStrategy(FedCEParams(**kw), ServerSettings(seed=0, num_clients=n))
    s.c = {i: 1.0 / n for i in range(n)}
    return s


def _reply(node, w, sd=None):
    m = {"num-examples": 10.0, "partition-id": float(node), "val_acc_global": 0.5,
         "fedce_sd": 0.0 if sd is None else sd, "fedce_has_sd": 0.0 if sd is None else 1.0}
    return Reply(node, {"w": np.asarray(w, np.float32)}, m, RecordDict())


def test_identical_clients_get_equal_weights():
    s = _strategy(4)
    x0 = {"w": np.zeros(5, np.float32)}
    d = [0.3, -1.0, 2.0, 0.5, 0.1]
    x1 = s.aggregate(1, x0, [_reply(i, d, sd=0.4) for i in range(4)])
    assert s._report["agg_weight"] == {str(i): 0.25 for i in range(4)}
    np.testing.assert_allclose(x1["w"], d, rtol=1e-6)  # sum_i (1/4) delta = delta
    assert all(v == pytest.approx(0.25) for v in s.c.values())


def test_opposing_client_gets_the_largest_gradient_space_score():
    """cos(delta_i, D - c_i delta_i): three agreeing clients score 1 - 1 = 0, the opposing one
    1 - (-1) = 2, so FedCE *raises* its weight (a unique contribution), as the reference does."""
    u = np.array([1.0, 2.0, -1.0])
    deltas = [u, u, u, -u]
    cos = gradient_cosines(deltas, [0.25] * 4)
    np.testing.assert_allclose(cos, [1, 1, 1, -1], atol=1e-12)
    a = combine(1 - np.array(cos), None, "plus")
    np.testing.assert_allclose(a[:3], 1e-3)
    assert a[3] > 0.99
    # with full data-space scores too, the opposer still leads
    a2 = combine(1 - np.array(cos), np.array([0.2, 0.2, 0.2, 0.9]), "plus")
    assert np.argmax(a2) == 3 and a2[0] == pytest.approx(a2[1]) == pytest.approx(a2[2])


def test_weights_follow_the_spec_step_by_step():
    """Full participation, two rounds: an independent re-derivation of the reference rule."""
    rng = np.random.default_rng(0)
    n = 3
    s = _strategy(n)
    x = {"w": np.zeros(6, np.float32)}
    c = np.full(n, 1 / n)
    cos_hist = [[] for _ in range(n)]
    for rnd, sds in [(1, None), (2, [0.3, 0.6, 0.1])]:
        deltas = [rng.normal(size=6).astype(np.float32) for _ in range(n)]
        replies = [_reply(i, x["w"] + deltas[i], None if sds is None else sds[i]) for i in range(n)]
        d = [dd.astype(np.float64) for dd in deltas]
        consensus = sum(ci * di for ci, di in zip(c, d))
        for i in range(n):
            m = consensus - c[i] * d[i]
            cos_hist[i].append(d[i] @ m / np.linalg.norm(d[i]) / np.linalg.norm(m))
        sg = np.array([1 - np.mean(h) for h in cos_hist])
        sg = np.clip(sg / sg.sum(), 1e-3, None)
        if sds is None:
            new = sg
        else:
            sd = np.clip(np.array(sds) / np.sum(sds), 1e-3, None)
            new = sg + sd
        new = np.clip(new / new.sum(), 1e-3, None)
        expected = x["w"] + sum(ci * di for ci, di in zip(new, d))
        x = s.aggregate(rnd, x, replies)
        np.testing.assert_allclose(x["w"], expected, rtol=1e-5, atol=1e-6)
        assert [s._report["agg_weight"][str(i)] for i in range(n)] == pytest.approx(new, abs=1e-6)
        c = new / new.sum()


def test_minus_model_removes_the_clients_contribution():
    rng = np.random.default_rng(1)
    thetas = [{"a": torch.from_numpy(rng.normal(size=(3, 2)))} for _ in range(4)]
    c = [0.1, 0.2, 0.3, 0.4]
    glob = {"a": sum(ci * t["a"] for ci, t in zip(c, thetas))}
    minus = minus_model(glob, thetas[2], c[2])
    others = sum(ci * t["a"] for i, (ci, t) in enumerate(zip(c, thetas)) if i != 2) / (1 - c[2])
    torch.testing.assert_close(minus["a"], others)
    assert not torch.allclose(minus["a"], glob["a"])


def test_client_scores_the_minus_model_on_its_validation_split():
    """The client evaluates (global - c_i last) / (1 - c_i), reports 1 - mean(v), keeps history."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(30, 1, 4, 4, generator=g), torch.randint(0, 3, (30,), generator=g)
    data = ClientData(0, x[:20], y[:20], x[20:], y[20:])
    glob, last = build_model("mlp", 1, 4, 3, hidden=(8,), seed=1), build_model("mlp", 1, 4, 3, hidden=(8,), seed=2)
    weight = 0.4
    probe = build_model("mlp", 1, 4, 3, hidden=(8,), seed=0)
    probe.load_state_dict(minus_model(glob.state_dict(), last.state_dict(), weight))
    v = accuracy(probe, data.x_val, data.y_val)
    state = RecordDict({LAST_MODEL_KEY: to_record(last.state_dict())})
    content = RecordDict({"fedce": ConfigRecord({"weight": weight}), "config": ConfigRecord({})})
    settings = TrainSettings(2, 0.1, 1, 10, 0.0, 0.0, seed=1)
    res = train_client(FedCEClient(FedCEParams()), glob, data, settings, content, state)
    assert res.metrics["fedce_has_sd"] == 1.0
    assert res.metrics["fedce_sd"] == pytest.approx(1 - v)
    assert state["fedce.history"]["v_count"] == 1.0
    # and the stored last model is the freshly trained one
    np.testing.assert_array_equal(state[LAST_MODEL_KEY]["fc.weight"].numpy(), glob.fc.weight.detach().numpy())


def test_round_report_has_contributions_and_fairness(tmp_path):
    raw = small_raw(strategy={"name": "fedce"}, data__num_clients=5, train__rounds=3, train__participation=0.6,
                    data__partition={"name": "dirichlet", "alpha": 0.5})
    run_scenario(parse_scenario(raw), tmp_path, progress=False)
    rows = read_metrics(tmp_path)
    for row in rows:
        assert sum(row["contribution"].values()) == pytest.approx(1.0, abs=1e-4)
        assert set(row["agg_weight"]) <= set(row["contribution"])
        assert row["acc_spread"] >= 0 and row["acc_range"] >= row["acc_spread"]
    assert any(v is not None for v in rows[-1]["s_d"].values())  # minus-model scores arrive
    assert not math.isnan(rows[-1]["accuracy"])
