"""Which torch device a run computes on: ``engine.device`` (and ``audit.device``, ``python -m attacks --device``).

Names: ``auto`` (cuda when torch sees a CUDA device, else mps when torch sees Apple's, else cpu), ``cpu``,
``cuda``, ``cuda:N``, ``mps``. A name is checked against what torch sees in the process that checks it
(``device_problem``), so a scenario asking for a GPU the machine lacks is refused before anything runs.
``auto`` is resolved where the tensors are made (``resolve_device``): a Ray actor given no GPU share sees
none (Ray hides them) and computes on the CPU while the driver uses its GPU.

Seeded draws stay on CPU generators everywhere (batch schedules, noise, codec randomness, attack starts)
and their results are moved: one seed gives the same batches and draws on every device. Results on a GPU
still differ from the CPU's by the float kernels (reduction order, TF32), so bit-identical runs hold per
device, not across devices.

Imports nothing else of fedsim (the scenario schema and the attacks use it).
"""

from __future__ import annotations

import os
import re

import torch

DEVICE_NAMES = "auto, cpu, cuda, cuda:N, mps"
_PATTERN = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def visible_devices() -> list[str]:
    """The devices torch sees in this process, by name: cpu, then cuda:0 ..., then mps."""
    cuda = [f"cuda:{i}" for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    return ["cpu", *cuda, *(["mps"] if _mps_available() else [])]


def device_problem(name: str) -> str | None:
    """Why ``name`` cannot be used here (one line, naming what torch sees), or None when it can."""
    if not isinstance(name, str) or not _PATTERN.fullmatch(name):
        return f"expected one of {DEVICE_NAMES}, got {name!r}"
    if name in ("auto", "cpu"):
        return None
    seen = visible_devices()
    if name == "mps" and "mps" in seen:
        return None
    if name.startswith("cuda"):
        index = int(name.partition(":")[2] or 0)
        if f"cuda:{index}" in seen:
            return None
    return f"{name} is not available: torch sees {', '.join(seen)}"


def resolve_device(name: str = "auto") -> torch.device:
    """The torch device ``name`` means in this process (``auto``: cuda, else mps, else cpu), with its index
    (``cuda`` is the current CUDA device): what a tensor moved there reports as its ``.device``, so that
    the two compare equal."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if _mps_available() else "cpu"
    problem = device_problem(name)
    if problem is not None:
        raise ValueError(problem)
    device = torch.device(name)
    if device.type != "cpu" and device.index is None:
        device = torch.device(device.type, torch.cuda.current_device() if device.type == "cuda" else 0)
    return device


def use_device(name: str = "auto") -> torch.device:
    """``resolve_device``, made to repeat itself: on CUDA, cuDNN's deterministic kernels without autotuning
    and torch's deterministic implementations where it has them (ops without one, such as CUDA's
    ``index_add_`` in the sketch codecs, warn instead of failing), so that one seed gives one result per
    device. Process-wide settings, made where a run starts computing on the device."""
    device = resolve_device(name)
    if device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS's deterministic workspace
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
        torch.use_deterministic_algorithms(True, warn_only=True)
    return device
