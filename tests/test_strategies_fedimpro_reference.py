"""FedImpro ``fidelity: reference`` against the official code, re-derived here.

The reference functions are written from a reading of the official FedImpro code
(``trainers/spliter.py`` ``split_train`` / ``average_layer_generator_dict``,
``trainers/FeatureSynthesisModels/GaussianSynthesisLabel.py``) with the settings of its
run scripts (std mode update, estimate mode selected + uniform, gradual2half over 500).
Only the random streams are fedsim's (the fake features draw from the same generator).
"""

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, RecordDict

from fedsim.world.models import build_model
from strategies.base import ClientData, ServerSettings, TrainSettings
from strategies.fedimpro import (GLOBAL_KEY, LOCAL_KEY, UPLOAD_KEY, FedImproClient, FedImproParams,
                                 FedImproStrategy, ramp_weight, split_model)
from strategies.stateful import Reply, to_record
from strategies.trainer import EpochShuffleSampler
from tests.clients import train_client

torch.set_num_threads(1)
pytestmark = pytest.mark.filterwarnings("ignore:std\\(\\)")  # the official code takes std of one sample (NaN) and skips it
C, HIDDEN = 3, 6


def _data(n=36, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 4, 4, generator=g)
    y = torch.randint(0, C, (n,), generator=g)
    return ClientData(0, x, y, x[:0], y[:0])


def _model():
    return build_model("mlp", 1, 4, C, hidden=(HIDDEN, 5), seed=0)


def official_client(model, data, settings, mu, sigma, ramp, cap=0.1, n_pc=5000):
    """One client round of the official FedImpro; returns (mu, sigma) after training."""
    low, high = split_model(model, "hidden0")
    params = list(model.parameters())
    gen = torch.Generator().manual_seed(settings.seed + 1)
    mu, sigma = mu.clone(), sigma.clone()
    for idx in EpochShuffleSampler().schedule(len(data.y), settings):
        x, labels = data.x[idx], data.y[idx]
        # GaussianSynthesisLabel.sample: every class, x.size(0) // C + 1 times, from the running estimate
        reps = x.size(0) // C + 1
        fake_labels = torch.tensor(list(range(C)) * reps)
        fake = mu.repeat(reps, 1) + sigma.repeat(reps, 1) * torch.randn((C * reps, HIDDEN), generator=gen)
        feat = low(x)
        output = high(torch.cat([feat, fake]))
        # GaussianSynthesisLabel.update (weight from the *mean's* size, i.e. the feature dimension)
        with torch.no_grad():
            for label in range(C):
                if torch.any(labels == label):
                    f = feat.detach()[labels == label]
                    m, s = f.mean(dim=0), f.std(dim=0)
                    w = min(1.0, m.size(0) / n_pc)
                    mu[label] = mu[label] * (1 - w) + m * w
                    if not torch.any(torch.isnan(s)):
                        sigma[label] = sigma[label] * (1 - w) + s * w
                sigma[sigma > cap] = cap
        # gradual2half: loss_real + fake_weight * loss_fake
        b = x.size(0)
        loss = (torch.nn.functional.cross_entropy(output[:b], labels)
                + ramp * torch.nn.functional.cross_entropy(output[b:], fake_labels))
        grads = torch.autograd.grad(loss, params)
        with torch.no_grad():
            for p, g in zip(params, grads):
                p.sub_(settings.lr * (g + settings.weight_decay * p))
    return mu, sigma


