"""FedSpeed: reduces to FedAvg at rho = lamb = 0, the dual update, both server corrections."""


import numpy as np
import pytest
import torch
from flwr.app import RecordDict

from fedsim.engines import run_scenario
from fedsim.world.models import build_model
from fedsim.run.results import read_metrics
from fedsim.scenario import parse_scenario
from strategies.base import ClientData, ServerSettings, TrainSettings
from tests.clients import train_client
from strategies.fedavg import FedAvgClient
from strategies.fedspeed import STATE_KEY, FedSpeedClient, FedSpeedParams, FedSpeedStrategy
from strategies.stateful import Reply
from tests.conftest import small_raw


def _data(n=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 4, 4, generator=g)
    y = torch.randint(0, 3, (n,), generator=g)
    return ClientData(0, x, y, x[:0], y[:0])


SETTINGS = TrainSettings(1, 0.1, 2, 16, 0.0, 1e-3, seed=3)


def _model():
    return build_model("mlp", 1, 4, 3, hidden=(8,), seed=0)


def test_client_with_rho_and_lamb_zero_is_local_sgd():
    a, b = _model(), _model()
    train_client(FedAvgClient(None), a, _data(), SETTINGS)
    train_client(FedSpeedClient(FedSpeedParams(rho=0, lamb=0, max_norm=0)), b, _data(), SETTINGS)
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=0, atol=1e-7)
    c = _model()  # and the perturbation does change the steps (the test can fail)
    train_client(FedSpeedClient(FedSpeedParams(rho=0.5, lamb=0, max_norm=0)), c, _data(), SETTINGS)
    assert max(float((pa - pc).detach().abs().max()) for pa, pc in zip(a.parameters(), c.parameters())) > 1e-4


def test_end_to_end_equals_fedavg(tmp_path):
    """Same seed, partial Bernoulli participation, unequal clients: identical metrics."""
    common = dict(data__num_clients=5, data__partition={"name": "dirichlet", "alpha": 0.5}, train__rounds=3,
                  train__participation=0.6, train__sampling="bernoulli", train__weight_decay=1e-3)
    run_scenario(parse_scenario(small_raw(**common)), tmp_path / "avg", progress=False)
    speed = {"name": "fedspeed", "rho": 0.0, "lamb": 0.0, "max_norm": 0.0, "weighting": "examples"}
    run_scenario(parse_scenario(small_raw(strategy=speed, **common)), tmp_path / "speed", progress=False)
    avg, spd = read_metrics(tmp_path / "avg"), read_metrics(tmp_path / "speed")
    for ra, rs in zip(avg, spd):
        assert ra["participants"] == rs["participants"]
        assert rs["accuracy"] == pytest.approx(ra["accuracy"], abs=1e-9)
        assert rs["loss"] == pytest.approx(ra["loss"], rel=1e-5)
    default = {"name": "fedspeed", "weighting": "examples"}
    run_scenario(parse_scenario(small_raw(strategy=default, **common)), tmp_path / "def", progress=False)
    assert read_metrics(tmp_path / "def")[-1]["loss"] != pytest.approx(avg[-1]["loss"], rel=1e-3)


def test_dual_update_and_paper_upload():
    """h_i <- h_i - lamb (w_K - w_t); the paper's upload is x_hat = w_K - h_i / lamb."""
    lamb = 0.3
    m_code, m_paper = _model(), _model()
    w_t = [p.detach().clone() for p in m_code.parameters()]
    h0 = {n: 0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1))
          for n, p in m_code.named_parameters()}
    from strategies.stateful import to_record

    s_code, s_paper = RecordDict({STATE_KEY: to_record(h0)}), RecordDict({STATE_KEY: to_record(h0)})
    train_client(FedSpeedClient(FedSpeedParams(lamb=lamb, server_correction="all")), m_code, _data(), SETTINGS, state=s_code)
    train_client(FedSpeedClient(FedSpeedParams(lamb=lamb)), m_paper, _data(), SETTINGS, state=s_paper)
    for (name, w_k), a, x_hat in zip(m_code.named_parameters(), w_t, m_paper.parameters()):
        h_new = torch.from_numpy(s_code[STATE_KEY][name].numpy())
        torch.testing.assert_close(h_new, h0[name] - lamb * (w_k.detach() - a), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(torch.from_numpy(s_paper[STATE_KEY][name].numpy()), h_new)
        torch.testing.assert_close(x_hat.detach(), w_k.detach() - h_new / lamb, rtol=1e-5, atol=1e-5)


def test_prox_correction_pulls_towards_the_anchor():
    """With a large lamb the local model stays closer to w_t (the prox term acts)."""
    free, prox = _model(), _model()
    w_t = [p.detach().clone() for p in free.parameters()]
    train_client(FedSpeedClient(FedSpeedParams(lamb=0.0, rho=0.0)), free, _data(), SETTINGS)
    train_client(FedSpeedClient(FedSpeedParams(lamb=5.0, rho=0.0, server_correction="all")), prox, _data(), SETTINGS)
    dist = lambda m: sum(float(((p.detach() - a) ** 2).sum()) for p, a in zip(m.parameters(), w_t))  # noqa: E731
    assert dist(prox) < 0.8 * dist(free)


def test_code_server_adds_mean_of_all_accumulated_deltas():
    n_clients = 4
    s = FedSpeedStrategy(FedSpeedParams(server_correction="all"), ServerSettings(seed=0, num_clients=n_clients))
    x0 = {"w": np.zeros(3, np.float32)}
    r = lambda node, v: Reply(node, {"w": np.asarray(v, np.float32)}, {"num-examples": 1.0}, RecordDict())  # noqa
    x1 = s.aggregate(1, x0, [r(1, [1, 0, 0]), r(2, [0, 2, 0])])
    # mean of the models + (1/N) * sum of deltas so far
    np.testing.assert_allclose(x1["w"], [0.5, 1.0, 0] + np.array([1, 2, 0]) / n_clients, rtol=1e-6)
    x2 = s.aggregate(2, x1, [r(3, x1["w"] + [0, 0, 4])])
    np.testing.assert_allclose(x2["w"], x1["w"] + [0, 0, 4] + np.array([1, 2, 4]) / n_clients, rtol=1e-6)
    paper = FedSpeedStrategy(FedSpeedParams(), ServerSettings(seed=0, num_clients=n_clients))
    np.testing.assert_allclose(paper.aggregate(1, x0, [r(1, [1, 0, 0]), r(2, [0, 2, 0])])["w"], [0.5, 1.0, 0])
