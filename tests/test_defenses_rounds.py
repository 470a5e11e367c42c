"""Defenses on the ray engine: one seed gives one run, the same as inline (DP-SGD's Poisson
batches and noise, the upload noise, and each client's accountant in Context.state)."""

import pytest

from fedsim.engines import run_scenario
from fedsim.run.results import read_metrics
from fedsim.scenario import parse_scenario
from tests.conftest import small_raw

ray = pytest.importorskip("ray")


def test_dp_sgd_and_noise_match_across_engines(tmp_path, local_ray):
    keys = ("accuracy", "loss", "train_loss", "epsilon", "epsilon_clients", "clip_fraction", "participants")
    raw = small_raw(strategy={"name": "scaffold"}, train__rounds=3, train__participation=0.5,
                    defense=[{"name": "dp_sgd", "noise_multiplier": 1.0}, {"name": "noise", "variance": 1e-4}])
    run_scenario(parse_scenario(raw), tmp_path / "inline", progress=False)
    raw["engine"] = {"name": "ray", "ray": {"num_actors": 2}}
    run_scenario(parse_scenario(raw), tmp_path / "ray", progress=False)
    a, b = read_metrics(tmp_path / "inline"), read_metrics(tmp_path / "ray")
    assert [[r[k] for k in keys] for r in a] == [[r[k] for k in keys] for r in b]
    assert a[-1]["epsilon"] > a[0]["epsilon"]
