"""Attack interface, result type and registry.

The split follows breaching (Geiping et al., NeurIPS 2020, code ``breaching/attacks``):
an attack is configured once (its hyper-parameters and a seed) and then maps an
:class:`~attacks.observation.Observation` to a :class:`Reconstruction`. A new attack is
one module with a class decorated by :func:`register`; nothing else changes.
"""

from __future__ import annotations

import contextlib
import functools
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from .observation import Observation

# callback(iteration, images) - lets a benchmark time progress without touching the attack.
Callback = Callable[[int, torch.Tensor], None]


@dataclass
class Reconstruction:
    images: torch.Tensor                # (B, C, H, W), clamped to the data range
    labels: torch.Tensor | None         # (B,) int64, or (B, K) soft labels, or None
    loss_trace: list[float] = field(default_factory=list)
    iterations: int = 0                 # optimiser steps run, over all restarts
    # "converged": the run ended because its objective stopped improving (attacks.stopping;
    # with restarts, every restart did); "budget": a cap ended it (iterations, time, restarts).
    stopped: str = "budget"
    wall_s: float = 0.0
    restarts: int = 0
    extras: dict = field(default_factory=dict)

    def hard_labels(self) -> torch.Tensor | None:
        if self.labels is None:
            return None
        return self.labels if self.labels.dim() == 1 else self.labels.argmax(dim=-1)


class Attack:
    """Base class: set hyper-parameters in ``__init__``, implement :meth:`_run`."""

    name = "attack"
    threats: tuple[str, ...] = ("gradient",)

    def __init__(self, *, seed: int = 0, callback: Callback | None = None):
        self.seed = int(seed)
        self.callback = callback

    def reconstruct(self, observation: Observation) -> Reconstruction:
        if observation.threat not in self.threats:
            raise ValueError(f"attack {self.name!r} handles threat(s) {', '.join(self.threats)}, "
                             f"not {observation.threat!r}")
        observation.validate()
        _warm_up()
        start = time.perf_counter()
        # The attack computes where the observation is (``Observation.to``): that device is the default of
        # every tensor it makes, and its random draws come from a generator there (on a GPU, another draw
        # of the same distributions than on the CPU; one seed gives the same run on one device).
        device = observation.device
        gen = seeded_generator(self.seed, device)
        # Double backward through sigmoid nets produces denormal floats that slow CPU
        # kernels by >10x (measured: 28 s vs 2 s for 300 IG iterations on 8x8 digits).
        flushed = torch.set_flush_denormal(True)
        try:
            with on_device(device):
                rec = self._run(observation, gen)
        finally:
            if flushed:
                torch.set_flush_denormal(False)
        rec.wall_s = time.perf_counter() - start
        lo, hi = observation.data_range
        rec.images = rec.images.detach().clamp(lo, hi).cpu()  # a Reconstruction is on the CPU, for scoring
        rec.labels = None if rec.labels is None else rec.labels.detach().cpu()
        return rec

    def _run(self, observation: Observation, gen: torch.Generator) -> Reconstruction:
        raise NotImplementedError

    def _notify(self, iteration: int, images: torch.Tensor) -> None:
        if self.callback is not None:
            self.callback(iteration, images.detach())


def on_device(device: torch.device):
    """``device`` as the default of new tensors while the attack runs. Not entered for the CPU, the default
    already: the context is a torch function mode, a Python call on every torch op of the attack."""
    return contextlib.nullcontext() if device.type == "cpu" else torch.device(device)


def seeded_generator(seed: int, device: torch.device | str | None = None) -> torch.Generator:
    """A generator seeded with ``seed`` on ``device`` (default: the default device, which ``reconstruct``
    sets to the observation's): factory calls there take only a generator of their own device."""
    return torch.Generator(device=device if device is not None else torch.get_default_device()).manual_seed(seed)


@functools.lru_cache(maxsize=1)
def _warm_up() -> None:
    """Build one optimizer before any timing starts.

    The first ``torch.optim`` optimizer built in a process imports torch's compiler
    stack (measured here: 11 s of a 12 s, 20-iteration IG run); keep that out of
    ``Reconstruction.wall_s``.
    """
    torch.optim.Adam([torch.zeros(1, requires_grad=True)])


ATTACKS: dict[str, type[Attack]] = {}


def register(name: str):
    def deco(cls: type[Attack]) -> type[Attack]:
        if name in ATTACKS:
            raise ValueError(f"attack {name!r} registered twice")
        cls.name = name
        ATTACKS[name] = cls
        return cls

    return deco


def check_config(name: str, config: dict) -> None:
    """ValueError (one line, naming the key) when a setting in ``config`` is not of the type the
    attack's constructor declares (a string where a number goes would otherwise fail mid-attack,
    as a comparison between str and float). Numbers are strict: a bool is no int, text no number."""
    import inspect
    import typing

    from pydantic import ConfigDict, TypeAdapter, ValidationError

    cls = ATTACKS[name]
    try:
        hints = typing.get_type_hints(cls.__init__)
    except Exception:  # noqa: BLE001 - an annotation that does not resolve: the constructor checks alone
        return
    params = inspect.signature(cls.__init__).parameters
    for key, value in config.items():
        hint = hints.get(key)
        if key not in params or hint is None:
            continue
        try:
            adapter = TypeAdapter(hint, config=ConfigDict(arbitrary_types_allowed=True))
        except Exception:  # noqa: BLE001 - a type pydantic cannot check (a callback): left to the constructor
            continue
        try:
            adapter.validate_python(value, strict=True)
        except ValidationError:
            want = getattr(hint, "__name__", None) or str(hint).replace("typing.", "")
            raise ValueError(f"{key}: expected {want}, got {type(value).__name__} {str(value)[:40]!r}") from None


def build_attack(name: str, **config) -> Attack:
    """Instantiate the attack registered as ``name`` with keyword hyper-parameters."""
    if name not in ATTACKS:
        raise ValueError(f"unknown attack {name!r}; choose one of {', '.join(sorted(ATTACKS))}")
    return ATTACKS[name](**config)
