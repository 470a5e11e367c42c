import os

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")

import pytest  # noqa: E402

from fedsim.scenario import parse_scenario  # noqa: E402


def small_raw(**overrides):
    """A small, fast scenario as a raw mapping (digits, 4 clients, 2 rounds)."""
    raw = {
        "name": "small",
        "seed": 0,
        "data": {"dataset": "digits", "num_clients": 4, "partition": {"name": "iid"}},
        "model": {"name": "mlp", "hidden": [32]},
        "strategy": {"name": "fedavg"},
        "train": {"rounds": 2, "local_epochs": 1, "batch_size": 32, "lr": 0.1},
        "output": {"plot": False, "progress": False},
    }
    for path, value in overrides.items():
        node = raw
        keys = path.split("__")
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = value
    return raw


@pytest.fixture
def small_scenario():
    return lambda **kw: parse_scenario(small_raw(**kw))


@pytest.fixture
def one_torch_thread():
    """Small nets: threads cost more than they give."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray instance for a test module (RayGrid joins it instead of starting its own)."""
    ray = pytest.importorskip("ray")
    from fedsim.engines.ray_cluster import start_local_ray, stop_local_ray

    started = not ray.is_initialized()
    start_local_ray(num_cpus=2)
    yield
    if started:
        stop_local_ray()


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: starts real Flower processes (minutes); deselect with -m 'not slow'")
