"""Metrics: Hungarian matching, PSNR, SSIM, label accuracy."""

import math

import numpy as np
import pytest
import torch

from attacks import metrics


def _batch(n=4, c=3, s=16, seed=0):
    return torch.rand(n, c, s, s, generator=torch.Generator().manual_seed(seed))


def test_identical_images_give_infinite_psnr_and_unit_ssim():
    x = _batch()
    assert np.isinf(metrics.psnr(x, x)).all()
    assert np.allclose(metrics.ssim(x, x), 1.0)
    out = metrics.evaluate(x, x)
    assert out["ssim"] == pytest.approx(1.0)
    assert out["psnr"] >= 100.0 and out["success_rate"] == 1.0


def test_psnr_matches_definition():
    x = torch.zeros(1, 1, 8, 8)
    y = torch.full((1, 1, 8, 8), 0.1)
    assert metrics.psnr(y, x)[0] == pytest.approx(10 * math.log10(1 / 0.01))


def test_permuted_batch_is_matched_back():
    x = 0.9 * _batch(6)  # room for +0.01 below the clamp at 1
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    order = metrics.match(x[perm], x)
    assert torch.equal(x[perm][torch.as_tensor(order)], x)
    out = metrics.evaluate(x[perm] + 0.01, x)
    assert out["psnr"] == pytest.approx(40.0, abs=0.01)  # MSE 1e-4 after matching


def test_ssim_small_images_use_smaller_window():
    assert metrics.ssim_window(32, 32) == 11
    assert metrics.ssim_window(8, 8) == 7
    x = _batch(2, 1, 8)
    noisy = (x + 0.2 * torch.randn_like(x)).clamp(0, 1)
    s = metrics.ssim(noisy, x)
    assert (s < 0.95).all() and (s > -1).all()


def test_noise_lowers_scores_monotonically():
    x = _batch(2)
    g = torch.Generator().manual_seed(1)
    low = (x + 0.02 * torch.randn(x.shape, generator=g)).clamp(0, 1)
    high = (x + 0.2 * torch.randn(x.shape, generator=g)).clamp(0, 1)
    assert metrics.psnr(low, x).mean() > metrics.psnr(high, x).mean()
    assert metrics.ssim(low, x).mean() > metrics.ssim(high, x).mean()


def test_label_accuracy_is_multiset_overlap():
    assert metrics.label_accuracy([1, 1, 2, 3], [1, 2, 2, 3]) == 0.75
    assert metrics.label_accuracy([3, 2, 1], [1, 2, 3]) == 1.0
    assert metrics.label_accuracy(None, [1]) is None