@pytest.mark.parametrize("server_round", [1, 3])
def test_client_round_matches_the_official_code(server_round):
    settings = TrainSettings(server_round, 0.1, 2, 8, 0.0, 1e-3, seed=4)
    params = FedImproParams(fidelity="reference", split_after="hidden0", ema_count=20)  # w = 6/20: visible
    ramp = ramp_weight(server_round, params)
    assert ramp == pytest.approx((server_round - 1) / 500)
    ramp = 0.7 if server_round > 1 else ramp  # a weight large enough to matter (the rule is the same)
    g = torch.Generator().manual_seed(2)
    if server_round == 1:  # no global estimator yet: U[0, 1) from the scenario seed, sigma 0.1
        mu0, sigma0 = torch.rand((C, HIDDEN), generator=torch.Generator().manual_seed(11)), torch.full((C, HIDDEN), 0.1)
        content = RecordDict({"config": ConfigRecord({"fedimpro-ramp": ramp, "seed": 11})})
    else:
        mu0, sigma0 = torch.randn(C, HIDDEN, generator=g), 0.05 + 0.1 * torch.rand(C, HIDDEN, generator=g)
        glob = {"mu": mu0, "sigma": sigma0, "known": torch.ones(C)}
        content = RecordDict({GLOBAL_KEY: to_record(glob), "config": ConfigRecord({"fedimpro-ramp": ramp, "seed": 11})})
    ref, ours = _model(), _model()
    mu, sigma = official_client(ref, _data(), settings, mu0, sigma0, ramp, n_pc=20)
    state = RecordDict({LOCAL_KEY: to_record({"mu": torch.zeros(C, HIDDEN), "sigma": torch.zeros(C, HIDDEN),
                                              "seen_mu": torch.ones(C), "seen_sigma": torch.ones(C)})})
    res = train_client(FedImproClient(params), ours, _data(), settings, content, state)
    for a, b in zip(ref.parameters(), ours.parameters()):
        torch.testing.assert_close(b.detach(), a.detach(), rtol=0, atol=1e-6)
    up = res.extras[UPLOAD_KEY]
    torch.testing.assert_close(torch.from_numpy(up["mu"].numpy()), mu, rtol=0, atol=1e-6)
    torch.testing.assert_close(torch.from_numpy(up["sigma"].numpy()), sigma, rtol=0, atol=1e-6)
    assert float(sigma.max()) <= 0.1 + 1e-7 and not torch.allclose(mu, mu0)
    # the stored local estimate plays no part (the round starts from the global one)
    assert float(state[LOCAL_KEY]["mu"].numpy().max()) == 0.0


def test_server_round_matches_the_official_code():
    """Model by examples; estimates: whole tensors, uniform over the participants."""
    s = FedImproStrategy(FedImproParams(fidelity="reference"), ServerSettings(seed=0, num_clients=5))
    rng = np.random.default_rng(0)
    x = {"w": rng.normal(size=4).astype(np.float32)}
    replies, mus, sds, ws, ns = [], [], [], [], []
    for node, n in [(1, 10.0), (4, 30.0), (2, 5.0)]:
        mu, sd = rng.normal(size=(C, HIDDEN)), rng.random((C, HIDDEN)) * 0.1
        count = np.array([n, 0.0, 3.0])  # class 1 held by nobody: still averaged, as whole tensors
        w = rng.normal(size=4)
        recs = RecordDict({UPLOAD_KEY: to_record({"mu": mu.astype(np.float32), "sigma": sd.astype(np.float32),
                                                  "count": count.astype(np.float32)})})
        replies.append(Reply(node, {"w": w.astype(np.float32)}, {"num-examples": n}, recs))
        mus.append(mu.astype(np.float32)), sds.append(sd.astype(np.float32)), ws.append(w.astype(np.float32)), ns.append(n)
    new = s.aggregate(1, x, replies)
    np.testing.assert_allclose(new["w"], sum(n * w.astype(np.float64) for n, w in zip(ns, ws)) / sum(ns), atol=1e-6)
    np.testing.assert_allclose(s.mu, np.mean(mus, axis=0), atol=1e-6)
    np.testing.assert_allclose(s.sigma, np.mean(sds, axis=0), atol=1e-6)
    sent = s.extra_records(2)[GLOBAL_KEY]
    assert sent["known"].numpy().tolist() == [1.0] * C


