"""Convergence stop: the rule, its settings, that it saves iterations, and that off is the fixed budget."""

import math

import pytest
import torch

from attacks import build_attack
from attacks.case import build_case
from attacks.metrics import evaluate
from attacks.schedule import StepDecay
from attacks.stopping import ConvergenceStop

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _fires_at(losses, patience, tol):
    stop = ConvergenceStop(patience, tol)
    for i, loss in enumerate(losses, 1):
        if stop.update(loss):
            return i
    return None


def test_rule_fires_after_patience_iterations_without_relative_gain():
    flat = [1.0] * 10
    assert _fires_at(flat, 3, 1e-3) == 4  # the first value is the best, then 3 without gain
    # Gains smaller than tol do not count, even every iteration ...
    assert _fires_at([1.0 - 1e-4 * i for i in range(10)], 3, 1e-3) == 4
    # ... but they add up: measured against the best value, not the previous one.
    assert _fires_at([1.0 - 4e-4 * i for i in range(20)], 3, 1e-3) is None
    # Noise around a level (signed Adam) does not reset the count; a real drop does.
    assert _fires_at([1.0, 1.0005, 0.9995, 1.0002, 0.5, 0.5, 0.5], 3, 1e-3) == 4
    assert _fires_at([1.0, 1.0, 0.5, 0.5, 0.5, 0.5], 3, 1e-3) == 6
    # Scale free: the same test on a loss of 1e-9.
    assert _fires_at([1e-9 * v for v in (1.0, 1.0, 0.5, 0.5, 0.5, 0.5)], 3, 1e-3) == 6
    # A non-finite loss is never an improvement; off never fires.
    assert _fires_at([math.nan] * 5, 3, 1e-3) == 3
    assert _fires_at(flat, 0, 1e-3) is None and _fires_at(flat, None, 1e-3) is None


@pytest.mark.parametrize("name", ["dlg", "idlg", "ig", "dia", "sme"])
@pytest.mark.parametrize("bad", [{"stop_patience": -1}, {"stop_patience": 2.5}, {"stop_patience": "10"},
                                 {"stop_patience": True}, {"stop_tol": -1e-3}, {"stop_tol": math.nan},
                                 {"stop_tol": math.inf}, {"stop_tol": "0.01"}])
def test_bad_stop_settings_are_refused_when_the_attack_is_built(name, bad):
    key = next(iter(bad))
    with pytest.raises(ValueError, match=key):
        build_attack(name, **bad)


def test_decay_on_plateau_needs_the_stop_and_a_schedule():
    with pytest.raises(ValueError, match="decay_on_plateau"):
        build_attack("ig", decay_on_plateau=True, stop_patience=0)
    with pytest.raises(ValueError, match="decay_on_plateau"):
        build_attack("sme", decay_on_plateau=True, decay=False)
    assert build_attack("dia", decay_on_plateau=True, stop_patience=5).decay_on_plateau


def _lrs(sched_factory, budget):
    x = torch.zeros(1, requires_grad=True)
    opt = torch.optim.Adam([{"params": [x], "lr": 0.1}, {"params": [], "lr": 1e-3}])
    step = sched_factory(opt, budget)
    out = []
    for _ in range(budget + 2):
        out.append([g["lr"] for g in opt.param_groups])
        opt.step()
        step()
    return out


def test_step_decay_is_inversefeds_multisteplr_bit_for_bit():
    # Includes budgets under 8, where milestones coincide or fall on 0.
    def multistep(opt, n):
        s = torch.optim.lr_scheduler.MultiStepLR(opt, [int(n * f) for f in (3 / 8, 5 / 8, 7 / 8)], 0.1)
        return s.step

    for budget in [*range(1, 41), 600, 2000]:
        assert _lrs(lambda o, n: StepDecay(o, n).step, budget) == _lrs(multistep, budget), budget
    assert _lrs(lambda o, n: StepDecay(o, n, enabled=False).step, 50) == [[0.1, 1e-3]] * 52


def test_plateau_decay_takes_the_next_milestones_place():
    opt = torch.optim.Adam([torch.zeros(1, requires_grad=True)], lr=0.1)
    sched = StepDecay(opt, 800)  # milestones 300, 500, 700
    for _ in range(100):
        sched.step()
    sched.plateau()
    assert sched.remaining == 2 and opt.param_groups[0]["lr"] == pytest.approx(0.01)
    for _ in range(200, 400):  # epoch 300 passes without a second decay
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.01)
    while sched.epoch < 500:
        sched.step()
    assert sched.remaining == 1 and opt.param_groups[0]["lr"] == pytest.approx(0.001)


