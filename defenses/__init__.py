"""Defenses: what a client's training and upload go through, and what the server wraps.

A ``Defense`` (``defenses.base``) can wrap the server strategy (Flower's central-DP
wrappers), add settings to every training message, name a client-side step (carried in
the message config, applied by ``defenses.client``), and report its figures each round.
The scenario's ``defense`` is one block or a list applied in order:

- ``dp_user``: Flower's user-level DP with fixed clipping (``defenses.dp_user``);
- ``dp_sgd``: sample-level DP-SGD by Opacus in local training (``defenses.dp_sgd``);
- ``clip``, ``prune``, ``noise``: transforms of the update after training
  (``defenses.upload_transforms``).

A new defense is one module plus one line in ``PARAMS`` and ``_DEFENSES``.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
from pydantic import BaseModel

from .base import Defense
from .client import DEFENSES_KEY
from .dp_sgd import DpSgd, DpSgdParams
from .dp_user import DpUserParams, FlowerUserDP
from .upload_transforms import ClipParams, NoiseParams, PruneParams


class UploadTransform(Defense):
    """``clip``, ``prune``, ``noise``: client-side only; ``clip`` reports how many updates it scaled."""

    def __init__(self, params: BaseModel, num_clients: int, sampled_per_round: int, seed: int, rounds: int = 1):
        self.params = params
        self.clipped: list[float] = []

    def client_step(self) -> dict[str, Any]:
        return self.params.model_dump()

    def on_round(self, record) -> None:
        self.clipped = [float(n.reply["metrics"]["defense-update-clipped"]) for n in record.replies
                        if "defense-update-clipped" in n.reply.get("metrics", {})]

    def report(self) -> dict[str, Any]:
        return {"update_clip_fraction": float(np.mean(self.clipped))} if self.clipped else {}


PARAMS: dict[str, type[BaseModel]] = {"dp_user": DpUserParams, "dp_sgd": DpSgdParams, "clip": ClipParams,
                                      "prune": PruneParams, "noise": NoiseParams}
_DEFENSES: dict[str, type[Defense]] = {"dp_user": FlowerUserDP, "dp_sgd": DpSgd, "clip": UploadTransform,
                                       "prune": UploadTransform, "noise": UploadTransform}


def build_defense(params, num_clients: int, sampled_per_round: int, seed: int, rounds: int = 1) -> Defense:
    cls = _DEFENSES[params.name]
    if cls is FlowerUserDP:
        return cls(params, num_clients, sampled_per_round, seed)
    return cls(params, num_clients, sampled_per_round, seed, rounds)


def build_defenses(blocks: list, num_clients: int, sampled_per_round: int, seed: int, rounds: int
                   ) -> tuple[list[Defense], dict[str, Any]]:
    """The defenses of a scenario's ``defense`` list, and the settings they add to every training message
    (the client-side steps, in order, under ``defenses``)."""
    defenses = [build_defense(p, num_clients, sampled_per_round, seed, rounds) for p in blocks]
    config: dict[str, Any] = {}
    steps = [step for step in (d.client_step() for d in defenses) if step is not None]
    if steps:
        config[DEFENSES_KEY] = json.dumps(steps)
    for d in defenses:
        config.update(d.train_config())
    return defenses, config


__all__ = ["PARAMS", "ClipParams", "Defense", "DpSgdParams", "DpUserParams", "FlowerUserDP", "NoiseParams",
           "PruneParams", "build_defense", "build_defenses"]
