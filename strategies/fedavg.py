"""FedAvg: local SGD on each client, server averages the models weighted by examples.

McMahan et al., "Communication-Efficient Learning of Deep Networks from Decentralized
Data", AISTATS 2017. The server side is Flower's FedAvg (``aggregate_arrayrecords``
weighted by ``num-examples``) with fedsim's seeded sampling.
"""

from __future__ import annotations

from flwr.app import RecordDict
from torch import nn

from .base import (ClientAlgorithm, ClientData, NoParams, SeededSampling, StrategySpec,
                   TrainResult, TrainSettings, local_sgd)


class FedAvgStrategy(SeededSampling):
    """Flower FedAvg plus seeded sampling and per-round training settings."""


class FedAvgClient(ClientAlgorithm):
    def train(self, model: nn.Module, data: ClientData, settings: TrainSettings,
              content: RecordDict, state: RecordDict) -> TrainResult:
        return TrainResult(local_sgd(model, data, settings))


SPEC = StrategySpec(
    name="fedavg",
    params=NoParams,
    server=lambda params, settings: FedAvgStrategy(settings),
    client=FedAvgClient,
)
