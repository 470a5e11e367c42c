"""``prune``: zero the smallest-magnitude entries of each tensor of a client's update.

Gradient compression/pruning as a defense, evaluated by Zhu, Liu, Han, "Deep Leakage from
Gradients", NeurIPS 2019 (section 5): in each tensor of the update ``weights - sent`` (or of the
audit's gradient answer), the ``round(ratio * numel)`` entries of smallest magnitude are set to
zero, ties broken by position so the count is exact.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from .base import ClientDefense, Defense, Tensors


class PruneParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: Literal["prune"] = "prune"
    ratio: float = Field(0.9, ge=0, lt=1, description="fraction of each tensor's entries zeroed (smallest |.|)")


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


class PruneClient(ClientDefense):
    def transform(self, update, generator, config):
        return prune(update, float(self.step["ratio"])), {}


class PruneDefense(Defense):
    name = "prune"
    Params = PruneParams
    Client = PruneClient
