"""fedsim: a federated-learning simulator with a gradient-privacy attack and defense suite.

From Python (``fedsim.api``): ``fedsim.run(scenario, overrides, out) -> Run``, ``fedsim.load_scenario``,
``fedsim.sweep``; re-exported lazily (module ``__getattr__``), so ``import fedsim`` imports nothing else.
"""

import importlib
from typing import Any

__version__ = "0.1.0"

# name -> the submodule that defines it. ``run`` is the package fedsim.run, callable as fedsim.api.run.
_EXPORTS = {"run": "run", "load_scenario": "api", "sweep": "api", "Run": "api", "SweepResult": "api"}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    loaded = importlib.import_module(f"{__name__}.{module}")
    return loaded if name == module else getattr(loaded, name)


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
