"""Defenses: what a client's upload goes through before it travels, and what the server wraps.

A ``Defense`` (``defenses.base``) can wrap the server strategy (Flower's central-DP
wrappers), add settings to every training message, and report its privacy figures each
round. A new defense is one module plus one line in ``_DEFENSES``. So far: ``dp_user``,
Flower's user-level DP with fixed clipping; DP-SGD, clipping, pruning and noise arrive
with their own issue.
"""

from __future__ import annotations

from .base import Defense
from .dp_user import DpUserParams, FlowerUserDP

_DEFENSES: dict[str, type[Defense]] = {"dp_user": FlowerUserDP}


def build_defense(params, num_clients: int, sampled_per_round: int, seed: int) -> Defense:
    return _DEFENSES[params.name](params, num_clients, sampled_per_round, seed)


__all__ = ["Defense", "DpUserParams", "FlowerUserDP", "build_defense"]
