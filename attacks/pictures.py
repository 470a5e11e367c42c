"""Pictures of an attack's outcome: the true images above the matched reconstructions, one PNG;
and a bounded set of truth/reconstruction pairs with their PSNR (the best and the worst
reconstructed), as arrays a report lays out at a readable size.
Used by ``python -m attacks`` and by fedsim's privacy audit (``fedsim.audit``, ``fedsim.compare.report``)."""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

PAIRS_KEPT = 10  # pairs kept per attacked batch: the 5 best and the 5 worst reconstructed images


def save_grid(path: Path, truth: torch.Tensor | None, recon: torch.Tensor) -> None:
    """True images on the top row, matched reconstructions below (PNG, atomic); without the
    truth (a server that has none), the reconstructions alone."""
    from PIL import Image

    tile = max(64, recon.shape[-1])
    rows = []
    for batch in (recon,) if truth is None else (truth, recon):
        imgs = []
        for arr in to_uint8(batch):
            im = Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr).resize((tile, tile), Image.NEAREST)
            imgs.append(np.asarray(im.convert("RGB")))
        rows.append(np.concatenate(imgs, axis=1))
    grid = Image.fromarray(np.concatenate(rows, axis=0))
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".png")
    os.fchmod(fd, 0o644)
    os.close(fd)
    grid.save(tmp)
    os.replace(tmp, path)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """A batch (N, C, H, W) in [0, 1] as 8-bit pixels (N, H, W, C), as the pictures show it."""
    return (images.detach().cpu().clamp(0, 1).permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)


def best_and_worst(psnr: Sequence[float], limit: int = PAIRS_KEPT) -> tuple[list[int], list[int]]:
    """Which images to show when only ``limit`` fit: the indices of the best reconstructed (highest
    PSNR first) and of the worst (lowest first), disjoint, ceil(limit/2) best and the rest worst.
    With no more than ``limit`` images, all of them as best, best first. Ties keep batch order; a
    NaN counts as the worst."""
    score = [-math.inf if math.isnan(p) else p for p in psnr]
    order = sorted(range(len(score)), key=lambda i: -score[i])  # stable: equal scores in batch order
    if len(order) <= limit:
        return order, []
    return order[:(limit + 1) // 2], sorted(order, key=lambda i: score[i])[:limit // 2]


def save_pairs(path: Path, truth: torch.Tensor | None, recon: torch.Tensor, psnr: Sequence[float] | None,
               limit: int = PAIRS_KEPT) -> None:
    """The best and worst reconstructed images (``best_and_worst``) beside their truths, as an .npz
    (atomic): ``index`` (position in the batch; best first, then worst), ``best`` (how many of them
    are the best), ``psnr`` (dB, per pair), ``truth`` and ``reconstruction`` (uint8, N x H x W x C),
    ``images`` (the batch's size). ``recon`` is aligned with ``truth`` (``attacks.metrics.match``).
    Without the truth (a server that has none): the first ``limit`` reconstructions, unscored."""
    if truth is None:
        best, worst = list(range(min(limit, len(recon)))), []
    else:
        best, worst = best_and_worst(psnr, limit)
    index = np.asarray(best + worst, dtype=np.int64)
    arrays = {"index": index, "best": np.int64(len(best)), "images": np.int64(len(recon)),
              "reconstruction": to_uint8(recon[torch.as_tensor(index)])}
    if truth is not None:
        arrays.update(truth=to_uint8(truth[torch.as_tensor(index)]), psnr=np.asarray(psnr, dtype=np.float64)[index])
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:  # a file object: numpy adds no ".npz" to the name
            os.fchmod(f.fileno(), 0o644)
            np.savez_compressed(f, **arrays)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
