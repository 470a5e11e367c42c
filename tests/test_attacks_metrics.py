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


# -- CW-SSIM against breaching's rule ---------------------------------------------------------

def _pytorch_wavelets():
    """pytorch_wavelets' DTCWTForward, or skip. The package loads its filter tables with
    ``pkg_resources``, which setuptools >= 81 no longer ships: a stand-in that reads the same
    files is installed for the import (the reference only; fedsim does not import the package)."""
    import importlib.resources
    import sys
    import types

    if "pkg_resources" not in sys.modules:
        try:
            import pkg_resources  # noqa: F401
        except ImportError:
            shim = types.ModuleType("pkg_resources")
            shim.resource_stream = lambda pkg, name: importlib.resources.files(pkg).joinpath(name).open("rb")
            sys.modules["pkg_resources"] = shim
    forward = pytest.importorskip("pytorch_wavelets").DTCWTForward

    def build(**kwargs):  # its filter buffers take the default dtype: build them in float64
        old = torch.get_default_dtype()
        torch.set_default_dtype(torch.float64)
        try:
            return forward(**kwargs)
        finally:
            torch.set_default_dtype(old)

    return build


def _breaching_cw_ssim(img, ref, scales=5, k=1e-6):
    """breaching ``analysis/metrics.py`` ``cw_ssim`` (mean, max over the batch), written from its rule:
    5-level DTCWT (near_sym_b, qshift_b); per scale, over the 6 orientations, |sum x conj y| and the
    summed squared magnitudes; (2 cross + K) / (sq_x + sq_y + K) averaged over channels and positions;
    summed over scales and divided by their number. Float64 here so the comparison is tight."""
    xfm = _pytorch_wavelets()(J=scales, biort="near_sym_b", qshift="qshift_b", include_scale=True)
    _, hx = xfm(img.double())
    _, hy = xfm(ref.double())
    total = 0
    for x, y in zip(hx, hy):  # (B, C, 6, h, w, 2)
        xc, yc = torch.view_as_complex(x.contiguous()), torch.view_as_complex(y.contiguous())
        cross = (xc * yc.conj()).sum(dim=2).abs()
        sq = (xc.abs() ** 2).sum(dim=2) + (yc.abs() ** 2).sum(dim=2)
        total = total + ((2 * cross + k) / (sq + k)).mean(dim=[1, 2, 3])
    per_image = total / scales
    return per_image.mean().item(), per_image.max().item(), per_image


@pytest.mark.parametrize("shape", [(3, 1, 8, 8), (2, 3, 32, 32), (2, 1, 16, 12), (1, 3, 7, 9)])
def test_cw_ssim_matches_breaching_rule(shape):
    g = torch.Generator().manual_seed(5)
    true = torch.rand(*shape, generator=g)
    rec = (true + 0.15 * torch.randn(*shape, generator=g)).clamp(0, 1)
    mine = metrics.cw_ssim(rec, true)
    mean, mx, per_image = _breaching_cw_ssim(rec, true)
    assert np.allclose(mine, per_image.numpy(), atol=1e-9, rtol=0)
    assert mine.mean() == pytest.approx(mean, abs=1e-9) and mine.max() == pytest.approx(mx, abs=1e-9)


def test_dtcwt_coefficients_match_pytorch_wavelets():
    from attacks.dtcwt import dtcwt_highpasses

    x = torch.rand(2, 3, 16, 20, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    _, ref = _pytorch_wavelets()(J=5, biort="near_sym_b", qshift="qshift_b")(x)
    mine = dtcwt_highpasses(x.numpy(), 5)
    for r, m in zip(ref, mine):
        assert np.abs(torch.view_as_complex(r.contiguous()).numpy() - m).max() < 1e-12


def test_cw_ssim_identical_is_one_and_ignores_brightness():
    x = _batch(3, 3, 32)
    assert np.allclose(metrics.cw_ssim(x, x), 1.0)
    # (Almost) no highpass energy in a constant image: two constants score ~(0 + K) / (0 + K) = 1
    # (the Q-shift highpass keeps a DC response of ~1e-5, so not exactly).
    flat = metrics.cw_ssim(torch.full((1, 1, 8, 8), 0.2), torch.full((1, 1, 8, 8), 0.7))
    assert np.allclose(flat, 1.0, atol=1e-3)
    out = metrics.evaluate(x, x)
    assert out["cw_ssim"] == pytest.approx(1.0) and len(out["cw_ssim_per_image"]) == 3


def test_cw_ssim_orders_degraded_images():
    x = _batch(4, 3, 32, seed=3)
    g = torch.Generator().manual_seed(4)
    scores = [metrics.cw_ssim((x + s * torch.randn(x.shape, generator=g)).clamp(0, 1), x).mean()
              for s in (0.02, 0.1, 0.3)]
    assert 1.0 > scores[0] > scores[1] > scores[2] > 0.0, scores
    unrelated = metrics.cw_ssim(_batch(4, 3, 32, seed=9), x).mean()
    assert unrelated < scores[1], (unrelated, scores)
    # A one-pixel shift costs CW-SSIM less than Gaussian SSIM (its point: translation insensitivity).
    shifted = torch.roll(x, 1, dims=-1)
    assert 1 - metrics.cw_ssim(shifted, x).mean() < 1 - metrics.ssim(shifted, x).mean()


def test_exact_batch_scores_100_db_not_inf():
    x = _batch(2)
    out = metrics.evaluate(x, x)
    assert out["psnr"] == 100.0 and math.isinf(out["psnr_max"])


def test_psnr_equals_breaching_psnr_compute():
    # breaching analysis/metrics.py psnr_compute(batched=False, factor=1) on clamped images: the mean over
    # the batch of 10 log10(1 / per-image MSE); inf for the batch when any image is exact (fedsim: 100 dB).
    g = torch.Generator().manual_seed(7)
    true = torch.rand(4, 3, 16, 16, generator=g)
    rec = (true + 0.05 * torch.randn(true.shape, generator=g)).clamp(0, 1)
    mse = ((rec - true) ** 2).view(4, -1).mean(dim=1)
    breaching = (10 * torch.log10(1.0 / mse)).mean().item()
    assert metrics.evaluate(rec, true)["psnr"] == pytest.approx(breaching, abs=1e-4)
