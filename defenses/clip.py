"""``clip``: scale a client's update so its global L2 norm is at most ``max_norm``.

The clipping half of DP-FedAvg (McMahan, Ramage, Talwar, Zhang, ICLR 2018) without its noise,
as a defense of its own: the update ``weights - sent`` (or the audit's gradient answer) over
every floating-point entry, after training and before the codec. Each round the run reports the
fraction of this round's updates that were scaled (``update_clip_fraction``).
"""

from __future__ import annotations

import math
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from .base import ClientDefense, Defense, Tensors

CLIPPED_METRIC = "defense-update-clipped"


class ClipParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: Literal["clip"] = "clip"
    max_norm: float = Field(1.0, gt=0, description="L2 bound on the whole update")


def clip(update: Tensors, max_norm: float) -> tuple[Tensors, bool]:
    """The update scaled to global L2 norm <= ``max_norm``; whether it was scaled."""
    norm = math.sqrt(sum(float(v.double().pow(2).sum()) for v in update.values()))
    if norm <= max_norm:
        return update, False
    scale = max_norm / norm
    return {k: v * scale for k, v in update.items()}, True


class ClipClient(ClientDefense):
    def transform(self, update, generator, config):
        update, clipped = clip(update, float(self.step["max_norm"]))
        return update, {CLIPPED_METRIC: float(clipped)}


class ClipDefense(Defense):
    name = "clip"
    Params = ClipParams
    Client = ClipClient

    def __init__(self, params, setting):
        super().__init__(params, setting)
        self.clipped: list[float] = []

    def on_round(self, record) -> None:
        self.clipped = [float(n.reply["metrics"][CLIPPED_METRIC]) for n in record.replies
                        if CLIPPED_METRIC in n.reply.get("metrics", {})]

    def report(self) -> dict[str, Any]:
        return {"update_clip_fraction": float(np.mean(self.clipped))} if self.clipped else {}

    def report_keys(self) -> tuple[str, ...]:
        return ("update_clip_fraction",)
