"""FedAsync: asynchronous federated optimisation, one update a server step.

Xie, Koyejo, Gupta, "Asynchronous Federated Optimization", 2019 (arXiv:1903.03934), Algorithm 1.
The server keeps ``concurrency`` clients training (FedAvg's local SGD, from the global model of the
moment each was sent work); each completed client model ``x_i`` is mixed into the global as soon
as it arrives, with a weight that shrinks with its staleness ``t``:

    alpha_t = mixing * s(t)        x <- (1 - alpha_t) x + alpha_t x_i

(``s``: constant, polynomial or hinge, ``strategies.asynchronous``). Non-float entries of the
model (counters) are taken from the client's model as sent back.
"""

from __future__ import annotations

import torch
from flwr.app import ArrayRecord
from pydantic import Field

from .asynchronous import AsyncParams, AsyncStrategy, AsyncUpdate, check_async
from .base import StrategySpec, VectorRule
from .fedavg import FedAvgClient
from .records import to_record, to_torch


class FedAsyncParams(AsyncParams):
    mixing: float = Field(0.6, gt=0, le=1, description="alpha, the mixing weight of a fresh update")


def mix(global_arrays: dict[str, torch.Tensor], client: dict[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
    """(1 - alpha) x + alpha x_i on float entries (in float64, back to each entry's dtype)."""
    return {k: ((1.0 - alpha) * v.double() + alpha * client[k].double()).to(v.dtype) if v.is_floating_point()
            else client[k] for k, v in global_arrays.items()}


class FedAsyncStrategy(AsyncStrategy):
    @property
    def buffer_size(self) -> int:
        return 1

    def aggregate_updates(self, server_step: int, arrays: ArrayRecord,
                          updates: list[AsyncUpdate]) -> tuple[ArrayRecord, dict[str, float]]:
        (update,) = updates
        alpha = self.params.mixing * self.staleness_weight(update.staleness)
        return to_record(mix(to_torch(arrays), to_torch(update.content["arrays"]), alpha)), {"alpha": alpha}


SPEC = StrategySpec(
    name="fedasync",
    params=FedAsyncParams,
    server=lambda params, settings: FedAsyncStrategy(settings, params),
    client=FedAvgClient,
    check=check_async,
    vector_rule=VectorRule,
)
