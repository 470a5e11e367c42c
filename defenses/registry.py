"""Every defense by the name a scenario's ``defense`` block gives it: one line each."""

from __future__ import annotations

from .base import Defense
from .clip import ClipDefense
from .dp_sgd import DpSgd
from .dp_user import FlowerUserDP
from .noise import NoiseDefense
from .prune import PruneDefense

DEFENSES: dict[str, type[Defense]] = {d.name: d for d in (FlowerUserDP, DpSgd, ClipDefense, PruneDefense,
                                                          NoiseDefense)}
