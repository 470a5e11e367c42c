"""FedSpeed ``fidelity: reference`` against the official rule (FL-Simulator), re-derived here.

The reference functions below are written from a reading of FL-Simulator's
``client/fedspeed.py`` + ``optimizer/ESAM.py`` (client) and ``server/FedSpeed.py`` +
``server/server.py`` (server), independently of strategies/fedspeed.py.
"""

import numpy as np
import pytest
import torch
from flwr.app import RecordDict

from fedsim.world.models import build_model
from strategies.base import ClientData, ServerSettings, TrainSettings
from strategies.fedspeed import STATE_KEY, FedSpeedClient, FedSpeedParams, FedSpeedStrategy
from strategies.stateful import Reply, to_record
from strategies.trainer import EpochShuffleSampler
from tests.clients import train_client

torch.set_num_threads(1)


def _data(n=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 4, 4, generator=g) * 2
    y = torch.randint(0, 3, (n,), generator=g)
    return ClientData(0, x, y, x[:0], y[:0])


def _model():
    return build_model("mlp", 1, 4, 3, hidden=(8,), seed=0)


SETTINGS = TrainSettings(1, 0.1, 2, 8, 0.0, 1e-3, seed=5)


def official_client(model, data, settings, H, rho, lamb, max_norm):
    """One FL-Simulator FedSpeed client round on the given batches; returns w_K (list of tensors)."""
    params = list(model.parameters())
    w_t = [p.detach().clone() for p in params]
    wd = settings.weight_decay + lamb  # SGD(weight_decay = weight_decay + lamb)

    def grads(xb, yb):
        loss = torch.nn.functional.cross_entropy(model(xb), yb)
        return torch.autograd.grad(loss, params)

    for idx in EpochShuffleSampler().schedule(len(data.y), settings):
        xb, yb = data.x[idx], data.y[idx]
        g1 = grads(xb, yb)                                             # ESAM first pass
        scale = rho / (torch.linalg.vector_norm(torch.stack([g.norm() for g in g1])) + 1e-7)
        with torch.no_grad():
            for p, g in zip(params, g1):
                p.add_(g * scale)
        g2 = grads(xb, yb)                                             # gradient at w + e(w)
        with torch.no_grad():
            for p, g in zip(params, g1):
                p.sub_(g * scale)
            # loss_correct = lamb * <w, H - w_t>: its gradient is lamb * (H - w_t)
            v = [g + lamb * (h - a) for g, h, a in zip(g2, H, w_t)]
            total = torch.linalg.vector_norm(torch.stack([t.norm() for t in v]))
            clip = min(1.0, max_norm / (float(total) + 1e-6))             # clip_grad_norm_
            for p, t in zip(params, v):
                p.sub_(settings.lr * (t * clip + wd * p))
    return [p.detach().clone() for p in params]


def official_server(w_t, uploads, H_all):
    """w_{t+1} = mean_S(w_K) + mean over all N clients of H_i, after H_i += w_K - w_t for i in S."""
    for i, w_k in uploads.items():
        H_all[i] = H_all[i] + (w_k - w_t)
    return np.mean(list(uploads.values()), axis=0) + np.mean(H_all, axis=0)


@pytest.mark.parametrize("lamb,max_norm", [(0.3, 0.5), (0.3, 100.0), (0.0, 0.5)])
def test_client_round_matches_the_official_code(lamb, max_norm):
    rho = 0.2
    ref, ours = _model(), _model()
    w_t = [p.detach().clone() for p in ref.parameters()]
    names = [n for n, _ in ours.named_parameters()]
    gen = torch.Generator().manual_seed(1)
    H = [0.3 * torch.randn(p.shape, generator=gen) for p in w_t]  # sum of the client's past deltas
    official = official_client(ref, _data(), SETTINGS, H, rho, lamb, max_norm)

    state = RecordDict({STATE_KEY: to_record({n: -lamb * h for n, h in zip(names, H)})})  # h_i = -lamb H_i
    params = FedSpeedParams(rho=rho, lamb=lamb, max_norm=max_norm, fidelity="reference")
    assert params.server_correction == "all"
    train_client(FedSpeedClient(params), ours, _data(), SETTINGS, state=state)
    for a, b in zip(official, ours.parameters()):
        torch.testing.assert_close(b.detach(), a, rtol=0, atol=1e-6)
    # the dual keeps -lamb * (H_i + w_K - w_t)
    for n, h, wk, a in zip(names, H, official, w_t):
        torch.testing.assert_close(torch.from_numpy(state[STATE_KEY][n].numpy()), -lamb * (h + wk - a),
                                   rtol=0, atol=1e-6)
    if lamb and max_norm < 1:  # the paper mode clips another vector: the two differ when clipping acts
        paper = _model()
        state = RecordDict({STATE_KEY: to_record({n: -lamb * h for n, h in zip(names, H)})})
        train_client(FedSpeedClient(FedSpeedParams(rho=rho, lamb=lamb, max_norm=max_norm,
                                                   server_correction="all")), paper, _data(), SETTINGS, state=state)
        gap = max(float((a - b.detach()).abs().max()) for a, b in zip(official, paper.parameters()))
        assert gap > 1e-3


@pytest.mark.parametrize("lamb", [0.1, 0.0])
def test_server_rounds_match_the_official_code(lamb):
    """Two rounds, partial participation; the correction does not switch off at lamb = 0."""
    n = 5
    rng = np.random.default_rng(0)
    s = FedSpeedStrategy(FedSpeedParams(lamb=lamb, fidelity="reference"), ServerSettings(seed=0, num_clients=n))
    x = rng.normal(size=7).astype(np.float32)
    H_all = np.zeros((n, 7))
    for participants in ([0, 2, 3], [1, 2]):
        uploads = {i: (x + rng.normal(size=7)).astype(np.float32) for i in participants}
        expected = official_server(x.astype(np.float64), {i: u.astype(np.float64) for i, u in uploads.items()}, H_all)
        replies = [Reply(i, {"w": u}, {"num-examples": 10.0 + i}, RecordDict()) for i, u in uploads.items()]
        x = s.aggregate(1, {"w": x}, replies)["w"]
        np.testing.assert_allclose(x, expected, rtol=0, atol=1e-6)


def test_reference_refuses_the_paper_server():
    with pytest.raises(ValueError):
        FedSpeedParams(fidelity="reference", server_correction="participants")
    # what the server writes, the client reads back unchanged
    p = FedSpeedParams(fidelity="reference")
    assert FedSpeedParams.model_validate_json(p.model_dump_json()) == p


def test_reference_mode_refuses_an_alpha_the_official_client_never_uses():
    """fedsim's alpha mixes the first gradient into the step; the official client takes the perturbed one alone."""
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="alpha 1"):
        FedSpeedParams(fidelity="reference", alpha=0.5)
    assert FedSpeedParams(fidelity="reference", alpha=1.0).alpha == 1.0
    assert FedSpeedParams(alpha=0.5).alpha == 0.5  # the paper mode keeps it
