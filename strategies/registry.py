"""Strategies by name. A new strategy is one module with a ``SPEC`` plus one line here."""

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
}
_EXTRA: dict[str, StrategySpec] = {}


def strategy_names() -> list[str]:
    return sorted({*_MODULES, *_EXTRA})


def get_strategy(name: str) -> StrategySpec:
    if name in _EXTRA:
        return _EXTRA[name]
    if name not in _MODULES:
        raise KeyError(f"unknown strategy {name!r}; choose one of {', '.join(strategy_names())}")
    return importlib.import_module(_MODULES[name]).SPEC


def register_strategy(spec: StrategySpec) -> None:
    """Register a strategy at run time (plug-ins, tests)."""
    _EXTRA[spec.name] = spec
