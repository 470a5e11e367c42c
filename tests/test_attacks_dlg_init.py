"""DLG/iDLG on PyTorch's default init (issue 22, item 4; experiments/attacks/RESULTS.md, "DLG and iDLG on
PyTorch's default init"): the default (scale-free objective, L-BFGS exit tolerances off) inverts the
default-init LeNet, which the old default (the paper's L2 with torch's absolute tolerances) stopped short of."""

import pytest

from attacks import build_attack
from attacks.case import build_case
from attacks.metrics import evaluate

pytestmark = pytest.mark.usefixtures("one_torch_thread")

OLD = {"objective": "l2", "tolerances": "torch"}


def _psnr(case, seed, attack="idlg", **cfg):
    rec = build_attack(attack, seed=seed, **cfg).reconstruct(case.observation)
    return evaluate(rec.images, case.images, rec.hard_labels(), case.labels)["psnr"], rec


def test_idlg_default_recovers_the_default_init_lenet_where_the_old_default_stopped_short():
    for seed in (0, 1):
        case = build_case(model="lenet", dataset="digits", batch_size=1, seed=seed, init="default")
        new, _ = _psnr(case, seed)
        old, rec = _psnr(case, seed, **OLD)
        # measured: new 93 / 86 dB, old 30.8 / 25.8 dB, stopped as "converged" at step 30
        assert new >= 60.0, (seed, new)
        assert old < 35.0 and rec.stopped == "converged" and rec.iterations == 30, (seed, old)


def test_dlg_keeps_its_default_and_its_tolerances_off_option_recovers_the_default_init_lenet():
    # DLG's default stays the reference's (its fix costs 7x the time on 32x32 patches); the named option fixes it.
    case = build_case(model="lenet", dataset="digits", batch_size=1, seed=4, init="default")
    default, _ = _psnr(case, 4, "dlg")
    old, _ = _psnr(case, 4, "dlg", **OLD)
    off, _ = _psnr(case, 4, "dlg", tolerances="off")
    assert default == old < 30.0 and off >= 50.0, (default, old, off)  # measured: 24.0 and 76.5 dB


def test_the_old_default_is_stuck_because_lbfgs_tolerances_are_absolute():
    # With torch's tolerances every L-BFGS step after the first returns without moving: a longer budget
    # (no convergence stop) ends where the stopped run ended.
    case = build_case(model="lenet", dataset="digits", batch_size=1, seed=2, init="default")
    stopped, a = _psnr(case, 2, **OLD)
    full, b = _psnr(case, 2, steps=100, stop_patience=0, **OLD)
    assert b.iterations == 100 and abs(full - stopped) < 0.5 and b.loss_trace[-1] == b.loss_trace[30]


def test_idlg_default_keeps_the_uniform_init_case():
    case = build_case(model="lenet", dataset="digits", batch_size=1, seed=0, init="uniform")
    new, _ = _psnr(case, 0)
    old, _ = _psnr(case, 0, **OLD)
    assert new >= old - 1.0 and new >= 60.0, (new, old)  # measured: 78.8 dB old


@pytest.mark.parametrize("key, value", [("objective", "l1"), ("tolerances", "none"), ("init", "zeros"),
                                        ("trials", 0)])
def test_dlg_refuses_an_unknown_setting(key, value):
    with pytest.raises(ValueError, match=key):
        build_attack("dlg", **{key: value})
