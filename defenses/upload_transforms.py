"""``clip``, ``prune``, ``noise``: what a client does to its update after training, before it travels.

The gradient-leakage defenses evaluated by Zhu, Liu, Han, "Deep Leakage from Gradients",
NeurIPS 2019 (section 5: Gaussian and Laplacian noise of a stated variance, gradient
compression/pruning of the smallest-magnitude entries), plus norm clipping of the whole
update (the clipping half of DP-FedAvg, McMahan et al. ICLR 2018, without its noise).

Each acts on the update ``weights - sent`` (or on the audit's gradient answer: the same
transforms, the same settings), over every floating-point entry:

- ``clip``: scale the update so its global L2 norm is at most ``max_norm``.
- ``prune``: in each tensor, zero the ``round(ratio * numel)`` entries of smallest magnitude
  (ties broken by position, so the count is exact).
- ``noise``: add i.i.d. Gaussian or Laplacian noise of variance ``variance`` (Laplace scale
  ``sqrt(variance / 2)``), drawn from a generator seeded by (scenario seed, stream 10, round,
  partition id[, audit]): one seed gives one run on every engine.

The client learns the list from the message config (``defenses.client``); it never reads
the scenario. Extra records a strategy uploads (SCAFFOLD's control-variate delta) are not
transformed: they are not the update an attacker inverts.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

UPLOAD_NOISE_STREAM = 10  # of the scenario seed (fedsim/world.py lists the others)


class ClipParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: Literal["clip"] = "clip"
    max_norm: float = Field(1.0, gt=0, description="L2 bound on the whole update")


class PruneParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: Literal["prune"] = "prune"
    ratio: float = Field(0.9, ge=0, lt=1, description="fraction of each tensor's entries zeroed (smallest |.|)")


class NoiseParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: Literal["noise"] = "noise"
    variance: float = Field(1e-2, gt=0, description="variance of each added noise entry")
    distribution: Literal["gaussian", "laplace"] = "gaussian"


Tensors = dict[str, torch.Tensor]


def clip(update: Tensors, max_norm: float) -> tuple[Tensors, bool]:
    """The update scaled to global L2 norm <= ``max_norm``; whether it was scaled."""
    norm = math.sqrt(sum(float(v.double().pow(2).sum()) for v in update.values()))
    if norm <= max_norm:
        return update, False
    scale = max_norm / norm
    return {k: v * scale for k, v in update.items()}, True


def prune(update: Tensors, ratio: float) -> Tensors:
    """Each tensor with its ``round(ratio * numel)`` smallest-magnitude entries set to zero."""
    out = {}
    for k, v in update.items():
        drop = int(round(ratio * v.numel()))
        flat = v.reshape(-1).clone()
        if drop:
            # A stable sort: equal magnitudes are dropped in index order, so exactly `drop` go.
            order = torch.sort(flat.abs(), stable=True).indices
            flat[order[:drop]] = 0
        out[k] = flat.view_as(v)
    return out


def noise(update: Tensors, variance: float, distribution: str, generator: torch.Generator) -> Tensors:
    """The update plus i.i.d. noise of ``variance`` per entry (in name order, from ``generator``)."""
    out = {}
    for k in sorted(update):
        v = update[k]
        if distribution == "gaussian":
            z = torch.randn(v.shape, generator=generator, dtype=torch.float64) * math.sqrt(variance)
        else:  # Laplace(0, b) has variance 2 b^2; drawn by inversion from a seeded uniform
            u = torch.rand(v.shape, generator=generator, dtype=torch.float64) - 0.5
            z = -math.sqrt(variance / 2) * torch.sign(u) * torch.log1p(-2 * u.abs())
        out[k] = (v.double() + z).to(v.dtype)
    return out


def noise_generator(seed: int, server_round: int, partition_id: int, audit: bool = False) -> torch.Generator:
    import numpy as np

    key = [seed, UPLOAD_NOISE_STREAM, server_round, partition_id, *([1] if audit else [])]
    return torch.Generator().manual_seed(int(np.random.default_rng(key).integers(2**62)))