def _same(a, b):
    return torch.equal(a.images, b.images) and a.loss_trace == b.loss_trace and a.iterations == b.iterations


def test_stop_off_runs_the_fixed_budget_bit_for_bit():
    # Off (0 or None) must be today's loop; a patience beyond the budget must not perturb it either.
    case = build_case(model="lenet", dataset="digits", batch_size=1, seed=0)
    runs = [build_attack("dlg", steps=12, seed=0, stop_patience=p).reconstruct(case.observation)
            for p in (0, None, 1000)]
    assert all(_same(runs[0], r) for r in runs[1:])
    assert runs[0].iterations == 12 and runs[0].stopped == "budget" and runs[0].extras["status"] == "steps"
    case = build_case(model="lenet", dataset="digits", batch_size=2, seed=0, labels_known=True)
    runs = [build_attack("ig", iterations=60, restarts=2, seed=0, stop_patience=p).reconstruct(case.observation)
            for p in (0, None, 1000)]
    assert all(_same(runs[0], r) for r in runs[1:])
    assert runs[0].iterations == 120 and runs[0].stopped == "budget"


def test_dlg_stops_when_converged_without_losing_quality():
    case = build_case(model="lenet", dataset="digits", batch_size=1, seed=1)
    full = build_attack("dlg", steps=80, seed=1, stop_patience=0).reconstruct(case.observation)
    rec = build_attack("dlg", steps=80, seed=1, stop_patience=10).reconstruct(case.observation)
    assert rec.stopped == "converged" and rec.extras["status"] == "plateau" and rec.iterations < 80
    assert rec.iterations >= 30  # not before the stall test at stall_steps
    assert rec.loss_trace == full.loss_trace[:rec.iterations]  # the stop only cuts the run short
    p_full, p_stop = (evaluate(r.images, case.images)["psnr"] for r in (full, rec))
    assert p_stop >= 30.0 and p_stop >= p_full - 0.5, (p_stop, p_full)


def test_dlg_plateau_before_the_stall_test_still_restarts():
    # Impossible stall ratio: every attempt is a stall at step 5, whatever the stop says before.
    case = build_case(model="lenet", dataset="digits", batch_size=1, seed=0)
    rec = build_attack("dlg", steps=20, stall_steps=5, stall_ratio=1e-30, restarts=1, stop_patience=1,
                       stop_tol=1.0, seed=0).reconstruct(case.observation)
    assert rec.restarts == 1 and rec.extras["status"] == "stalled" and rec.iterations == 10
    assert rec.stopped == "budget"


def test_ig_stop_waits_for_the_last_decay_of_the_budget_schedule():
    # With the reference schedule a plateau at lr 0.1 is not convergence: the stop may only
    # fire after the last decay, at 7/8 of the budget; without decays it fires at the plateau.
    case = build_case(model="lenet", dataset="digits", batch_size=1, seed=0, labels_known=True)
    sched = build_attack("ig", iterations=400, stop_patience=20, seed=0).reconstruct(case.observation)
    assert sched.stopped == "converged" and 350 + 20 <= sched.iterations < 400, sched.iterations
    flat = build_attack("ig", iterations=400, decay=False, stop_patience=20, seed=0).reconstruct(case.observation)
    assert flat.stopped == "converged" and flat.iterations < 350


def test_ig_decay_on_plateau_converges_early_without_losing_quality():
    case = build_case(model="lenet", dataset="digits", batch_size=1, seed=1, labels_known=True)
    full = build_attack("ig", iterations=400, seed=1, stop_patience=0).reconstruct(case.observation)
    rec = build_attack("ig", iterations=400, seed=1, stop_patience=20,
                       decay_on_plateau=True).reconstruct(case.observation)
    assert rec.stopped == "converged" and rec.iterations < 300, rec.iterations
    p_full, p_stop = (evaluate(r.images, case.images)["psnr"] for r in (full, rec))
    assert p_stop >= 30.0 and p_stop >= p_full - 0.5, (p_stop, p_full)
