"""Reconstruction quality: PSNR, SSIM, label accuracy, optional LPIPS.

Conventions follow the evaluation of Inverting Gradients (Geiping et al., NeurIPS 2020)
and breaching's ``analysis/metrics.py``:
- images are compared in [0, 1] (clamped);
- a batch of reconstructions is first matched to the true batch by a Hungarian
  assignment (``scipy.optimize.linear_sum_assignment``) on pairwise MSE, because an
  attack cannot know the order of the client's samples;
- PSNR per image = 10 log10(1 / MSE) (inf for identical images); report mean and max;
- SSIM (Wang et al., IEEE TIP 2004) via ``skimage.metrics.structural_similarity`` with
  ``gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1.0``.
  The Gaussian window is 11x11 (radius 3.5 sigma); for images smaller than that the
  window is cut to the largest odd size that fits (7 for 8x8 images), per image side;
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
    """Per-image PSNR (dB) of aligned batches in [0, 1]."""
    mse = ((_np(rec) - _np(true)) ** 2).reshape(len(true), -1).mean(-1)
    with np.errstate(divide="ignore"):
        return 10.0 * np.log10(1.0 / mse)


def ssim_window(height: int, width: int, sigma: float = 1.5) -> int:
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
    """Match, then score a batch. PSNR of identical images is reported as inf."""
    order = match(rec_images, true_images)
    aligned = rec_images[torch.as_tensor(order)]
    p, s = psnr(aligned, true_images), ssim(aligned, true_images)
    out = {
        "psnr": float(np.mean(np.minimum(p, 100.0))) if np.isinf(p).any() else float(p.mean()),
        "psnr_max": float(p.max()),
        "psnr_per_image": [float(v) for v in p],
        "ssim": float(s.mean()),
        "ssim_per_image": [float(v) for v in s],
        "success_rate": float((p >= SUCCESS_PSNR).mean()),
        "matching": [int(i) for i in order],
        "label_accuracy": label_accuracy(rec_labels, true_labels) if true_labels is not None else None,
    }
    lp = lpips(aligned, true_images)
    out["lpips"] = None if lp is None else float(lp.mean())
    return out