def test_reference_defaults_are_the_official_ones():
    p = FedImproParams(fidelity="reference")
    assert (p.noise_std, p.ramp_rounds, p.feature_std) == (0.0, 500, 0.1)
    assert FedImproParams.model_validate_json(p.model_dump_json()) == p
    assert FedImproParams(fidelity="reference", noise_std=0.001).noise_std == 0.001
    assert ramp_weight(1001, p) == pytest.approx(2.0)  # uncapped
    assert ramp_weight(1001, FedImproParams()) == 0.5


# ----------------------------------------------------------------------------- conv splits (issue 22)
#
# The official models flatten the split feature before the estimator sees it
# (``real_feat.view(real_feat.size(0), -1)`` in their ``split_forward``) and reshape the
# sampled features back to (C, H, W) for the high part. So the estimator holds [K, C*H*W]
# tensors and its moving-average weight min(1, mean.size(0) / 5000) has C*H*W on top.
# This port keeps the flat layout throughout, as the official estimator does.


def official_flat_client(model, split, data, settings, mu, sigma, progress, max_epochs, cap=0.1, n_pc=5000):
    """One client round of the official FedImpro on a conv split; mu, sigma: flat [K, C*H*W]."""
    low, high = split_model(model, split)
    params = list(model.parameters())
    gen = torch.Generator().manual_seed(settings.seed + 1)
    mu, sigma = mu.clone(), sigma.clone()
    k, dim = mu.shape
    fake_weight = progress / max_epochs  # gradual2half, base weight 1
    for idx in EpochShuffleSampler().schedule(len(data.y), settings):
        x, labels = data.x[idx], data.y[idx]
        reps = x.size(0) // k + 1
        fake_labels = torch.tensor(list(range(k)) * reps)
        fake = mu.repeat(reps, 1) + sigma.repeat(reps, 1) * torch.randn((k * reps, dim), generator=gen)
        real_feat = low(x)
        output = high(torch.cat([real_feat, fake.reshape(-1, *real_feat.shape[1:])]))
        feat = real_feat.view(real_feat.size(0), -1)
        with torch.no_grad():
            for label in range(k):
                if torch.any(labels == label):
                    f = feat.detach()[labels == label]
                    m, s = f.mean(dim=0), f.std(dim=0)
                    w = min(1.0, m.size(0) / n_pc)  # m is flat: C*H*W
                    mu[label] = mu[label] * (1 - w) + m * w
                    if not torch.any(torch.isnan(s)):
                        sigma[label] = sigma[label] * (1 - w) + s * w
                sigma[sigma > cap] = cap
        b = x.size(0)
        loss = (torch.nn.functional.cross_entropy(output[:b], labels)
                + fake_weight * torch.nn.functional.cross_entropy(output[b:], fake_labels))
        grads = torch.autograd.grad(loss, params)
        with torch.no_grad():
            for p, g in zip(params, grads):
                p.sub_(settings.lr * (g + settings.weight_decay * p))
    return mu, sigma


def _conv_data(pid, n, seed, size=8):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, size, size, generator=g)
    y = torch.randint(0, C, (n,), generator=g)
    return ClientData(pid, x, y, x[:0], y[:0])


def _conv_model(name):
    return build_model(name, 1, 8, C, hidden=(16,), seed=0)


