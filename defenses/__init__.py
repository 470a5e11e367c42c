"""Defenses: what a client's training and upload go through, and what the server wraps.

A ``Defense`` (``defenses.base``) is one module: its settings, its rules on the rest of the
scenario, its server half (Flower's DP strategy wrappers, message settings, round figures) and
its client half (an in-training hook, an update transform, a wrapper of the client call), plus
one line in ``defenses.registry``. The scenario's ``defense`` is one block or a list applied in
order:

- ``dp_user``: Flower's user-level DP with fixed or adaptive clipping (``defenses.dp_user``);
- ``dp_sgd``: sample-level DP-SGD by Opacus in local training (``defenses.dp_sgd``);
- ``clip``, ``prune``, ``noise``: transforms of the update after training, before the codec
  (``defenses.clip``, ``defenses.prune``, ``defenses.noise``).
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel

from .base import ClientDefense, Defense, DefenseSetting
from .client import DEFENSES_KEY
from .registry import DEFENSES


def defense_names() -> list[str]:
    return sorted(DEFENSES)


def defense_params(name: str) -> type[BaseModel]:
    return DEFENSES[name].Params


def build_defense(params: BaseModel, num_clients: int, sampled_per_round: int, seed: int, rounds: int = 1) -> Defense:
    return DEFENSES[params.name](params, DefenseSetting(num_clients, sampled_per_round, seed, rounds))


def build_defenses(blocks: list[BaseModel], num_clients: int, sampled_per_round: int, seed: int, rounds: int
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


__all__ = ["DEFENSES", "ClientDefense", "Defense", "DefenseSetting", "build_defense", "build_defenses",
           "defense_names", "defense_params"]
