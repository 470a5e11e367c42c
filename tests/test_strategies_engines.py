"""Client state lives in Context.state: the ray engine gives the inline engine's numbers."""

import pytest

from fedsim.engines import run_scenario
from fedsim.run.results import read_metrics
from fedsim.scenario import parse_scenario
from tests.conftest import small_raw

ray = pytest.importorskip("ray")


@pytest.mark.parametrize("name", ["scaffold", "fedspeed", "fedce", "fedimpro", "fedadam", "qfedavg"])
def test_stateful_strategies_match_across_engines(tmp_path, local_ray, name):
    """Rounds 2-3 depend on state written in earlier rounds (c_i, h_i, last model, estimates),
    by clients that skip rounds: any state lost or forked in an actor changes the metrics."""
    keys = ("accuracy", "loss", "bytes_up", "bytes_down", "participants")
    raw = small_raw(strategy={"name": name}, data__num_clients=5, train__rounds=3, train__participation=0.4,
                    data__partition={"name": "dirichlet", "alpha": 0.5})
    inline = run_scenario(parse_scenario(raw), tmp_path / "inline", progress=False)
    raw["engine"] = {"name": "ray", "ray": {"num_actors": 2}}
    on_ray = run_scenario(parse_scenario(raw), tmp_path / "ray", progress=False)
    a, b = read_metrics(tmp_path / "inline"), read_metrics(tmp_path / "ray")
    assert [[r[k] for k in keys] for r in a] == [[r[k] for k in keys] for r in b]
    assert inline["failures_total"] == on_ray["failures_total"] == 0


@pytest.mark.parametrize("name", ["fedspeed", "fedce", "fedimpro"])
def test_reference_mode_runs_end_to_end(tmp_path, name):
    """``fidelity: reference`` through the whole pipeline (its rules: tests/test_strategies_*_reference.py)."""
    import numpy as np

    raw = small_raw(strategy={"name": name, "fidelity": "reference"}, data__num_clients=3, train__rounds=2,
                    data__partition={"name": "dirichlet", "alpha": 0.5})
    run_scenario(parse_scenario(raw), tmp_path, progress=False)
    rows = read_metrics(tmp_path)
    assert len(rows) == 2 and all(np.isfinite(r["loss"]) for r in rows)
