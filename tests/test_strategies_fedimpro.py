"""FedImpro: feature estimates, their aggregation, the split for every zoo model, bytes."""

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, RecordDict

from fedsim.engines import run_scenario
from fedsim.world.models import MODEL_NAMES, build_model
from fedsim.run.results import read_metrics
from fedsim.scenario import parse_scenario
from strategies.base import ClientData, TrainSettings
from tests.clients import train_client
from strategies.fedimpro import (split_model, GLOBAL_KEY, LOCAL_KEY, UPLOAD_KEY, FedImproClient, FedImproParams,
                                 aggregate_gaussians, split_point, update_estimates)
from strategies.stateful import to_record
from tests.conftest import small_raw


def test_estimates_converge_to_true_class_mean_and_std():
    rng = torch.Generator().manual_seed(0)
    classes, dim, per_class = 4, 6, 300
    true_mu = torch.randn(classes, dim, generator=rng) * 3
    true_sd = torch.rand(classes, dim, generator=rng) * 2 + 0.2
    y = torch.arange(classes).repeat_interleave(per_class)
    h = true_mu[y] + true_sd[y] * torch.randn(len(y), dim, generator=rng)
    counts = torch.bincount(y, minlength=classes).float()
    est = {"mu": torch.zeros(classes, dim), "sigma": torch.zeros(classes, dim),
           "seen_mu": torch.zeros(classes), "seen_sigma": torch.zeros(classes)}
    for _ in range(6):
        perm = torch.randperm(len(y), generator=rng)
        for s in range(0, len(y), 40):
            idx = perm[s : s + 40]
            update_estimates(est, h[idx], y[idx], counts)
    # the moving averages sit within sampling error of the truth
    assert (est["mu"] - true_mu).abs().div(true_sd).max() < 0.25
    assert ((est["sigma"] / true_sd) - 1).abs().max() < 0.15
    # and are not merely the first batch's values
    first = {"mu": torch.zeros(classes, dim), "sigma": torch.zeros(classes, dim),
             "seen_mu": torch.zeros(classes), "seen_sigma": torch.zeros(classes)}
    update_estimates(first, h[:3], y[:3], counts)
    assert not torch.allclose(first["mu"][0], est["mu"][0], atol=0.05)


def test_class_count_aggregation_is_the_pooled_moments():
    rng = np.random.default_rng(0)
    parts = [rng.normal(loc, sd, size=(n, 3)) for loc, sd, n in [(0.0, 1.0, 50), (3.0, 0.5, 150), (-1.0, 2.0, 20)]]
    mus = [p.mean(0)[None] for p in parts]              # one class, 3 features
    sds = [p.std(0)[None] for p in parts]               # population std (ddof 0)
    counts = [np.array([len(p)], float) for p in parts]
    mu, sigma, present = aggregate_gaussians(mus, sds, counts, "class_count")
    union = np.concatenate(parts)
    np.testing.assert_allclose(mu[0], union.mean(0), rtol=1e-10)
    np.testing.assert_allclose(sigma[0], union.std(0), rtol=1e-10)
    mu_u, sigma_u, _ = aggregate_gaussians(mus, sds, counts, "uniform")
    np.testing.assert_allclose(mu_u[0], np.mean([m[0] for m in mus], 0))
    np.testing.assert_allclose(sigma_u[0], np.mean([s[0] for s in sds], 0))
    assert present.all()


