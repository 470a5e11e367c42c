"""Reconstruction quality: PSNR, SSIM, CW-SSIM, label accuracy, optional LPIPS.

Conventions follow the evaluation of Inverting Gradients (Geiping et al., NeurIPS 2020)
and breaching's ``analysis/metrics.py``:
- images are compared in [0, 1] (clamped);
- a batch of reconstructions is first matched to the true batch by a Hungarian
  assignment (``scipy.optimize.linear_sum_assignment``) on pairwise MSE, because an
  attack cannot know the order of the client's samples (breaching matches on LPIPS
  instead, when its weights are at hand);
- PSNR per image = 10 log10(1 / MSE), inf for an image reproduced exactly
  (``psnr``); ``evaluate`` reports the batch mean with each such image counted as 100 dB
  (so an exact batch scores 100 dB, not inf) and the per-image values and the max as they
  are. On batches without an exact image this equals breaching's ``psnr_compute`` and
  inversefed's ``metrics.psnr`` (the mean of the per-image PSNRs); both return inf for the
  whole batch when any image is exact;
- SSIM (Wang et al., IEEE TIP 2004) via ``skimage.metrics.structural_similarity`` with
  ``gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1.0``,
  channels averaged. The Gaussian filter is always sigma 1.5 truncated at 3.5 sigma (11 taps,
  reflect padding at the borders); ``win_size`` does not shrink it, it only sets the border
  cropped from the SSIM map before the mean: (win_size - 1) / 2 pixels, with win_size 11, or
  the largest odd size that fits a smaller image (``ssim_window``: 7 for 8x8 images, so an
  8x8 image's SSIM is the mean of the central 2x2 of its map);
- CW-SSIM as breaching computes it (``cw_ssim``; its report prints it as "SSIM"): not Wang and
  Simoncelli's local CW-SSIM but, per scale of a 5-level dual-tree complex wavelet transform
  (``attacks.dtcwt``: near_sym_b / qshift_b, six orientations), at each coefficient position
  (2 |sum_o x_o conj(y_o)| + K) / (sum_o |x_o|^2 + sum_o |y_o|^2 + K) with K = 1e-6 and the
  sums over the six orientations, averaged over channels and positions, then over the 5
  scales. Insensitive to small shifts and to the mean brightness (the lowpass is left
  out), it is not Gaussian SSIM: on the same reconstructions the two differ by up to 0.4
  (0.61 against 0.22 on a failed SME reconstruction of a patch);
  compare CW-SSIM with numbers reported through breaching, SSIM with skimage-based ones;
- label accuracy = multiset overlap of recovered and true labels / batch size;
- LPIPS (Zhang et al., CVPR 2018) only when the ``lpips`` package and its pretrained
  weights are already on disk (nothing is downloaded); otherwise ``None``.
A reconstruction counts as a success at PSNR >= 20 dB (``SUCCESS_PSNR``).
"""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

SUCCESS_PSNR = 20.0


def _np(x: torch.Tensor) -> np.ndarray:
    return x.detach().to(torch.float64).clamp(0, 1).cpu().numpy()


def pairwise_mse(rec: torch.Tensor, true: torch.Tensor) -> np.ndarray:
    r = _np(rec).reshape(len(rec), -1)
    t = _np(true).reshape(len(true), -1)
    return ((r[:, None, :] - t[None, :, :]) ** 2).mean(-1)


def match(rec: torch.Tensor, true: torch.Tensor) -> np.ndarray:
    """Index array ``order`` with ``rec[order[i]]`` matched to ``true[i]``."""
    cost = pairwise_mse(rec, true)
    rows, cols = linear_sum_assignment(cost)
    order = np.empty(len(true), dtype=np.int64)
    order[cols] = rows
    return order


def psnr(rec: torch.Tensor, true: torch.Tensor) -> np.ndarray:
    """Per-image PSNR (dB) of aligned batches in [0, 1]; inf for an image reproduced exactly."""
    mse = ((_np(rec) - _np(true)) ** 2).reshape(len(true), -1).mean(-1)
    with np.errstate(divide="ignore"):
        return 10.0 * np.log10(1.0 / mse)


def ssim_window(height: int, width: int, sigma: float = 1.5) -> int:
    """``win_size`` for skimage: 11 (the Gaussian's support), or the largest odd size that fits.
    Only the cropped border depends on it; the Gaussian filter stays 11 taps."""
    full = 2 * int(3.5 * sigma + 0.5) + 1
    side = min(full, height, width)
    return side if side % 2 == 1 else side - 1


