"""Attacks reconstruct for real on small cases (digits, sigmoid LeNet)."""

import pytest
import torch

from attacks import build_attack
from attacks.case import build_case
from attacks.metrics import evaluate, label_accuracy


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_dlg_digits_batch1_reaches_30db():
    for seed in range(2):
        case = build_case(model="lenet", dataset="digits", batch_size=1, seed=seed)
        rec = build_attack("dlg", steps=40, seed=seed).reconstruct(case.observation)
        scores = evaluate(rec.images, case.images, rec.hard_labels(), case.labels)
        assert scores["psnr"] >= 30.0, scores["psnr"]
        assert scores["label_accuracy"] == 1.0


def test_dlg_is_deterministic_for_a_seed():
    case = build_case(model="lenet", dataset="digits", batch_size=1, seed=3)
    a = build_attack("dlg", steps=5, seed=7).reconstruct(case.observation)
    b = build_attack("dlg", steps=5, seed=7).reconstruct(case.observation)
    assert torch.equal(a.images, b.images) and a.loss_trace == b.loss_trace


def test_dlg_detects_divergence_and_restarts():
    # A non-finite upload makes every attempt's loss non-finite: each must be caught.
    case = build_case(model="lenet", dataset="digits", batch_size=1, seed=0)
    case.observation.gradients[0][0, 0, 0, 0] = float("inf")
    rec = build_attack("dlg", steps=5, restarts=2, seed=0).reconstruct(case.observation)
    assert rec.restarts == 2 and rec.extras["status"] == "diverged"
    assert torch.isfinite(rec.images).all()


def test_dlg_restarts_a_stalled_run():
    # An impossible stall criterion (loss must drop 1e30x in 2 steps) forces restarts.
    case = build_case(model="lenet", dataset="digits", batch_size=1, seed=0)
    rec = build_attack("dlg", steps=5, stall_steps=2, stall_ratio=1e-30, restarts=3, seed=0).reconstruct(
        case.observation)
    assert rec.restarts == 3 and rec.extras["status"] == "stalled" and rec.iterations == 8


def test_idlg_label_accuracy_is_one():
    for seed in range(5):
        case = build_case(model="lenet", dataset="patches", batch_size=1, seed=seed)
        rec = build_attack("idlg", steps=3, seed=seed).reconstruct(case.observation)
        assert label_accuracy(rec.hard_labels(), case.labels) == 1.0


def test_ig_batch_recovers_images_with_known_labels():
    case = build_case(model="lenet", dataset="digits", batch_size=4, seed=0, labels_known=True)
    rec = build_attack("ig", iterations=300, seed=0).reconstruct(case.observation)
    scores = evaluate(rec.images, case.images)
    assert scores["psnr"] >= 18.0 and scores["ssim"] >= 0.8, scores


def test_dia_beats_ig_under_dropout():
    case = build_case(model="lenet", dataset="digits", batch_size=1, seed=0, dropout=0.5, labels_known=True)
    ig = build_attack("ig", iterations=300, seed=0).reconstruct(case.observation)
    dia = build_attack("dia", iterations=300, seed=0).reconstruct(case.observation)
    p_ig = evaluate(ig.images, case.images)["psnr"]
    p_dia = evaluate(dia.images, case.images)["psnr"]
    assert p_ig < 15.0 and p_dia >= 25.0, (p_ig, p_dia)


def test_sme_beats_unrolled_ig_at_equal_compute():
    # 10 local steps: one unrolled iteration costs ~10 gradient evaluations, one SME iteration one.
    case = build_case(model="lenet", dataset="digits", batch_size=2, seed=1, threat="update",
                      local_steps=10, lr=0.01, labels_known=True)
    sme = build_attack("sme", iterations=400, seed=0).reconstruct(case.observation)
    ig = build_attack("ig", iterations=40, seed=0).reconstruct(case.observation)
    p_sme = evaluate(sme.images, case.images)["psnr"]
    p_ig = evaluate(ig.images, case.images)["psnr"]
    assert p_sme >= 25.0 and p_sme > p_ig, (p_sme, p_ig)
    assert sme.wall_s / sme.iterations < ig.wall_s / ig.iterations / 3
