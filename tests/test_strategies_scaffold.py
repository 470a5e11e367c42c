"""SCAFFOLD: control-variate algebra, the c = mean(c_i) invariant, state across skipped rounds."""

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, RecordDict

from fedsim.run.apps import run_server
from fedsim.engines.identity import enter_server_identity
from fedsim.engines.inline import InlineGrid
from fedsim.world.models import build_model
from fedsim.scenario import parse_scenario
from strategies import register_strategy
from strategies.base import ClientData, StrategySpec, TrainSettings
from tests.clients import train_client
from strategies.scaffold import STATE_KEY, ScaffoldClient, ScaffoldParams, ScaffoldStrategy
from strategies.stateful import to_record
from tests.conftest import small_raw

CAPTURED: list = []


def _capture(params, settings):
    CAPTURED.append(ScaffoldStrategy(params, settings))
    return CAPTURED[-1]


register_strategy(StrategySpec("test_scaffold_probe", ScaffoldParams, _capture, ScaffoldClient))


def run_inline(tmp_path, raw):
    """Run on an InlineGrid we keep, so the test can read every node's Context.state."""
    from fedsim.run.apps import client_app

    scenario = parse_scenario(raw)
    enter_server_identity(1)
    grid = InlineGrid(client_app, scenario.data.num_clients, {"scenario-yaml": scenario.to_yaml()})
    torch.set_num_threads(1)
    run_server(grid, scenario, tmp_path, progress=False)
    return grid


def _data(n=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 4, 4, generator=g)
    y = torch.randint(0, 3, (n,), generator=g)
    return ClientData(0, x, y, x[:0], y[:0])


def _settings(lr=0.1, epochs=2, batch=10):
    return TrainSettings(1, lr, epochs, batch, 0.0, 0.0, seed=7)


def test_option_two_control_variate_formula():
    model = build_model("mlp", 1, 4, 3, hidden=(8,), seed=0)
    x = {n: p.detach().clone() for n, p in model.named_parameters()}
    c = {n: 0.01 * torch.ones_like(v) for n, v in x.items()}
    c_i_old = {n: -0.02 * torch.ones_like(v) for n, v in x.items()}
    state = RecordDict({STATE_KEY: to_record(c_i_old)})
    content = RecordDict({"scaffold.c": to_record(c), "config": ConfigRecord({})})
    res = train_client(ScaffoldClient(ScaffoldParams()), model, _data(), _settings(), content, state)
    k = res.metrics["local_steps"]
    assert k == 8  # 40 samples, batch 10, 2 epochs
    y = {n: p.detach() for n, p in model.named_parameters()}
    c_i_new = {n: torch.from_numpy(a.numpy()) for n, a in state[STATE_KEY].items()}
    delta_c = {n: torch.from_numpy(a.numpy()) for n, a in res.extras["scaffold.delta_c"].items()}
    for n in x:
        expected = c_i_old[n] - c[n] + (x[n] - y[n]) / (k * 0.1)
        torch.testing.assert_close(c_i_new[n], expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(delta_c[n], expected - c_i_old[n], rtol=1e-5, atol=1e-6)


def test_correction_changes_the_steps():
    """With c - c_i != 0 the local trajectory differs from plain local SGD."""
    a = build_model("mlp", 1, 4, 3, hidden=(8,), seed=0)
    b = build_model("mlp", 1, 4, 3, hidden=(8,), seed=0)
    zero = {n: torch.zeros_like(p) for n, p in a.named_parameters()}
    shift = {n: 0.5 * torch.ones_like(p) for n, p in a.named_parameters()}
    train_client(ScaffoldClient(ScaffoldParams()), a, _data(), _settings(), RecordDict({"scaffold.c": to_record(zero)}),
                                          RecordDict())
    train_client(ScaffoldClient(ScaffoldParams()), b, _data(), _settings(), RecordDict({"scaffold.c": to_record(shift)}),
                                          RecordDict())
    # y moves by an extra -lr * K * (c - c_i) = -0.1 * 8 * 0.5 per coordinate (up to the
    # gradients' own change along the shifted path)
    diff = torch.cat([(pb - pa).flatten() for pa, pb in zip(a.parameters(), b.parameters())])
    assert abs(float(diff.mean()) + 0.4) < 0.01
    assert float((diff + 0.4).abs().max()) < 0.1


@pytest.mark.parametrize("sampling", ["fixed", "bernoulli"])
def test_server_control_is_mean_of_all_client_controls(tmp_path, sampling):
    """c = (1/N) sum over all N clients of c_i (never-sampled clients hold c_i = 0),
    and the c_i of clients skipped in a round are untouched by it."""
    CAPTURED.clear()
    raw = small_raw(strategy={"name": "test_scaffold_probe"}, data__num_clients=6, train__rounds=4,
                    train__participation=0.34, train__sampling=sampling, data__partition={"name": "dirichlet",
                                                                                          "alpha": 0.5})
    grid = run_inline(tmp_path, raw)
    strategy = CAPTURED[-1]
    states = [ctx.state for ctx in grid.contexts.values()]
    sampled = [s for s in states if STATE_KEY in s]
    assert 0 < len(sampled) < len(states) or sampling == "bernoulli"
    for key, c in strategy.c.items():
        total = sum(s[STATE_KEY][key].numpy().astype(np.float64) for s in sampled)
        np.testing.assert_allclose(c, total / len(states), rtol=1e-4, atol=1e-6)
        assert np.abs(c).max() > 0


def test_state_survives_a_skipped_round(tmp_path):
    """A client's c_i after round r equals what it had when it last trained."""
    CAPTURED.clear()
    raw = small_raw(strategy={"name": "test_scaffold_probe"}, data__num_clients=6, train__rounds=1,
                    train__participation=0.34)
    grid1 = run_inline(tmp_path / "a", raw)
    after1 = {n: {k: v.numpy().copy() for k, v in ctx.state[STATE_KEY].items()}
              for n, ctx in grid1.contexts.items() if STATE_KEY in ctx.state}
    raw["train"]["rounds"] = 3
    grid3 = run_inline(tmp_path / "b", raw)
    from strategies.base import sample_participants

    nodes = list(grid3.contexts)
    later = set(sample_participants(nodes, 2, 0, 0.34, "fixed")) | set(sample_participants(nodes, 3, 0, 0.34, "fixed"))
    kept = [n for n in after1 if n not in later]
    assert kept, "seed 0 must leave some round-1 client out of rounds 2 and 3"
    for n in kept:
        for k, v in after1[n].items():
            np.testing.assert_array_equal(grid3.contexts[n].state[STATE_KEY][k].numpy(), v)