def ssim(rec: torch.Tensor, true: torch.Tensor) -> np.ndarray:
    """Per-image SSIM of aligned batches in [0, 1] (channels averaged)."""
    from skimage.metrics import structural_similarity

    r, t = _np(rec), _np(true)
    win = ssim_window(r.shape[2], r.shape[3])
    out = []
    for a, b in zip(r, t):
        out.append(structural_similarity(a, b, channel_axis=0, gaussian_weights=True, sigma=1.5,
                                         use_sample_covariance=False, data_range=1.0,
                                         win_size=win))
    return np.asarray(out)


CW_SSIM_SCALES = 5
CW_SSIM_K = 1e-6


def cw_ssim(rec: torch.Tensor, true: torch.Tensor, scales: int = CW_SSIM_SCALES, k: float = CW_SSIM_K) -> np.ndarray:
    """Per-image CW-SSIM of aligned batches in [0, 1], breaching's definition (module docstring).

    breaching's ``cw_ssim`` returns the batch mean and max of these values (it computes them in
    the images' float32; here float64, a difference of ~1e-7)."""
    from .dtcwt import dtcwt_highpasses

    xs = dtcwt_highpasses(_np(rec), scales)
    ys = dtcwt_highpasses(_np(true), scales)
    total = np.zeros(len(true))
    for x, y in zip(xs, ys):  # (B, C, 6, h, w) complex
        cross = np.abs((x * y.conj()).sum(axis=2))
        power = (np.abs(x) ** 2).sum(axis=2) + (np.abs(y) ** 2).sum(axis=2)
        total += ((2 * cross + k) / (power + k)).mean(axis=(1, 2, 3))
    return total / scales


def label_accuracy(recovered, true) -> float | None:
    """Multiset overlap of recovered and true labels, divided by the batch size."""
    if recovered is None:
        return None
    rec = Counter(int(v) for v in torch.as_tensor(recovered).flatten())
    tru = Counter(int(v) for v in torch.as_tensor(true).flatten())
    return sum(min(rec[k], tru[k]) for k in tru) / max(1, sum(tru.values()))


def lpips(rec: torch.Tensor, true: torch.Tensor) -> np.ndarray | None:
    """Per-image LPIPS (alex) if the package and its weights are present locally."""
    try:
        import lpips as _lpips  # noqa: F401
        from pathlib import Path

        hub = Path(torch.hub.get_dir()) / "checkpoints"
        if not any(hub.glob("alexnet-*.pth")):
            return None
        net = _lpips.LPIPS(net="alex", verbose=False)
        with torch.no_grad():
            d = net(rec.clamp(0, 1) * 2 - 1, true.clamp(0, 1) * 2 - 1)
        return d.flatten().numpy()
    except Exception:  # package missing, weights missing, wrong channel count
        return None


def _finite(v: float) -> float | None:
    return float(v) if math.isfinite(v) else None


def evaluate(rec_images: torch.Tensor, true_images: torch.Tensor, rec_labels=None, true_labels=None) -> dict:
    """Match, then score a batch. ``psnr`` is the mean with exact images counted as 100 dB (an exact
    batch scores 100, not inf); ``psnr_max`` and ``psnr_per_image`` keep inf for them."""
    order = match(rec_images, true_images)
    aligned = rec_images[torch.as_tensor(order)]
    p, s = psnr(aligned, true_images), ssim(aligned, true_images)
    cw = cw_ssim(aligned, true_images)
    out = {
        "psnr": float(np.mean(np.minimum(p, 100.0))) if np.isinf(p).any() else float(p.mean()),
        "psnr_max": float(p.max()),
        "psnr_per_image": [float(v) for v in p],
        "ssim": float(s.mean()),
        "ssim_per_image": [float(v) for v in s],
        "cw_ssim": float(cw.mean()),
        "cw_ssim_per_image": [float(v) for v in cw],
        "success_rate": float((p >= SUCCESS_PSNR).mean()),
        "matching": [int(i) for i in order],
        "label_accuracy": label_accuracy(rec_labels, true_labels) if true_labels is not None else None,
    }
    lp = lpips(aligned, true_images)
    out["lpips"] = None if lp is None else float(lp.mean())
    return out
