"""Pictures of an attack's outcome: the true images above the matched reconstructions, one PNG.
Used by ``python -m attacks`` and by fedsim's privacy audit (``fedsim.audit``)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import torch


def save_grid(path: Path, truth: torch.Tensor | None, recon: torch.Tensor) -> None:
    """True images on the top row, matched reconstructions below (PNG, atomic); without the
    truth (a server that has none), the reconstructions alone."""
    from PIL import Image

    tile = max(64, recon.shape[-1])
    rows = []
    for batch in (recon,) if truth is None else (truth, recon):
        imgs = []
        for img in batch.clamp(0, 1):
            arr = (img.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
            if arr.shape[2] == 1:
                arr = arr[:, :, 0]
            im = Image.fromarray(arr).resize((tile, tile), Image.NEAREST).convert("RGB")
            imgs.append(np.asarray(im))
        rows.append(np.concatenate(imgs, axis=1))
    grid = Image.fromarray(np.concatenate(rows, axis=0))
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".png")
    os.fchmod(fd, 0o644)
    os.close(fd)
    grid.save(tmp)
    os.replace(tmp, path)
