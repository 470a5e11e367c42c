"""Strategies by name. A new strategy is one module with a ``SPEC`` plus one line here; one of Flower's
own classes is one line in ``strategies.flower.FLOWER_CLASSES``."""

from __future__ import annotations

import importlib

from .base import StrategySpec

_MODULES = {
    "fedavg": "strategies.fedavg",
    "fedprox": "strategies.fedprox",
    "scaffold": "strategies.scaffold",
    "fedspeed": "strategies.fedspeed",
    "fedce": "strategies.fedce",
    "fedimpro": "strategies.fedimpro",
    "qfedavg": "strategies.qfedavg",
    "fedbuff": "strategies.fedbuff",
    "fedasync": "strategies.fedasync",
}
_EXTRA: dict[str, StrategySpec] = {}


def _flower_specs() -> dict[str, StrategySpec]:
    return importlib.import_module("strategies.flower").SPECS


def strategy_names() -> list[str]:
    return sorted({*_MODULES, *_flower_specs(), *_EXTRA})


def get_strategy(name: str) -> StrategySpec:
    if name in _EXTRA:
        return _EXTRA[name]
    if name in _MODULES:
        return importlib.import_module(_MODULES[name]).SPEC
    flower = _flower_specs()
    if name not in flower:
        raise KeyError(f"unknown strategy {name!r}; choose one of {', '.join(strategy_names())}")
    return flower[name]


def register_strategy(spec: StrategySpec) -> None:
    """Register a strategy at run time (plug-ins, tests)."""
    _EXTRA[spec.name] = spec
