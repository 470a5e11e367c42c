"""Shared fixtures, and which tests are *slow*.

`make test` runs ``pytest -m "not slow"`` (the fast set: at most 3 minutes on 2 cores); `make test-all`,
CI (.ci/run) and a plain ``pytest`` run every test. A test is slow when it starts something heavy.
That is read off the test itself when tests are collected (``pytest_collection_modifyitems``
below), never listed test by test. The categories (``slow_categories``):

  ray       it requests the ``local_ray`` fixture, or calls what starts Ray itself
            (``start_local_ray``; ``RayGrid``; ``run_sweep``: a sweep runs its runs as Ray tasks);
  process   it starts other processes through ``subprocess``: ``python -m fedsim`` or
            ``python -m attacks``, a SuperLink and SuperNodes, a run killed with SIGKILL, a browser;
  attack    it runs a reconstruction attack's optimisation (``.reconstruct(...)``), or runs a
            scenario with an ``audit`` block (``run_scenario``/``main`` on a scenario given an
            ``audit`` key): the audit attacks every audited round, in a spawned process of its own;
  canaries  it simulates the empirical-privacy estimate's canaries in high dimension (``canary_sum``,
            ``MaxCosines``: thousands of canaries of 50,000 coordinates, ~10^9 random draws).

What a test "calls" is read from its own code, the code of the fixtures it requests, and the
code of the helpers (functions, classes) defined under tests/ that these name, followed a few
levels deep. A test marked ``@pytest.mark.slow`` by hand is slow as well.

``@pytest.mark.fast`` overrides the rule, for the few end-to-end tests that keep every feature
in the fast set although they start something (one run on Ray, one sweep, one audit in its own
process); each says so where it is marked. See why a test is slow:
``pytest --collect-only -q -m slow`` lists them, and each item's ``slow`` marker carries its
categories (``item.get_closest_marker("slow").args``).
"""

import dis
import inspect
import os
import types

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


# ----------------------------------------------------------------------------- the fast set

RAY_STARTERS = {"start_local_ray", "RayGrid", "run_sweep"}
SCENARIO_RUNNERS = {"run_scenario", "main"}  # fedsim.engines.run_scenario; fedsim.cli.main in process
CANARY_SIMULATIONS = {"canary_sum", "MaxCosines"}  # fedsim.privacy.canaries, in high dimension
FOLLOW_DEPTH = 4  # helpers calling helpers


def _code_facts(code: types.CodeType, names: set[str], keys: set[str]) -> None:
    """Every global or attribute name ``code`` (and the functions nested in it) uses, and every
    string it uses as a key: a keyword argument's name, a constant dict key, ``x["key"] = ...``."""
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            _code_facts(const, names, keys)
        elif isinstance(const, tuple):  # keyword-argument names and constant dict keys
            keys.update(c for c in const if isinstance(c, str))
    names.update(code.co_names)
    previous = None
    for ins in dis.get_instructions(code):
        if ins.opname == "STORE_SUBSCR" and previous is not None and previous.opname == "LOAD_CONST" \
                and isinstance(previous.argval, str):
            keys.add(previous.argval)
        previous = ins


def _facts(obj, names: set[str], keys: set[str], seen: set[int], depth: int = 0) -> None:
    """``_code_facts`` of a function, or of a class's methods, then of the tests/ helpers they name."""
    if id(obj) in seen or depth > FOLLOW_DEPTH:
        return
    seen.add(id(obj))
    if inspect.isclass(obj):
        for member in vars(obj).values():
            member = getattr(member, "__func__", member)
            if inspect.isfunction(member):
                _facts(member, names, keys, seen, depth + 1)
        return
    obj = inspect.unwrap(obj)
    code = getattr(obj, "__code__", None)
    if code is None:
        return
    used: set[str] = set()
    _code_facts(code, used, keys)
    names |= used
    module_globals = getattr(obj, "__globals__", {})
    for name in used:
        helper = module_globals.get(name)
        if (inspect.isfunction(helper) or inspect.isclass(helper)) and \
                getattr(helper, "__module__", "").partition(".")[0] == "tests":
            _facts(helper, names, keys, seen, depth + 1)


def slow_categories(item) -> list[str]:
    """The categories (module docstring) that make ``item`` slow; empty for a fast test."""
    names: set[str] = set()
    keys: set[str] = set()
    seen: set[int] = set()
    _facts(item.function, names, keys, seen)
    fixture_info = getattr(item, "_fixtureinfo", None)  # pytest's own record of the fixtures a test requests
    for defs in getattr(fixture_info, "name2fixturedefs", {}).values():
        for fixture in defs:
            func = getattr(fixture, "func", None)
            if func is not None and getattr(func, "__module__", "").partition(".")[0] == "tests":
                _facts(func, names, keys, seen)
    categories = []
    if "local_ray" in item.fixturenames or names & RAY_STARTERS:
        categories.append("ray")
    if "subprocess" in names:
        categories.append("process")
    if "reconstruct" in names or ("audit" in keys and names & SCENARIO_RUNNERS):
        categories.append("attack")
    if names & CANARY_SIMULATIONS:
        categories.append("canaries")
    return categories


def pytest_configure(config):
    config.addinivalue_line("markers", "slow(*categories): starts Ray, other processes or a reconstruction attack "
                            "(set by the rule in tests/conftest.py, or by hand); `make test` leaves these out")
    config.addinivalue_line("markers", "fast: in the fast set although the rule in tests/conftest.py calls it slow "
                            "(a feature's one end-to-end test there)")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if not isinstance(item, pytest.Function):
            continue
        if item.get_closest_marker("fast") is not None:
            if item.get_closest_marker("slow") is not None:
                raise pytest.UsageError(f"{item.nodeid}: marked both fast and slow")
            continue
        categories = slow_categories(item)
        if categories:
            item.add_marker(pytest.mark.slow(*categories))
