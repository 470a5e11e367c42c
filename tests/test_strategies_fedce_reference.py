"""FedCE ``fidelity: reference`` against NVFlare's research/fed-ce, re-derived here.

The reference functions are written from a reading of NVFlare's ``FedCEAssembler.assemble``
(server) and ``SupervisedMonaiProstateFedCELearner.train`` (client), with every client in
every round, as there; rounds are 0-based in the reference and 1-based in fedsim.
"""

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, RecordDict

from fedsim.world.models import build_model
from strategies.base import ClientData, ServerSettings, TrainSettings
from strategies.fedavg import FedAvgClient
from strategies.fedce import HISTORY_KEY, LAST_MODEL_KEY, FedCEClient, FedCEParams, FedCEStrategy
from strategies.stateful import Reply
from tests.clients import train_client

torch.set_num_threads(1)


class ReferenceAssembler:
    """NVFlare's FedCE server: coefficients 1/N fixed in round 0, cosine history per site."""

    def __init__(self, mode):
        self.mode, self.coef, self.cos = mode, {}, {}

    def assemble(self, rnd, diffs, minus_vals):  # diffs: site -> flat update; returns (new coef, weighted sum)
        sites = list(diffs)
        if rnd == 0:
            for s in sites:
                self.coef[s] = 1 / len(sites)
        consensus = sum(self.coef[s] * diffs[s] for s in sites)
        self.cos[rnd] = {}
        for s in sites:
            m = consensus - self.coef[s] * diffs[s]
            self.cos[rnd][s] = float(diffs[s] @ m / (np.linalg.norm(diffs[s]) * np.linalg.norm(m)))
        cw = np.array([1.0 - np.mean([self.cos[i][s] for i in range(rnd + 1)]) for s in sites])
        cw = np.clip(cw / cw.sum(), 1e-3, None)
        mv = np.array([minus_vals[s] for s in sites], dtype=np.float64)
        mv = np.clip(mv / mv.sum(), 1e-3, None)
        new = cw * mv if self.mode == "times" else cw + mv
        new = np.clip(new / new.sum(), 1e-3, None)
        return dict(zip(sites, new)), sum(w * diffs[s] for s, w in zip(sites, new))


def reference_minus_val(history, global_sd, last_sd, coef, model, x_val, y_val):
    """The client's reported score: 1 - mean of its minus-model accuracies, round 0 counted as 0."""
    if last_sd is None:  # round 0
        history.append(0.0)
    else:
        model.load_state_dict({k: (g - coef * last_sd[k]) / (1 - coef) for k, g in global_sd.items()})
        with torch.no_grad():
            history.append(float((model(x_val).argmax(1) == y_val).float().mean()))
    return 1.0 - float(np.mean(history))


@pytest.mark.parametrize("mode", ["plus", "times"])
def test_server_rounds_match_nvflare(mode):
    n, rng = 4, np.random.default_rng(3)
    s = FedCEStrategy(FedCEParams(mode=mode, fidelity="reference"), ServerSettings(seed=0, num_clients=n))
    s.c = {i: 1.0 / n for i in range(n)}
    ref = ReferenceAssembler(mode)
    x = rng.normal(size=9).astype(np.float32)
    for rnd, sds in enumerate([[1.0] * n, [0.4, 0.7, 0.55, 0.2], [0.5, 0.6, 0.45, 0.3]]):
        deltas = {i: rng.normal(size=9) * (1 + i) for i in range(n)}
        replies = [Reply(i, {"w": (x + deltas[i]).astype(np.float32)},
                         {"num-examples": 10.0, "fedce_sd": sds[i], "fedce_has_sd": 1.0, "val_acc_global": 0.5},
                         RecordDict()) for i in range(n)]
        diffs = {i: replies[i].arrays["w"].astype(np.float64) - x.astype(np.float64) for i in range(n)}
        coef, update = ref.assemble(rnd, diffs, dict(enumerate(sds)))
        expected = x.astype(np.float64) + update
        x = s.aggregate(rnd + 1, {"w": x}, replies)["w"]
        np.testing.assert_allclose(x, expected, rtol=0, atol=1e-6)
        assert [s.last_weight[i] for i in range(n)] == pytest.approx([coef[i] for i in range(n)], abs=1e-9)


def test_client_rounds_match_nvflare():
    """Round 0: score 1 (a recorded 0); round 1: 1 - mean(0, v) with the minus model; the
    local training is plain SGD; the stored last model is the trained one."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(40, 1, 4, 4, generator=g), torch.randint(0, 3, (40,), generator=g)
    data = ClientData(0, x[:30], y[:30], x[30:], y[30:])
    params = FedCEParams(fidelity="reference")
    state, history, last = RecordDict(), [], None
    probe = build_model("mlp", 1, 4, 3, hidden=(8,), seed=9)
    for rnd, coef in [(1, 0.0), (2, 0.3), (3, 0.2)]:
        glob = build_model("mlp", 1, 4, 3, hidden=(8,), seed=rnd)
        global_sd = {k: v.detach().clone() for k, v in glob.state_dict().items()}
        expected_sd = reference_minus_val(history, global_sd, last, coef, probe, data.x_val, data.y_val)
        content = RecordDict({"fedce": ConfigRecord({"weight": coef}), "config": ConfigRecord({})})
        settings = TrainSettings(rnd, 0.1, 1, 8, 0.0, 1e-3, seed=rnd)
        res = train_client(FedCEClient(params), glob, data, settings, content, state)
        assert res.metrics["fedce_has_sd"] == 1.0
        assert res.metrics["fedce_sd"] == pytest.approx(expected_sd, abs=1e-6)
        plain = build_model("mlp", 1, 4, 3, hidden=(8,), seed=rnd)
        train_client(FedAvgClient(None), plain, data, settings)
        for a, b in zip(plain.parameters(), glob.parameters()):
            torch.testing.assert_close(b, a, rtol=0, atol=1e-6)
        last = {k: v.detach().clone() for k, v in glob.state_dict().items()}
        np.testing.assert_array_equal(state[LAST_MODEL_KEY]["fc.weight"].numpy(), last["fc.weight"].numpy())
    assert history[0] == 0.0 and state[HISTORY_KEY]["v_count"] == 3.0
    # the paper mode reports no score in the first round
    res = train_client(FedCEClient(FedCEParams()), build_model("mlp", 1, 4, 3, hidden=(8,), seed=1), data,
                       TrainSettings(1, 0.1, 1, 8, 0.0, 0.0, seed=1), RecordDict({"config": ConfigRecord({})}),
                       RecordDict())
    assert res.metrics["fedce_has_sd"] == 0.0


def test_reference_fixes_the_consensus():
    with pytest.raises(ValueError):
        FedCEParams(fidelity="reference", consensus="current")
    p = FedCEParams(fidelity="reference", mode="times")
    assert p.consensus == "uniform" and FedCEParams.model_validate_json(p.model_dump_json()) == p
