"""``noise``: add i.i.d. Gaussian or Laplacian noise of a stated variance to a client's update.

The noise defense evaluated by Zhu, Liu, Han, "Deep Leakage from Gradients", NeurIPS 2019
(section 5), on the update ``weights - sent`` (or the audit's gradient answer) over every
floating-point entry, after training and before the codec. Laplace noise has scale
``sqrt(variance / 2)``. The noise is drawn from a generator seeded by (scenario seed, stream 10,
round, partition id[, audit]) (``defenses.base.transform_generator``): one seed gives one run on every
engine.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from .base import ClientDefense, Defense, Tensors


class NoiseParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: Literal["noise"] = "noise"
    variance: float = Field(1e-2, gt=0, description="variance of each added noise entry")
    distribution: Literal["gaussian", "laplace"] = "gaussian"


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
        # Drawn on the CPU generator (the same noise on every device), added where the update is.
        out[k] = (v.double() + z.to(v.device)).to(v.dtype)
    return out


class NoiseClient(ClientDefense):
    def transform(self, update, generator, config):
        return noise(update, float(self.step["variance"]), str(self.step["distribution"]), generator), {}


class NoiseDefense(Defense):
    name = "noise"
    Params = NoiseParams
    Client = NoiseClient
