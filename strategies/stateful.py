"""Shared plumbing for strategies with client state and extra records (SCAFFOLD, FedSpeed, FedCE, FedImpro).

Client side: named tensors kept in Flower's ``Context.state`` (a ``RecordDict``) as
``ArrayRecord``s, so the state is plain Flower records that survive rounds in which the
client is not sampled and travel unchanged to whatever process hosts the node.

Server side: ``DeltaStrategy`` remembers the arrays it sent this round (Flower's
``aggregate_train`` does not receive them) and hands ``aggregate`` the valid replies,
sorted by node id, as ``Reply`` objects. Flower's own ``aggregate_arrayrecords`` would
average *every* ArrayRecord of a reply into the model, so strategies whose clients
upload extra ArrayRecords (control variates, feature statistics) aggregate themselves.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid

from .base import SeededSampling
from .records import to_numpy, to_record, to_torch

NDArrays = dict[str, np.ndarray]


# ----------------------------------------------------------------------------- records <-> tensors


def load_state(state: RecordDict, key: str, device: torch.device | None = None) -> dict[str, torch.Tensor] | None:
    """Named tensors stored under ``key`` in a client's ``Context.state`` (on ``device`` when given), or None."""
    rec = state.get(key)
    return to_torch(rec, device) if rec is not None else None


def save_state(state: RecordDict, key: str, tensors: dict[str, Any]) -> None:
    state[key] = to_record(tensors)


def param_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Detached copies of the trainable parameters, by name."""
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def flat(arrays: NDArrays, keys: Iterable[str]) -> np.ndarray:
    return np.concatenate([np.asarray(arrays[k], dtype=np.float64).ravel() for k in keys])


# ----------------------------------------------------------------------------- server side


@dataclass
class Reply:
    """One valid training reply, unpacked."""

    node_id: int
    arrays: NDArrays
    metrics: dict[str, float]
    records: RecordDict
    partition_id: int | None = None  # as the client's "fedsim" record states it

    @property
    def num_examples(self) -> float:
        return float(self.metrics.get("num-examples", 1.0))


def unpack(replies: Iterable[Message], arrays_key: str = "arrays") -> list[Reply]:
    ok = sorted((m for m in replies if not m.has_error()), key=lambda m: m.metadata.src_node_id)
    out = []
    for m in ok:
        metrics, fedsim = m.content.get("metrics"), m.content.get("fedsim")
        out.append(Reply(int(m.metadata.src_node_id), to_numpy(m.content[arrays_key]),
                         {k: float(v) for k, v in (metrics or {}).items()}, m.content,
                         int(fedsim["partition-id"]) if fedsim is not None else None))
    return out


def weighted_sum(arrays: list[NDArrays], weights: list[float]) -> NDArrays:
    """sum_i w_i * a_i per key, accumulated in float64, returned in each key's dtype."""
    out: NDArrays = {}
    for k, ref in arrays[0].items():
        acc = np.zeros(ref.shape, dtype=np.float64)
        for a, w in zip(arrays, weights):
            acc += float(w) * a[k].astype(np.float64)
        out[k] = acc.astype(ref.dtype)
    return out


def mean_metrics(replies: list[Reply]) -> MetricRecord:
    """Example-weighted mean of the metrics every reply has (as Flower's FedAvg does)."""
    keys = set.intersection(*(set(r.metrics) for r in replies)) - {"num-examples"}
    total = sum(r.num_examples for r in replies)
    out = {k: sum(r.metrics[k] * r.num_examples for r in replies) / total for k in sorted(keys)}
    out["num-examples"] = total
    return MetricRecord(out)


class DeltaStrategy(SeededSampling):
    """SeededSampling whose subclasses aggregate with their own rule.

    ``aggregate(server_round, global_arrays, replies)`` returns the new global arrays;
    ``self.current`` holds the arrays sent this round.
    """

    def __init__(self, settings, **kwargs: Any):
        super().__init__(settings, **kwargs)
        self.current: NDArrays | None = None

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self.current = to_numpy(arrays)
        self.prepare_round(server_round, self.current)
        return super().configure_train(server_round, arrays, config, grid)

    def prepare_round(self, server_round: int, global_arrays: NDArrays) -> None:
        """Hook before this round's messages are built (e.g. lazily size server state)."""

    def aggregate(self, server_round: int, global_arrays: NDArrays, replies: list[Reply]) -> NDArrays:
        raise NotImplementedError

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        valid = unpack(replies, self.arrayrecord_key)
        if not valid or self.current is None:
            return None, None
        new = self.aggregate(server_round, self.current, valid)
        return to_record(new), mean_metrics(valid)


def examples_or_uniform(replies: list[Reply], weighting: str) -> list[float]:
    if weighting == "examples":
        total = sum(r.num_examples for r in replies)
        return [r.num_examples / total for r in replies]
    return [1.0 / len(replies)] * len(replies)