def _run_official(name, clients, rounds, seed, ramp_rounds, n_pc):
    """The official loop: every round each client starts from the global model and estimator;
    the server averages the model by examples and mu, sigma uniformly (selected / uniform)."""
    model = _conv_model(name)
    dim = int(np.prod(split_model(model, "conv2")[0](clients[0].x[:1]).shape[1:]))
    mu = torch.rand((C, dim), generator=torch.Generator().manual_seed(seed))
    sigma = torch.full((C, dim), 0.1)
    history = []
    for rnd in range(1, rounds + 1):
        states, mus, sigmas, ns = [], [], [], []
        for i, data in enumerate(clients):
            local = _conv_model(name)
            local.load_state_dict(model.state_dict())
            m, s = official_flat_client(local, "conv2", data, _conv_settings(rnd, i), mu, sigma,
                                        progress=rnd - 1, max_epochs=ramp_rounds, n_pc=n_pc)
            states.append(local.state_dict()), mus.append(m), sigmas.append(s), ns.append(len(data.y))
        total = sum(ns)
        model.load_state_dict({k: sum(n / total * sd[k] for n, sd in zip(ns, states)) for k in states[0]})
        mu, sigma = sum(mus) / len(mus), sum(sigmas) / len(sigmas)
        history.append(({k: v.clone() for k, v in model.state_dict().items()}, mu.clone(), sigma.clone()))
    return history


def _conv_settings(rnd, i):
    return TrainSettings(rnd, 0.05, 2, 8, 0.0, 1e-3, seed=100 * rnd + i)


@pytest.mark.parametrize("name,ema_count", [("cnn", 0), ("lenet", 0), ("cnn", 100)])
def test_conv_split_three_rounds_match_the_official_code(name, ema_count):
    """Three rounds, three clients, split at conv2: the model, mu and sigma after each round
    equal the official loop's to 1e-6. cnn at 8x8: features 64x2x2, w = 256/5000 (the channel
    count would give 64/5000); lenet: 12x2x2, w = 48/5000; ema_count 100: w = min(1, 256/100) = 1."""
    seed, ramp_rounds = 11, 2  # ramp 0, 1/2, 1: the sampled features enter the loss
    clients = [_conv_data(i, n, 20 + i) for i, n in enumerate([30, 21, 40])]
    params = FedImproParams(fidelity="reference", split_after="conv2", ramp_rounds=ramp_rounds, ema_count=ema_count)
    server = FedImproStrategy(params, ServerSettings(seed=seed, num_clients=len(clients)))
    expected = _run_official(name, clients, 3, seed, ramp_rounds, n_pc=ema_count or 5000)

    glob = {k: v.detach().numpy().copy() for k, v in _conv_model(name).state_dict().items()}
    for rnd, (ref_sd, ref_mu, ref_sigma) in enumerate(expected, start=1):
        content = {"config": ConfigRecord({"fedimpro-ramp": ramp_weight(rnd, params), "seed": seed})}
        content.update(server.extra_records(rnd))
        replies = []
        for i, data in enumerate(clients):
            ours = _conv_model(name)
            ours.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in glob.items()})
            res = train_client(FedImproClient(params), ours, data, _conv_settings(rnd, i), RecordDict(content))
            replies.append(Reply(i, {k: v.numpy() for k, v in res.weights.items()},
                                 {"num-examples": float(len(data.y))}, RecordDict(res.extras)))
        glob = server.aggregate(rnd, glob, replies)
        for k, v in ref_sd.items():
            np.testing.assert_allclose(glob[k], v.numpy(), rtol=0, atol=1e-6, err_msg=f"round {rnd}: {k}")
        np.testing.assert_allclose(server.mu.reshape(C, -1), ref_mu.numpy(), rtol=0, atol=1e-6)
        np.testing.assert_allclose(server.sigma.reshape(C, -1), ref_sigma.numpy(), rtol=0, atol=1e-6)
    assert server.mu.ndim == 4  # fedsim keeps (C, H, W); the official code the flat vector: same numbers


def test_conv_split_weight_is_the_flattened_size_not_the_channel_count():
    """The test above discriminates: with the channel count (the rule before issue 22) the
    estimates after one round are far from the official ones."""
    clients = [_conv_data(0, 30, 20)]
    official = _run_official("cnn", clients, 1, 11, 2, n_pc=5000)[0][1]
    channels = _run_official("cnn", clients, 1, 11, 2, n_pc=5000 * 4)[0][1]  # w = 256/20000 = 64/5000
    assert float((official - channels).abs().max()) > 1e-2
