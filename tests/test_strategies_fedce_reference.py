"""FedCE's NVFlare modes against NVFlare's code, re-derived here.

``nvflare-2024`` (alias ``reference``): the reference functions are written from a reading of
NVFlare's research/fed-ce before PR #4922 (commit 23a97c305915d971d26720e95a663f452ace341f):
``FedCEAssembler.assemble`` (server) and ``SupervisedMonaiProstateFedCELearner.train``
(client), with every client in every round, as there; rounds are 0-based in the reference
and 1-based in fedsim.

``nvflare-main``: from a reading of ``nvflare/app_opt/pt/fedce.py`` (``FedCEModelAggregator``)
and ``research/fed-ce/jobs/fedce_prostate/client.py`` at NVFlare commit
f3b7c1bffdfed90338d695a67b52a46d8bc4d28c, in torch float32 as there.
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


@pytest.mark.parametrize("fidelity", ["nvflare-2024", "reference"])
@pytest.mark.parametrize("mode", ["plus", "times"])
def test_server_rounds_match_nvflare(mode, fidelity):
    n, rng = 4, np.random.default_rng(3)
    s = FedCEStrategy(FedCEParams(mode=mode, fidelity=fidelity), ServerSettings(seed=0, num_clients=n))
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


@pytest.mark.parametrize("fidelity", ["nvflare-2024", "reference", "nvflare-main"])
def test_client_rounds_match_nvflare(fidelity):
    """Round 0: score 1 (a recorded 0); round 1: 1 - mean(0, v) with the minus model; the
    local training is plain SGD; the stored last model is the trained one. (The client rule
    is the same in both NVFlare versions: the learner before #4922, client.py after.)"""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(40, 1, 4, 4, generator=g), torch.randint(0, 3, (40,), generator=g)
    data = ClientData(0, x[:30], y[:30], x[30:], y[30:])
    params = FedCEParams(fidelity=fidelity)
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
    for fidelity in ("reference", "nvflare-2024"):
        with pytest.raises(ValueError):
            FedCEParams(fidelity=fidelity, consensus="current")
        p = FedCEParams(fidelity=fidelity, mode="times")
        assert p.consensus == "uniform" and FedCEParams.model_validate_json(p.model_dump_json()) == p
        assert p.nvflare == "nvflare-2024"
    with pytest.raises(ValueError):
        FedCEParams(fidelity="nvflare-main", consensus="uniform")
    p = FedCEParams(fidelity="nvflare-main")
    assert p.consensus == "current" and p.nvflare == "nvflare-main" and FedCEParams().nvflare is None
    with pytest.raises(ValueError):
        FedCEParams(fidelity="nvflare")


# ----------------------------------------------------------------------------- nvflare-main


class MainAggregator:
    """Today's NVFlare FedCE server (``FedCEModelAggregator``), on flat float32 diffs: the prior
    is the stored weights (uniform before any; 1/(K+1) for a client without one), a running mean
    of the cosines, scores clipped at eps and then normalised, and a weighted average."""

    def __init__(self, mode, eps=1e-6):
        self.mode, self.eps, self.weights, self.cos_mean, self.cos_count = mode, eps, {}, {}, {}

    def _normalize(self, values):
        clipped = [max(float(v), self.eps) for v in values]
        return [v / sum(clipped) for v in clipped]

    def aggregate(self, diffs, minus_scores):  # client -> float32 tensor; returns (weights, aggregated diff)
        clients = sorted(diffs)
        if not self.weights:
            prior = {c: 1.0 / len(clients) for c in clients}
        else:
            unseen = 1.0 / (len(self.weights) + 1)
            prior = {c: self.weights.get(c, unseen) for c in clients}
        consensus = sum(prior[c] * diffs[c] for c in clients)
        cos_scores = []
        for c in clients:
            rest = consensus - prior[c] * diffs[c]
            if torch.linalg.vector_norm(diffs[c]) == 0 or torch.linalg.vector_norm(rest) == 0:
                sim = 0.0
            else:
                sim = float(torch.cosine_similarity(diffs[c], rest, dim=0))
            count = self.cos_count.get(c, 0) + 1
            mean = self.cos_mean.get(c, 0.0)
            self.cos_mean[c], self.cos_count[c] = mean + (sim - mean) / count, count
            cos_scores.append(max(0.0, 1.0 - self.cos_mean[c]))
        cw = self._normalize(cos_scores)
        mw = self._normalize([minus_scores[c] for c in clients])
        combined = [a + b for a, b in zip(cw, mw)] if self.mode == "plus" else [a * b for a, b in zip(cw, mw)]
        new = dict(zip(clients, self._normalize(combined)))
        self.weights.update(new)
        total = sum(new[c] for c in clients)
        return new, sum(new[c] * diffs[c] for c in clients) / total


@pytest.mark.parametrize("participants", [[[0, 1, 2, 3]] * 3, [[0, 1, 2], [1, 2, 3], [0, 1, 2, 3]]],
                         ids=["full", "partial"])
@pytest.mark.parametrize("mode", ["plus", "times"])
def test_server_rounds_match_nvflare_main(mode, participants):
    """Three rounds against today's NVFlare server, to 1e-6; one client reports a score of 0
    (the clip at 1e-6 then acts), and with partial participation a client joins late (prior
    1/(K+1)) and one sits a round out (keeps its weight)."""
    n, rng = 4, np.random.default_rng(5)
    s = FedCEStrategy(FedCEParams(mode=mode, fidelity="nvflare-main"), ServerSettings(seed=0, num_clients=n))
    s.c = {i: 1.0 / n for i in range(n)}
    ref, old = MainAggregator(mode), ReferenceAssembler(mode)
    x = rng.normal(size=9).astype(np.float32)
    scores = [[1.0] * n, [0.4, 0.0, 0.55, 0.2], [0.5, 0.6, 0.45, 0.3]]
    for rnd, (sds, sites) in enumerate(zip(scores, participants)):
        deltas = {i: (rng.normal(size=9) * (1 + i) * 0.3).astype(np.float32) for i in range(n)}
        replies = [Reply(i, {"w": x + deltas[i]},
                         {"num-examples": 10.0, "fedce_sd": sds[i], "fedce_has_sd": 1.0, "val_acc_global": 0.5},
                         RecordDict()) for i in sites]
        diffs = {r.node_id: torch.from_numpy(r.arrays["w"] - x) for r in replies}
        weights, update = ref.aggregate(diffs, {i: sds[i] for i in sites})
        expected = torch.from_numpy(x) + update
        if participants[0] == [0, 1, 2, 3]:
            old_w, _ = old.assemble(rnd, {i: d.double().numpy() for i, d in diffs.items()}, dict(enumerate(sds)))
        x = s.aggregate(rnd + 1, {"w": x}, replies)["w"]
        np.testing.assert_allclose(x, expected.numpy(), rtol=0, atol=1e-6)
        assert [s.last_weight[i] for i in sites] == pytest.approx([weights[i] for i in sites], abs=1e-6)
    assert set(s.last_weight) == set(ref.weights) and s.last_weight == pytest.approx(ref.weights, abs=1e-6)
    if participants[0] == [0, 1, 2, 3]:  # the two versions' weights differ from round 2 on
        assert max(abs(old_w[i] - weights[i]) for i in range(n)) > 1e-4
