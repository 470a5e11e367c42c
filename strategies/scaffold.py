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

from .base import ClientAlgorithm, ClientJob, ServerSettings, StrategySpec, UploadView, VectorRule, model_delta
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
        c = to_torch(job.content[SERVER_KEY], job.device)
        x = param_tensors(model)
        c_i = load_state(job.state, STATE_KEY, job.device) or {k: torch.zeros_like(v) for k, v in x.items()}
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


class ScaffoldVectorRule(VectorRule):
    """``ScaffoldClient`` on stacked clients: every step's gradient gains c - c_i; then c_i+ (option II:
    c_i - c + (x - y) / (K lr); option I: each client's full local gradient at x), kept in each client's
    ``Context.state``, Delta c_i uploaded."""

    params: ScaffoldParams

    def start(self, jobs, weights) -> None:
        self.c, self.c_i = [], []
        for job in jobs:
            c = to_torch(job.content[SERVER_KEY], job.device)
            self.c.append(c)
            self.c_i.append(load_state(job.state, STATE_KEY, job.device)
                            or {k: torch.zeros_like(w[0]) for k, w in weights.items()})
        self.x = {k: w.detach().clone() for k, w in weights.items()}
        self.correction = {k: torch.stack([c[k] - c_i[k] for c, c_i in zip(self.c, self.c_i)]) for k in weights}
        self.grad_x = stacked_full_gradient(jobs, self.x) if self.params.variant == "I" else None

    def before_step(self, grads, weights):
        return {k: g + self.correction[k] for k, g in grads.items()}

    def finish(self, jobs, weights, steps):
        out = []
        for i, job in enumerate(jobs):
            c, c_i, lr = self.c[i], self.c_i[i], job.settings.lr
            if self.grad_x is not None:
                c_new = {k: g[i] for k, g in self.grad_x.items()}
            else:
                c_new = {k: c_i[k] - c[k] + (self.x[k][i] - weights[k][i]) / (steps[i] * lr) for k in self.x}
            save_state(job.state, STATE_KEY, c_new)
            out.append({UPLOAD_KEY: to_record({k: c_new[k] - c_i[k] for k in self.x})})
        return out


def stacked_full_gradient(jobs, weights: dict[str, torch.Tensor], batch: int = 1024) -> dict[str, torch.Tensor]:
    """``full_gradient`` of every job at once: grad f_i at its stacked ``weights`` over its whole training set
    (``job.model`` the template the weights are put into; rows past a client's data weigh 0)."""
    from torch.func import functional_call, vmap

    model = jobs[0].model
    sizes = [job.data.num_examples for job in jobs]
    forward = vmap(lambda p, xx: functional_call(model, p, (xx,)))
    params = {k: w.detach().requires_grad_() for k, w in weights.items()}
    total = {k: torch.zeros_like(w) for k, w in weights.items()}
    x0 = jobs[0].data.x
    for s in range(0, max(sizes, default=0), batch):
        rows = min(batch, max(sizes) - s)
        x = x0.new_zeros((len(jobs), rows, *x0.shape[1:]))
        y = torch.zeros(len(jobs), rows, dtype=torch.long, device=x0.device)
        w = torch.zeros(len(jobs), rows, device=x0.device)
        for i, job in enumerate(jobs):
            part = slice(s, min(s + rows, sizes[i]))
            m = max(0, part.stop - part.start)
            x[i, :m], y[i, :m], w[i, :m] = job.data.x[part], job.data.y[part], 1.0 / max(sizes[i], 1)
        per_row = nn.functional.cross_entropy(forward(params, x).flatten(0, 1), y.flatten(), reduction="none")
        grads = torch.autograd.grad((per_row.view(len(jobs), rows) * w).sum(), [params[k] for k in params])
        for k, g in zip(params, grads):
            total[k] += g
    return total


def observe(sent, reply, params: ScaffoldParams) -> UploadView:
    return UploadView(model_delta(sent, reply), exact=False,
                      note="the replay leaves out the control-variate correction c - c_i of every step")

SPEC = StrategySpec(
    name="scaffold",
    params=ScaffoldParams,
    server=lambda params, settings: ScaffoldStrategy(params, settings),
    client=ScaffoldClient,
    observe=observe,
    vector_rule=ScaffoldVectorRule,
)
