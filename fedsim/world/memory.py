"""Whether a run's data and model fit in memory, judged from the sizes before anything is allocated.

A size that cannot be allocated (an mlp width of 10^11, a synthetic set of 10^10 images, an
attack's image side of 10^5) otherwise ends deep inside loading or model building, in torch's
allocator ("can't allocate memory: you tried to allocate 25600000000000 bytes") or in the
kernel's OOM killer. The estimate is a lower bound, the float32 tensors a run holds at once
(the data set; the global model, a client's copy and its gradients), so a refusal is always
right; a run under it may still run short.

Leaf module: imports nothing else of fedsim but its leaf model zoo.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

FLOAT32 = 4
MODEL_COPIES = 3  # the global model, the training client's copy, its gradients


class MemoryRefused(ValueError):
    """The sizes need more memory than the machine has; one line naming the key."""


def available_bytes() -> int:
    """Memory this process may still take: the kernel's MemAvailable, or less under a cgroup
    (container) limit."""
    avail = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    if avail is None:
        import os

        avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit.isdigit():
            used = int(Path("/sys/fs/cgroup/memory.current").read_text().strip())
            avail = min(avail, int(limit) - used)
    except (OSError, ValueError):
        pass
    return max(int(avail), 0)


def model_parameters(name: str, channels: int, side: int, classes: int, hidden: tuple[int, ...] = (256,)) -> int:
    """The model's parameter count, without allocating it: arithmetic for the mlp (whose
    widths are free), a build on PyTorch's meta device (shapes only) for the others."""
    if name == "mlp":
        widths = [channels * side * side, *hidden, classes]
        return sum((a + 1) * b for a, b in zip(widths, widths[1:]))
    return _meta_parameters(name, channels, side, classes)


@lru_cache(maxsize=32)
def _meta_parameters(name: str, channels: int, side: int, classes: int) -> int:
    import torch

    from .models import build_model

    with torch.device("meta"):
        model = build_model(name, channels, side, classes)
    return sum(p.numel() for p in model.parameters())


def model_bytes(parameters: int) -> int:
    return parameters * FLOAT32 * MODEL_COPIES


def data_bytes(samples: int, channels: int, side: int) -> int:
    return samples * channels * side * side * FLOAT32


def check_fits(needs: list[tuple[str, int, str]]) -> None:
    """``needs``: (key, bytes, what) per part of a run. Raise MemoryRefused, naming the key of
    the largest part, when together they exceed the memory available."""
    total = sum(n for _, n, _ in needs)
    avail = available_bytes()
    if total <= avail:
        return
    key, nbytes, what = max(needs, key=lambda t: t[1])
    also = f" (with the rest, {_size(total)})" if total > 1.01 * nbytes else ""
    raise MemoryRefused(f"{key}: {what} needs at least {_size(nbytes)}{also}; {_size(avail)} of memory is available")


def _size(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if n < 1000:
            return f"{n:.3g} {unit}"
        n /= 1000
    return f"{n:.3g} PB"
