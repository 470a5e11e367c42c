"""FedBuff: buffered asynchronous aggregation.

Nguyen, Malik, Zhan, Yousefpour, Rabbat, Malek, Huba, "Federated Learning with Buffered
Asynchronous Aggregation", AISTATS 2022, Algorithm 1. The server keeps ``concurrency`` clients
training, each from the global model of the moment it was sent work (FedAvg's local SGD); every
completed update ``Delta_i`` (its model minus the model it was sent) goes into a buffer, scaled
by its staleness ``s(t_i)`` (default 1 / sqrt(1 + t_i)); when the buffer holds ``buffer`` updates
the server steps:

    x <- x + server_lr * sum_i w_i s(t_i) Delta_i / sum_i w_i

with ``w_i`` the client's example count (``weighted: true``, FedAvg's weights) or 1 (the paper's
plain mean over the buffer). With equal round trips, ``buffer`` = ``concurrency`` = the cohort and
``server_lr`` 1, every update has staleness 0 and a step is FedAvg's round.
"""

from __future__ import annotations

from flwr.app import ArrayRecord
from pydantic import Field

from .asynchronous import AsyncParams, AsyncStrategy, AsyncUpdate, apply_delta, check_async
from .base import StrategySpec, VectorRule
from .fedavg import FedAvgClient


class FedBuffParams(AsyncParams):
    buffer: int = Field(10, ge=1, description="updates per server step (K)")
    server_lr: float = Field(1.0, gt=0, description="the server step's learning rate")
    weighted: bool = Field(True, description="weight updates by example count (false: the paper's plain mean)")


class FedBuffStrategy(AsyncStrategy):
    @property
    def buffer_size(self) -> int:
        return self.params.buffer

    def aggregate_updates(self, server_step: int, arrays: ArrayRecord,
                          updates: list[AsyncUpdate]) -> tuple[ArrayRecord, dict[str, float]]:
        weights = [u.num_examples if self.params.weighted else 1.0 for u in updates]
        total = sum(weights)
        step: dict = {}
        for update, w in zip(updates, weights):
            scale = self.params.server_lr * w * self.staleness_weight(update.staleness) / total
            for k, d in update.delta().items():
                step[k] = step[k] + scale * d if k in step else scale * d
        return apply_delta(arrays, step), {}


SPEC = StrategySpec(
    name="fedbuff",
    params=FedBuffParams,
    server=lambda params, settings: FedBuffStrategy(settings, params),
    client=FedAvgClient,
    check=check_async,
    vector_rule=VectorRule,  # the clients run FedAvg's plain local SGD
)
