"""FedProx: FedAvg whose clients add the proximal term (mu/2)||w - w_t||^2 to their loss.

Li et al., "Federated Optimization in Heterogeneous Networks", MLSys 2020. The server is
Flower's FedProx (it sends ``proximal-mu`` in the config); the client reads mu from the
message, so what the client does is what the server asked for.
"""

from __future__ import annotations

import torch
from flwr.app import RecordDict
from flwr.serverapp.strategy import FedProx as FlowerFedProx
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from .base import (ClientAlgorithm, ClientData, SeededSampling, ServerSettings, StrategySpec, TrainResult,
                   TrainSettings, local_sgd)


class FedProxParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    mu: float = Field(0.01, ge=0, description="proximal weight")


class FedProxStrategy(FlowerFedProx, SeededSampling):
    """Flower FedProx; MRO puts fedsim's seeded sampling under Flower's mu injection."""

    def __init__(self, params: FedProxParams, settings: ServerSettings):
        SeededSampling.__init__(self, settings)
        self.proximal_mu = params.mu


class FedProxClient(ClientAlgorithm):
    def train(self, model: nn.Module, data: ClientData, settings: TrainSettings,
              content: RecordDict, state: RecordDict) -> TrainResult:
        mu = float(content["config"]["proximal-mu"])
        if mu == 0.0:
            return TrainResult(local_sgd(model, data, settings))
        anchor = [p.detach().clone() for p in model.parameters()]

        def proximal(m: nn.Module) -> torch.Tensor:
            return 0.5 * mu * sum(((p - a) ** 2).sum() for p, a in zip(m.parameters(), anchor))

        return TrainResult(local_sgd(model, data, settings, extra_loss=proximal))


SPEC = StrategySpec(
    name="fedprox",
    params=FedProxParams,
    server=lambda params, settings: FedProxStrategy(params, settings),
    client=FedProxClient,
)
