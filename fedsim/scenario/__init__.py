"""The scenario: its schema (``schema``: sections, defaults, validation, ``--set`` overrides, loading) and
the strict YAML loader it reads files with (``strict_yaml``).

The schema's names are re-exported here lazily (module ``__getattr__``), so that importing
``fedsim.scenario.strict_yaml`` (as the attack CLI does) does not import the schema.
"""

from __future__ import annotations

import importlib
from typing import Any

# name -> the submodule that defines it
_EXPORTS = {name: "schema" for name in (
    "ScenarioError", "MESSAGE_MAX", "short", "PartitionConfig", "SyntheticConfig", "DataConfig", "ModelConfig",
    "StrategyConfig", "TrainConfig", "RayConfig", "EngineConfig", "OutputConfig", "AuditConfig", "Scenario",
    "parse_scenario", "apply_overrides", "MAX_FILE_BYTES", "load_raw", "load_scenario", "scenario_from_text")}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
