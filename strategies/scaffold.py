"""SCAFFOLD: local SGD corrected by control variates (the client-drift baseline).

Karimireddy, Kale, Mohri, Reddi, Stich, Suresh, "SCAFFOLD: Stochastic Controlled
Averaging for Federated Learning", ICML 2020, Algorithm 1.

Server state: the global control variate ``c`` (sent beside the model every round).
Client state: its own control variate ``c_i`` in ``Context.state`` (zero until the client
is first sampled; kept across rounds in which it is not).

Client i, from the global model x, K local steps:  y <- y - lr * (g_i(y) - c_i + c).
Then the new control variate, option II (the paper's default in its experiments)
    c_i+ = c_i - c + (x - y) / (K * lr)
or option I (``variant: "I"``): c_i+ = grad f_i(x), the full local gradient at x.
Upload y and Delta c_i = c_i+ - c_i (an ArrayRecord, so it counts in bytes_up).
Server:  x <- x + server_lr * mean_{i in S} (y_i - x);  c <- c + (1/N) sum_{i in S} Delta c_i.
So c = (1/N) sum over *all* N clients of c_i holds after every round.

``weighting: uniform`` is the paper's mean over participants; ``examples`` weights by
client data size as FedAvg does. Option II assumes plain SGD: with momentum the
(x - y)/(K lr) estimate is no longer the mean gradient.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from .base import ClientAlgorithm, ClientJob, ServerSettings, StrategySpec, UploadView, model_delta
from .stateful import (DeltaStrategy, NDArrays, Reply, examples_or_uniform, load_state, param_tensors, save_state,
                       to_record, to_torch, weighted_sum)
from .trainer import ClientData
from .upload import Upload

STATE_KEY = "scaffold.c_i"
SERVER_KEY = "scaffold.c"
UPLOAD_KEY = "scaffold.delta_c"


class ScaffoldParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    server_lr: float = Field(1.0, gt=0, description="global step size eta_g")
    variant: Literal["I", "II"] = Field("II", description="control-variate update option")
    weighting: Literal["uniform", "examples"] = Field("uniform", description="mean of participants' updates")


class ScaffoldStrategy(DeltaStrategy):
    def __init__(self, params: ScaffoldParams, settings: ServerSettings):
        super().__init__(settings)
        self.params = params
        self.c: NDArrays | None = None

    def prepare_round(self, server_round: int, global_arrays: NDArrays) -> None:
        if self.c is None:
            self.c = {k: np.zeros_like(v) for k, v in global_arrays.items() if np.issubdtype(v.dtype, np.floating)}

    def extra_records(self, server_round: int) -> dict[str, Any]:
        return {SERVER_KEY: to_record(self.c)}

    def aggregate(self, server_round: int, global_arrays: NDArrays, replies: list[Reply]) -> NDArrays:
        weights = examples_or_uniform(replies, self.params.weighting)
        mean_y = weighted_sum([r.arrays for r in replies], weights)
        eta = self.params.server_lr
        new = {k: (x + eta * (mean_y[k].astype(np.float64) - x)).astype(x.dtype) for k, x in global_arrays.items()}
        n = self.settings.num_clients
        for r in replies:
            for k, dc in r.records[UPLOAD_KEY].items():
                self.c[k] = (self.c[k] + dc.numpy() / n).astype(self.c[k].dtype)
        return new


def full_gradient(model: nn.Module, data: ClientData, batch: int = 1024) -> dict[str, torch.Tensor]:
    """grad f_i at the current weights over the client's whole training set."""
    model.zero_grad(set_to_none=True)
    n = data.num_examples
    for s in range(0, n, batch):
        loss = nn.functional.cross_entropy(model(data.x[s : s + batch]), data.y[s : s + batch], reduction="sum") / n
        loss.backward()
    grads = {name: (p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p))
             for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return grads


class ScaffoldClient(ClientAlgorithm):
    params: ScaffoldParams

    def train(self, job: ClientJob) -> Upload:
        model, data = job.model, job.data
        c = to_torch(job.content[SERVER_KEY])
        x = param_tensors(model)
        c_i = load_state(job.state, STATE_KEY) or {k: torch.zeros_like(v) for k, v in x.items()}
        correction = {k: c[k] - c_i[k] for k in x}
        if self.params.variant == "I":
            model.train()
            grad_x = full_gradient(model, data)

        def before_step(m: nn.Module) -> None:
            for name, p in m.named_parameters():
                if p.grad is not None:
                    p.grad.add_(correction[name])

        trainer = job.trainer()
        trainer.run(before_step=before_step)
        y = param_tensors(model)
        if self.params.variant == "I":
            c_new = grad_x
        else:
            c_new = {k: c_i[k] - c[k] + (x[k] - y[k]) / (trainer.steps * job.settings.lr) for k in x}
        save_state(job.state, STATE_KEY, c_new)
        return job.upload(trainer, extras={UPLOAD_KEY: to_record({k: c_new[k] - c_i[k] for k in x})})


def observe(sent, reply, params: ScaffoldParams) -> UploadView:
    return UploadView(model_delta(sent, reply), exact=False,
                      note="the replay leaves out the control-variate correction c - c_i of every step")

SPEC = StrategySpec(
    name="scaffold",
    params=ScaffoldParams,
    server=lambda params, settings: ScaffoldStrategy(params, settings),
    client=ScaffoldClient,
    observe=observe,
)
