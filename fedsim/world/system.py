"""The system model: every client's device (compute speed and link), for the virtual clock.

A device takes ``step_s`` seconds per local optimiser step and has a link of ``latency_s`` (one
way) and ``down_mbps``/``up_mbps`` megabits per second. The virtual round trip of one client call
(FedScale's and FLGo's model of system heterogeneity, on the bytes that really travelled):

    round_trip = (latency_s + 8 * bytes_down / (down_mbps * 1e6))      download what it was sent
               + step_s * local_steps                                     its local work
               + (latency_s + 8 * bytes_up / (up_mbps * 1e6))             upload what it sent (encoded)

Devices are drawn per client from the scenario's named distributions (``system.step_s`` ...), on
their own stream of the scenario seed, or read from a CSV trace (one device a row; client ``i``
gets row ``i mod rows``, as FedScale maps clients onto its device traces). ``correlate: label``
then hands the slowest devices (by ``step_s``) to the clients holding the largest share of
``slow_classes``, so slowness and data are intertwined; the devices drawn stay the same, only who
holds which changes.

A leaf: imports nothing of fedsim (the scenario's ``system`` section is read by attribute).
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

SYSTEM_STREAM = 11  # the system model's stream of the scenario seed (fedsim.world.build lists the others)
FIELDS = ("step_s", "latency_s", "down_mbps", "up_mbps")


class SystemModelError(ValueError):
    """A trace or setting the system model cannot use; the message starts with the key it concerns."""


@dataclass(frozen=True)
class Device:
    step_s: float     # seconds per local step
    latency_s: float  # one-way link latency
    down_mbps: float  # downlink bandwidth, Mbit/s
    up_mbps: float    # uplink bandwidth, Mbit/s

    def download_s(self, nbytes: int) -> float:
        return self.latency_s + 8.0 * nbytes / (self.down_mbps * 1e6)

    def upload_s(self, nbytes: int) -> float:
        return self.latency_s + 8.0 * nbytes / (self.up_mbps * 1e6)

    def round_trip_s(self, bytes_down: int, local_steps: float, bytes_up: int) -> float:
        return self.download_s(bytes_down) + self.step_s * local_steps + self.upload_s(bytes_up)


def draw(dist: Any, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` values of one named distribution (a scenario ``DistributionConfig``)."""
    if dist.dist == "constant":
        return np.full(n, float(dist.value))
    if dist.dist == "uniform":
        return rng.uniform(dist.low, dist.high, n)
    return dist.median * np.exp(dist.sigma * rng.standard_normal(n))  # lognormal: the median is exp(mu)


def read_trace(path: str | Path) -> list[Device]:
    """The devices of a CSV trace (a header naming step_s, latency_s, down_mbps, up_mbps; other columns
    are ignored); SystemModelError naming ``system.trace`` for anything unusable."""
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise SystemModelError(f"trace: cannot read {path} ({getattr(exc, 'strerror', None) or exc})") from None
    if not rows:
        raise SystemModelError(f"trace: {path} holds no devices (a header and one row per device)")
    missing = [f for f in FIELDS if f not in rows[0]]
    if missing:
        raise SystemModelError(f"trace: {path} lacks the column(s) {', '.join(missing)} (needs {', '.join(FIELDS)})")
    devices = []
    for line, row in enumerate(rows, start=2):
        try:
            values = [float(row[f]) for f in FIELDS]
        except (TypeError, ValueError):
            raise SystemModelError(f"trace: {path} line {line}: every field must be a number") from None
        if not all(math.isfinite(v) and v > 0 for v in values):  # a zero bandwidth never delivers
            raise SystemModelError(f"trace: {path} line {line}: every field must be a finite number > 0")
        devices.append(Device(*values))
    return devices


def slow_share(label_counts: np.ndarray, slow_classes: list[int]) -> np.ndarray:
    """Per client, the fraction of its samples in ``slow_classes`` (``label_counts``: clients x classes)."""
    totals = label_counts.sum(axis=1)
    return label_counts[:, slow_classes].sum(axis=1) / np.maximum(totals, 1)


def correlate_with_labels(devices: list[Device], share: np.ndarray) -> list[Device]:
    """The same devices, the k-th slowest (by step_s) to the client with the k-th largest ``share``
    (ties: the lower partition id first, the faster device first: a stable order)."""
    by_speed = sorted(range(len(devices)), key=lambda i: -devices[i].step_s)  # slowest first, stable
    by_share = sorted(range(len(share)), key=lambda i: -share[i])
    out: list[Device | None] = [None] * len(devices)
    for client, device in zip(by_share, by_speed):
        out[client] = devices[device]
    return out  # type: ignore[return-value]


@dataclass(frozen=True)
class SystemModel:
    """Every client's device, by partition id."""

    devices: tuple[Device, ...]

    def __getitem__(self, partition_id: int) -> Device:
        return self.devices[partition_id]

    @classmethod
    def build(cls, config: Any, num_clients: int, seed: int, label_counts: np.ndarray | None = None) -> "SystemModel":
        """From a scenario's ``system`` section; ``label_counts`` (clients x classes) for ``correlate: label``."""
        if config.trace is not None:
            rows = read_trace(config.trace)
            devices = [rows[i % len(rows)] for i in range(num_clients)]
        else:
            rng = np.random.default_rng([seed, SYSTEM_STREAM])
            columns = [draw(getattr(config, f), num_clients, rng) for f in FIELDS]  # in FIELDS order: seeded
            devices = [Device(*map(float, values)) for values in zip(*columns)]
        if config.correlate == "label":
            if label_counts is None:
                raise SystemModelError("correlate: label needs the partition's label counts")
            devices = correlate_with_labels(devices, slow_share(label_counts, list(config.slow_classes)))
        return cls(tuple(devices))
