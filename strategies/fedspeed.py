"""FedSpeed: prox-corrected local SAM steps with a dual correction per client.

Sun, Shen, Huang, Ding, Tao, "FedSpeed: Larger Local Interval, Less Communication
Round, and Higher Generalization Accuracy", ICLR 2023, Algorithm 1. Official code:
FL-Simulator, ``client/fedspeed.py`` and ``server/FedSpeed.py``.

Client i from the global w_t, K steps on minibatches (``lamb`` is the paper's 1/lambda):
    g1 = grad f_i(w);  w' = w + rho * g1 / ||g1||;  g2 = grad f_i(w')   (same minibatch)
    g  = (1 - alpha) g1 + alpha g2              (official code: alpha = 1, pure SAM)
    d  = g - h_i + lamb * (w - w_t);  clip ||d|| at max_norm;  SGD step (lr, weight decay)
then h_i <- h_i - lamb * (w_K - w_t)            (h_i is the paper's g_hat_i, in Context.state).

Server, ``server_correction``:
- ``participants`` (paper, default): each client uploads x_hat_i = w_K - h_i / lamb (the
  paper's x_K - lambda * g_hat_i) and the server averages the x_hat_i over participants.
- ``all`` (official code): clients upload w_K; the server keeps, for every client, the sum
  of its deltas and sets  w_{t+1} = mean_S(w_K) + (1/N) sum_{all i} sum_rounds (w_K - w_t).
Both corrections equal -(1/lamb) * mean(h_i) over their clients, so they vanish when
lamb = 0: then the dual is off (the paper's lambda = infinity) and, with rho = 0, FedSpeed
is FedAvg (with ``weighting: examples`` and ``max_norm: 0``, no clipping).

Defaults are the official code's: rho 0.1, lamb 0.1, max_norm 10 (lr 0.1, decay 0.998,
weight decay 1e-3 are scenario ``train`` settings). ``alpha`` defaults to 1 (the code).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from .base import ClientAlgorithm, ClientJob, ServerSettings, StrategySpec, UploadView, model_delta
from .stateful import DeltaStrategy, NDArrays, Reply, examples_or_uniform, load_state, save_state, weighted_sum
from .upload import Upload

STATE_KEY = "fedspeed.h"


class FedSpeedParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    rho: float = Field(0.1, ge=0, description="SAM perturbation radius")
    lamb: float = Field(0.1, ge=0, description="prox-correction weight (the paper's 1/lambda)")
    alpha: float = Field(1.0, ge=0, le=1, description="weight of the perturbed gradient; 1 = official code")
    max_norm: float = Field(10.0, ge=0, description="clip the step's gradient norm; 0 = no clipping")
    server_correction: Literal["participants", "all"] = Field(
        "participants", description="participants: paper (clients upload x_hat); all: official code")
    weighting: Literal["uniform", "examples"] = Field("uniform", description="mean over participants")


class FedSpeedStrategy(DeltaStrategy):
    def __init__(self, params: FedSpeedParams, settings: ServerSettings):
        super().__init__(settings)
        self.params = params
        self.delta_sum: NDArrays | None = None  # code mode: sum over all clients and rounds of deltas

    def aggregate(self, server_round: int, global_arrays: NDArrays, replies: list[Reply]) -> NDArrays:
        weights = examples_or_uniform(replies, self.params.weighting)
        mean = weighted_sum([r.arrays for r in replies], weights)
        if self.params.server_correction == "participants" or self.params.lamb == 0:
            return mean
        if self.delta_sum is None:
            self.delta_sum = {k: np.zeros(v.shape, np.float64) for k, v in global_arrays.items()}
        for r in replies:
            for k, x in global_arrays.items():
                self.delta_sum[k] += r.arrays[k].astype(np.float64) - x
        n = self.settings.num_clients
        return {k: (mean[k].astype(np.float64) + self.delta_sum[k] / n).astype(v.dtype) for k, v in mean.items()}


class FedSpeedClient(ClientAlgorithm):
    params: FedSpeedParams

    def train(self, job: ClientJob) -> Upload:
        p = self.params
        rho, lamb, alpha, max_norm = p.rho, p.lamb, p.alpha, p.max_norm
        names = [n for n, _ in job.model.named_parameters()]
        trainer = job.trainer()
        params = trainer.params
        anchor = [q.detach().clone() for q in params]
        stored = load_state(job.state, STATE_KEY)
        h = [stored[n] for n in names] if stored is not None else [torch.zeros_like(a) for a in anchor]

        for xb, yb in trainer.batches():
            loss = nn.functional.cross_entropy(job.model(xb), yb)
            g1 = trainer.gradient(loss)
            g = g1
            if rho > 0 and alpha > 0:
                norm = torch.sqrt(sum((t * t).sum() for t in g1)) + 1e-12
                eps = [rho * t / norm for t in g1]
                with torch.no_grad():
                    for q, e in zip(params, eps):
                        q.add_(e)
                g2 = trainer.gradient(nn.functional.cross_entropy(job.model(xb), yb))
                with torch.no_grad():
                    for q, e in zip(params, eps):
                        q.sub_(e)
                g = [(1 - alpha) * a + alpha * b for a, b in zip(g1, g2)]
            with torch.no_grad():
                for q, gi, hi, a in zip(params, g, h, anchor):
                    d = gi - hi
                    if lamb:
                        d = d + lamb * (q - a)
                    q.grad = d
            if max_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, max_norm)
            trainer.apply(loss)

        with torch.no_grad():
            h_new = [hi - lamb * (q - a) for hi, q, a in zip(h, params, anchor)]
            save_state(job.state, STATE_KEY, dict(zip(names, h_new)))
            if p.server_correction == "participants" and lamb > 0:
                for q, hi in zip(params, h_new):  # x_hat = w_K - lambda * g_hat = w_K - h / lamb
                    q.sub_(hi / lamb)
        return job.upload(trainer)


def observe(sent, reply, params: FedSpeedParams) -> UploadView:
    what = "x_hat = w_K - h_i / lamb" if params.server_correction == "participants" and params.lamb > 0 else "w_K"
    return UploadView(model_delta(sent, reply), exact=False,
                      note=f"the upload is {what} after SAM steps with a prox correction; the replay is plain SGD")

SPEC = StrategySpec(
    name="fedspeed",
    params=FedSpeedParams,
    server=lambda params, settings: FedSpeedStrategy(params, settings),
    client=FedSpeedClient,
    observe=observe,
)
