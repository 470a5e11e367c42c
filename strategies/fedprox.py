"""FedProx: FedAvg whose clients add the proximal term (mu/2)||w - w_t||^2 to their loss.

Li et al., "Federated Optimization in Heterogeneous Networks", MLSys 2020. The server is
Flower's FedProx (it also writes Flower's own ``proximal-mu`` key); the client reads mu,
like every setting, from the strategy hyperparameters in the message config.
"""

from __future__ import annotations

import torch
from flwr.serverapp.strategy import FedProx as FlowerFedProx
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from .base import (ClientAlgorithm, ClientJob, SeededSampling, ServerSettings, StrategySpec, UploadView, VectorRule,
                   model_delta)
from .upload import Upload


class FedProxParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    mu: float = Field(0.01, ge=0, description="proximal weight")


class FedProxStrategy(FlowerFedProx, SeededSampling):
    """Flower FedProx; MRO puts fedsim's seeded sampling under Flower's mu injection."""

    def __init__(self, params: FedProxParams, settings: ServerSettings):
        SeededSampling.__init__(self, settings)
        self.proximal_mu = params.mu


class FedProxClient(ClientAlgorithm):
    def train(self, job: ClientJob) -> Upload:
        mu = self.params.mu
        trainer = job.trainer()
        if mu == 0.0:
            trainer.run()
            return job.upload(trainer)
        anchor = [p.detach().clone() for p in job.model.parameters()]

        def proximal(m: nn.Module) -> torch.Tensor:
            return 0.5 * mu * sum(((p - a) ** 2).sum() for p, a in zip(m.parameters(), anchor))

        trainer.run(extra_loss=proximal)
        return job.upload(trainer)


class FedProxVectorRule(VectorRule):
    """``FedProxClient`` on stacked clients: each client's objective gains (mu/2)||w - w_t||^2, w_t its sent
    weights (its reported loss does not)."""

    params: FedProxParams

    def start(self, jobs, weights) -> None:
        self.anchor = {k: w.detach().clone() for k, w in weights.items()}

    def extra_loss(self, weights):
        mu = self.params.mu
        if mu == 0.0:
            return None
        return 0.5 * mu * sum(((w - self.anchor[k]) ** 2).flatten(1).sum(1) for k, w in weights.items())


def observe(sent, reply, params: FedProxParams) -> UploadView:
    note = "" if params.mu == 0 else f"the replay leaves out the proximal term (mu={params.mu})"
    return UploadView(model_delta(sent, reply), exact=params.mu == 0, note=note)

SPEC = StrategySpec(
    name="fedprox",
    params=FedProxParams,
    server=lambda params, settings: FedProxStrategy(params, settings),
    client=FedProxClient,
    observe=observe,
    vector_rule=FedProxVectorRule,
)
