"""Offline LiRA in the audit (fedsim.audit.lira): shadows trained by fedsim's own LocalTrainer from the target's
starting model, on draws that hold none of the scored samples; the likelihood test on a model that memorised
its members and on one that never saw them. Its fields in a run's audit.jsonl: tests/test_audit_membership.py."""

import numpy as np
import pytest
import torch

from fedsim.audit.lira import logit_confidence, offline_scores, shadow_draws, shadow_setup, train_shadow
from fedsim.audit.lira import lira as lira_attack
from fedsim.audit.membership import MembershipCase, loss_threshold
from fedsim.scenario import ScenarioError, parse_scenario
from fedsim.world.build import build_world
from strategies.trainer import ClientData, LocalTrainer, TrainSettings
from tests.conftest import small_raw

MEMBERS, NONMEMBERS, SHADOWS = 24, 240, 6
SETTINGS = TrainSettings(server_round=1, lr=0.1, local_epochs=20, batch_size=8, momentum=0.0, weight_decay=0.0, seed=11)


def test_logit_confidence_is_log_odds_of_the_true_class():
    model = torch.nn.Linear(3, 4, bias=False)
    x, y = torch.randn(5, 3), torch.tensor([0, 1, 2, 3, 0])
    p = torch.softmax(model(x).double(), 1).gather(1, y[:, None]).squeeze(1)
    np.testing.assert_allclose(logit_confidence(model, x, y), torch.log(p / (1 - p)).detach().numpy(), rtol=1e-9)


def test_offline_scores_are_standardised_against_the_out_models():
    shadows = np.array([[0.0, 10.0], [2.0, 12.0]])  # two samples, per-sample means 1 and 11, pooled sd sqrt(2)
    np.testing.assert_allclose(offline_scores(np.array([1.0, 11.0 + 2**0.5]), shadows), [0.0, 1.0])


def test_shadow_draws_are_seeded_and_distinct():
    draws, seeds = shadow_draws(100, 30, 3, 0, 2, 5)
    again, _ = shadow_draws(100, 30, 3, 0, 2, 5)
    assert all((a == b).all() for a, b in zip(draws, again)) and len(set(seeds)) == 3
    assert all(len(set(d.tolist())) == 30 for d in draws) and not (draws[0] == draws[1]).all()


@pytest.fixture(scope="module")
def world():
    torch.set_num_threads(1)
    return build_world(parse_scenario(small_raw(model={"name": "mlp", "hidden": [64]})))


def _train(model, x, y, settings):
    LocalTrainer(model, ClientData(0, x, y, x[:0], y[:0]), settings).run()
    return model


def _case(world, trained_on_members: bool):
    """A round as FL has it: a global model (the initial one trained 5 epochs on 300 samples) that a client trains
    20 epochs on its 24 members (it memorises them), or on 24 other samples; members, non-members (test split),
    those samples and the shadows' pool (the rest of the training split) disjoint."""
    ds, rng = world.dataset, np.random.default_rng(3)
    order = torch.from_numpy(rng.permutation(len(ds.y_train)))
    members, decoy = order[:MEMBERS], order[MEMBERS:2 * MEMBERS]
    earlier, pool = order[2 * MEMBERS:2 * MEMBERS + 300], order[2 * MEMBERS + 300:]
    nonmembers = torch.from_numpy(rng.choice(len(ds.y_test), NONMEMBERS, replace=False))
    start = _train(world.new_model(), ds.x_train[earlier], ds.y_train[earlier], TrainSettings(0, 0.1, 5, 16, 0, 0, 5))
    start = {k: v.clone() for k, v in start.state_dict().items()}
    target = world.new_model()
    target.load_state_dict(start)
    seen = members if trained_on_members else decoy
    _train(target, ds.x_train[seen], ds.y_train[seen], SETTINGS)
    shadows = shadow_setup(start, SETTINGS, ds.x_train[pool], ds.y_train[pool], MEMBERS, SHADOWS, 0, 0)
    return MembershipCase({k: v.clone() for k, v in target.state_dict().items()},
                          (ds.x_train[members], ds.y_train[members]), (ds.x_test[nonmembers], ds.y_test[nonmembers]),
                          shadows)


def test_lira_finds_memorised_members_at_least_as_well_as_the_loss_threshold(world):
    case = _case(world, trained_on_members=True)
    out, loss = lira_attack(world.new_model(), case), loss_threshold(world.new_model(), case)
    assert out["membership_attack"] == "lira" and out["membership_shadows"] == SHADOWS
    assert out["membership_shadow_s"] > 0 and out["membership_members"] == MEMBERS
    # measured: LiRA 0.834 (TPR 0.042 at no false positive), loss threshold 0.767 (0.0)
    assert out["membership_auc"] > 0.75 and out["membership_auc"] >= loss["membership_auc"], (out, loss)
    assert out["membership_tpr_at_0.1%_fpr"] >= loss["membership_tpr_at_0.1%_fpr"]


def test_lira_is_at_chance_on_members_the_model_never_saw(world):
    out = lira_attack(world.new_model(), _case(world, trained_on_members=False))
    assert abs(out["membership_auc"] - 0.5) < 0.15, out


def test_a_shadow_repeats_the_targets_round_from_the_same_start(world):
    """Same start, settings and samples as the target: the shadow is the target (the trainer's own loop)."""
    case = _case(world, trained_on_members=True)
    case.shadows.data[0] = case.members
    case.shadows.settings[0] = SETTINGS
    shadow = train_shadow(world.new_model(), case.shadows, 0)
    for k, v in shadow.state_dict().items():
        torch.testing.assert_close(v, case.weights[k])


def test_lira_needs_the_update_threat_and_two_shadows():
    with pytest.raises(ScenarioError, match="audit.membership: lira needs threat: update"):
        parse_scenario(small_raw(audit={"membership": "lira", "threat": "gradient"}))
    with pytest.raises(ScenarioError, match="audit.membership_shadows"):
        parse_scenario(small_raw(audit={"membership": "lira", "membership_shadows": 1}))
