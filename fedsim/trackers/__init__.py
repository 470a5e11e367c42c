"""Experiment trackers: observers of the round record that report a run to MLflow or TensorBoard.

A tracker is one module plus one line in ``TRACKERS`` (name -> module, class, the package it needs and the
extra that installs it). A scenario asks for trackers with ``output.trackers: [mlflow, tensorboard]``; the
module is imported only then (``build``), so a tracker's optional package matters only to the runs that ask
for it, and ``check_installed`` turns a missing one into one line naming the extra, before anything is
written.

Trackers run on the server only: a ClientApp never imports them (a deployed client need not have MLflow).
This module is a leaf (the scenario schema reads ``TRACKERS``); what uses the registry is re-exported from
``fedsim.trackers.build`` lazily (module ``__getattr__``).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class TrackerEntry:
    module: str    # the module that defines it
    cls: str       # its class there (a ``fedsim.trackers.base.Tracker``)
    package: str   # the import name of the optional package it needs
    extra: str     # fedsim's extra that installs that package


TRACKERS: dict[str, TrackerEntry] = {
    "mlflow": TrackerEntry("fedsim.trackers.mlflow", "MLflowTracker", "mlflow", "mlflow"),
    "tensorboard": TrackerEntry("fedsim.trackers.tensorboard", "TensorBoardTracker", "tensorboard", "tensorboard"),
}

# name -> the submodule that defines it
_EXPORTS = {name: "build" for name in ("check_installed", "build_trackers", "open_sweep", "close_sweep")}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value
