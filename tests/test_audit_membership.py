"""Membership inference in the audit (fedsim.audit.membership): the loss-threshold attack's scores, on a model
that memorised its members and on one that never saw them, and its fields in audit.jsonl."""

import json

import numpy as np
import pytest
import torch

from fedsim.audit.membership import MembershipCase, loss_threshold, nonmember_indices, sample_losses, scores
from fedsim.engines import run_scenario
from fedsim.scenario import ScenarioError, parse_scenario
from fedsim.world.models import build_model
from tests.conftest import small_raw


def test_scores_rank_low_loss_as_members():
    low, high = np.linspace(0.0, 0.5, 50), np.linspace(1.0, 2.0, 200)
    assert scores(low, high)["membership_auc"] == 1.0 and scores(low, high)["membership_tpr_at_0.1%_fpr"] == 1.0
    assert scores(high, low)["membership_auc"] == 0.0 and scores(high, low)["membership_tpr_at_0.1%_fpr"] == 0.0
    same = scores(low, low)
    assert same["membership_auc"] == 0.5 and same["membership_members"] == same["membership_nonmembers"] == 50


def _case(model, members, nonmembers):
    return MembershipCase({k: v.clone() for k, v in model.state_dict().items()}, members, nonmembers)


def test_a_memorising_model_gives_its_members_away_and_an_untrained_one_does_not(one_torch_thread):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(80, 1, 4, 4, generator=g), torch.randint(0, 3, (80,), generator=g)
    members, nonmembers = (x[:40], y[:40]), (x[40:], y[40:])  # random labels: only memorising fits them
    model = build_model("mlp", 1, 4, 3, hidden=(64,), seed=0)
    untrained = loss_threshold(build_model("mlp", 1, 4, 3, hidden=(64,), seed=0), _case(model, members, nonmembers))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(300):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(members[0]), members[1]).backward()
        opt.step()
    probe = build_model("mlp", 1, 4, 3, hidden=(64,), seed=0)
    trained = loss_threshold(probe, _case(model, members, nonmembers))
    assert trained["membership_auc"] > 0.95
    assert abs(untrained["membership_auc"] - 0.5) < 0.2
    # Under 1,000 non-members, TPR at 0.1% FPR is the share of members below every non-member's loss.
    inside, outside = (sample_losses(probe, *members), sample_losses(probe, *nonmembers))
    assert trained["membership_tpr_at_0.1%_fpr"] == pytest.approx(float(np.mean(inside < outside.min())))


def test_nonmembers_are_a_seeded_choice_without_repeats():
    a, b = nonmember_indices(100, 30, 0, 2, 5), nonmember_indices(100, 30, 0, 2, 5)
    assert (a == b).all() and len(set(a.tolist())) == 30
    assert len(nonmember_indices(10, 30, 0, 2, 5)) == 10  # all of a smaller pool
    assert not (nonmember_indices(100, 30, 0, 3, 5) == a).all()  # another round, another choice


def test_a_bad_membership_setting_is_refused():
    with pytest.raises(ScenarioError, match="audit.membership"):
        parse_scenario(small_raw(audit={"membership": "lira-ish"}))


@pytest.mark.parametrize("threat,attack", [("update", "lira"), ("gradient", "loss")])
def test_the_audit_rows_carry_the_membership_scores(tmp_path, capfd, threat, attack):
    """One run per threat; the update threat's with LiRA (fedsim.audit.lira: shadows trained in the audit's worker,
    their cost in the row and printed once), the gradient threat's with the loss threshold."""
    raw = small_raw(train__rounds=2, train__local_epochs=5,
                    audit={"threat": threat, "attack": "ig", "attack_config": {"iterations": 5}, "clients": 1,
                           "membership": attack, "membership_shadows": 3, "batch_size": 1})
    summary = run_scenario(parse_scenario(raw), tmp_path, progress=False)
    rows = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert rows
    for row in rows:
        assert 0.0 <= row["membership_auc"] <= 1.0 and 0.0 <= row["membership_tpr_at_0.1%_fpr"] <= 1.0
        assert row["membership_members"] > 0 and row["membership_nonmembers"] == row["membership_members"]
        assert row["membership_attack"] == attack
        assert (row.get("membership_shadows"), row.get("membership_shadow_s", 0) > 0) == (
            (3, True) if attack == "lira" else (None, False))
    assert summary["audit_worst_membership_auc"] == max(r["membership_auc"] for r in rows)
    assert ("LiRA trained 3 shadow models" in capfd.readouterr().err) == (attack == "lira")