def test_aggregation_skips_clients_without_the_class():
    mus = [np.array([[1.0], [5.0]]), np.array([[3.0], [99.0]])]
    sds = [np.array([[1.0], [1.0]]), np.array([[1.0], [99.0]])]
    counts = [np.array([4.0, 2.0]), np.array([4.0, 0.0])]   # client 2 has no class 1
    for mode in ("uniform", "class_count"):
        mu, sigma, present = aggregate_gaussians(mus, sds, counts, mode)
        assert mu[1, 0] == pytest.approx(5.0) and sigma[1, 0] == pytest.approx(1.0)
        assert mu[0, 0] == pytest.approx(2.0)
    _, _, present = aggregate_gaussians(mus, sds, [np.array([4.0, 0.0])] * 2, "uniform")
    assert present.tolist() == [True, False]


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_split_and_train_for_every_zoo_model(name):
    model = build_model(name, 1, 8, 3, hidden=(16, 16), seed=0)
    after = split_point(model, "auto")
    assert after == {"mlp": "hidden0", "lenet": "conv2", "cnn": "conv2", "resnet18": "layer2"}[name]
    low, high = split_model(model, after)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(12, 1, 8, 8, generator=g), torch.tensor([0, 1, 2] * 4)
    torch.testing.assert_close(high(low(x)), model(x))
    feat = low(x[:1]).shape[1:]
    glob = {"mu": torch.randn(3, *feat, generator=g), "sigma": torch.rand(3, *feat, generator=g),
            "known": torch.tensor([1.0, 1.0, 0.0])}
    content = RecordDict({GLOBAL_KEY: to_record(glob), "config": ConfigRecord({"fedimpro-ramp": 0.5})})
    state = RecordDict()
    before = [p.detach().clone() for p in model.parameters()]
    res = train_client(FedImproClient(FedImproParams()), model, ClientData(0, x, y, x[:0], y[:0]),
                       TrainSettings(2, 0.05, 1, 12, 0.0, 0.0, seed=0), content, state)
    assert res.metrics["fake_loss"] > 0
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    up = res.extras[UPLOAD_KEY]
    assert up["mu"].numpy().shape == (3, *feat) and up["count"].numpy().tolist() == [4, 4, 4]
    assert state[LOCAL_KEY]["seen_mu"].numpy().tolist() == [1, 1, 1]


def test_sampled_features_train_the_high_part_only():
    """The loss on sampled features reaches the high-level part, never the low-level one."""
    model = build_model("mlp", 1, 4, 3, hidden=(8, 8), seed=0)
    low, high = split_model(model, "hidden0")
    x, y = torch.randn(6, 1, 4, 4), torch.tensor([0, 1, 2, 0, 1, 2])
    runs = {}
    for ramp in (0.0, 5.0):
        m = build_model("mlp", 1, 4, 3, hidden=(8, 8), seed=0)
        glob = {"mu": torch.full((3, 8), 2.0), "sigma": torch.ones(3, 8), "known": torch.ones(3)}
        content = RecordDict({GLOBAL_KEY: to_record(glob), "config": ConfigRecord({"fedimpro-ramp": ramp})})
        train_client(FedImproClient(FedImproParams()), m, ClientData(0, x, y, x[:0], y[:0]),
                     TrainSettings(2, 0.1, 1, 6, 0.0, 0.0, seed=0), content, RecordDict())
        runs[ramp] = m
    torch.testing.assert_close(runs[0.0].hidden0[0].weight, runs[5.0].hidden0[0].weight)  # one step: low equal
    assert not torch.allclose(runs[0.0].fc.weight, runs[5.0].fc.weight)


def test_estimates_travel_and_count_in_bytes_up(tmp_path):
    common = dict(data__num_clients=4, train__rounds=2, train__participation=0.5, model={"name": "mlp",
                                                                                          "hidden": [32]})
    run_scenario(parse_scenario(small_raw(**common)), tmp_path / "avg", progress=False)
    run_scenario(parse_scenario(small_raw(strategy={"name": "fedimpro"}, **common)), tmp_path / "imp",
                 progress=False)
    avg, imp = read_metrics(tmp_path / "avg"), read_metrics(tmp_path / "imp")
    stats = to_record({"mu": np.zeros((10, 32), np.float32), "sigma": np.zeros((10, 32), np.float32),
                       "count": np.zeros(10, np.float32)})
    glob = to_record({"mu": np.zeros((10, 32), np.float32), "sigma": np.zeros((10, 32), np.float32),
                      "known": np.zeros(10, np.float32)})
    for r_avg, r_imp in zip(avg, imp):
        assert r_imp["bytes_up"] - r_avg["bytes_up"] == r_imp["participants"] * stats.count_bytes()
    assert imp[0]["bytes_down"] == avg[0]["bytes_down"]  # no global estimates before round 1 ends
    assert imp[1]["bytes_down"] - avg[1]["bytes_down"] == imp[1]["participants"] * glob.count_bytes()
    assert imp[1]["known_classes"] > 0
