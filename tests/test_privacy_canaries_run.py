"""The scenario's ``privacy`` section in a run: canaries join the aggregate inside dp_user's wrapper,
``epsilon_est`` lands in metrics.jsonl beside the accountant's ``epsilon`` (fedsim.privacy.run)."""

import numpy as np
import pytest

from fedsim.engines import run_scenario
from fedsim.privacy.run import CanarySchedule
from fedsim.run.results import read_metrics
from fedsim.scenario import parse_scenario
from fedsim.scenario.schema import ScenarioError
from tests.conftest import small_raw

PRIVACY = {"method": "canaries", "canaries": 200, "bootstrap": 20}


def test_schedule_spreads_each_canary_over_the_rounds():
    s = CanarySchedule(0, canaries=10, repeats=2, rounds=4)
    rounds = [s(t) for t in range(1, 5)]
    assert sorted(i for r in rounds for i in r) == sorted(list(range(10)) * 2)
    assert [len(r) for r in rounds] == [5, 5, 5, 5]
    assert s.up_to(4) == list(range(10)) and s.up_to(0) == []


@pytest.mark.parametrize("canaries", [200, 24])
def test_dp_user_run_reports_estimate_below_the_accountant(tmp_path, one_torch_thread, canaries):
    """``epsilon_est`` (the lower bound at 95% confidence) under the accountant's epsilon on every round, with
    many canaries (67 a round) and few (6 a round, where the paper's point estimate can read several times the
    truth: fedsim.privacy.canaries). Round 1 is the hard one: one release, whose true epsilon (PLD, 4.38 at z=1)
    is only 8% under the accountant's RDP bound (4.73). A canary at the wrong scale (norm instead of norm/m)
    would read about epsilon(z/4) > 30 and fail here."""
    raw = small_raw(train__rounds=3 if canaries == 200 else 4,
                    defense={"name": "dp_user", "noise_multiplier": 1.0, "clipping_norm": 1.0},
                    privacy={**PRIVACY, "canaries": canaries})
    summary = run_scenario(parse_scenario(raw), tmp_path, progress=False)
    rows = read_metrics(tmp_path)
    for r in rows:
        assert r["epsilon"] is not None and r["epsilon_est"] is not None
        assert 0 <= r["epsilon_est"] <= r["epsilon"], r
        assert r["epsilon_est"] <= r["epsilon_est_point"]  # the bound is the region's smallest epsilon
        assert r["epsilon_est_low"] <= r["epsilon_est_point"] <= (r["epsilon_est_high"] or np.inf)
    if canaries == 200:  # 67 canaries in round 1: the bound is informative (6 leave it near 0, honestly)
        assert rows[0]["epsilon_est"] > 0.4 * rows[0]["epsilon"]
    assert rows[-1]["epsilon_est_canaries"] == canaries
    assert summary["epsilon_est"] == rows[-1]["epsilon_est"] and summary["epsilon_est_threat"] == "final"


def test_no_defense_estimate_is_large(tmp_path, one_torch_thread):
    raw = small_raw(train__rounds=2, privacy={**PRIVACY, "threat": "all_iterates", "unobserved": 200})
    run_scenario(parse_scenario(raw), tmp_path, progress=False)
    rows = read_metrics(tmp_path)
    assert rows[-1]["epsilon_est"] is None or rows[-1]["epsilon_est"] > 20, rows[-1]


def test_canaries_refuse_adaptive_clipping():
    raw = small_raw(defense={"name": "dp_user", "adaptive": True}, privacy=PRIVACY)
    with pytest.raises(ScenarioError, match="privacy"):
        parse_scenario(raw)


def test_canaries_survive_an_interrupted_run(tmp_path, monkeypatch, one_torch_thread):
    """The canary observer's state (theta_0, the all-iterates maxima) and the wrapper ride the checkpoint:
    a run cut after round 3 and resumed writes the rows of the run left alone."""
    from fedsim.run.resume import main as resume_main
    from tests.test_resume import _interrupted, _metrics

    raw = small_raw(train__rounds=4, defense={"name": "dp_user", "noise_multiplier": 1.0},
                    privacy={**PRIVACY, "threat": "all_iterates", "unobserved": 100, "every": 2})
    run_scenario(parse_scenario(raw), tmp_path / "alone", progress=False)
    _interrupted(raw, tmp_path / "cut", at=3, monkeypatch=monkeypatch)
    assert resume_main([str(tmp_path / "cut"), "--quiet"]) == 0
    alone = _metrics(tmp_path / "alone")
    assert _metrics(tmp_path / "cut") == alone
    assert [r["round"] for r in alone if "epsilon_est" in r] == [2, 4]  # every 2 (and the last)
