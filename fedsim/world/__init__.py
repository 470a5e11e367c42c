"""What a scenario resolves to in a process: data sets (``data``), client partitions (``partition``), the
model zoo (``models``), the memory estimate (``memory``) and the World built from them (``build``).

``data``, ``partition`` and ``models`` import nothing else of fedsim (``memory`` only ``models``): the
attacks import them. So this package stays light: the World's names are re-exported lazily (module
``__getattr__``), and ``import fedsim.world.models`` does not import the scenario schema.
"""

from __future__ import annotations

import importlib
from typing import Any

# name -> the submodule that defines it
_EXPORTS = {
    **{name: "build" for name in ("World", "build_world", "world_from_text", "checked_world", "check_memory",
                                  "adopt_world", "world_key", "dataset_for", "MODEL_STREAM", "SPLIT_STREAM")},
    "MemoryRefused": "memory",
    "DataError": "data", "ImageDataset": "data", "load_dataset": "data",
    "build_model": "models",
}

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
