"""FedSpeed: prox-corrected local SAM steps with a dual correction per client.

Sun, Shen, Huang, Ding, Tao, "FedSpeed: Larger Local Interval, Less Communication
Round, and Higher Generalization Accuracy", ICLR 2023, Algorithm 1. Official code:
FL-Simulator, ``client/fedspeed.py``, ``optimizer/ESAM.py`` and ``server/FedSpeed.py``.

``lamb`` is the paper's 1/lambda. Write H_i = sum over the client's rounds of its deltas
(w_K - w_t); the client keeps h_i = -lamb * H_i (the paper's g_hat_i, in Context.state),
updated after each round by h_i <- h_i - lamb * (w_K - w_t).

Two modes, ``fidelity``:

``paper`` (default): the paper's Algorithm 1, with fedsim's clipping and weight decay.
  Client from the global w_t, K steps on minibatches:
    g1 = grad f_i(w);  w' = w + rho * g1 / (||g1|| + 1e-12);  g2 = grad f_i(w')   (same minibatch)
    g  = (1 - alpha) g1 + alpha g2              (official code: alpha = 1, pure SAM)
    d  = g - h_i + lamb * (w - w_t);  clip ||d|| at max_norm;  SGD step (lr, weight decay wd)
  Server, ``server_correction``:
  - ``participants`` (paper, default): each client uploads x_hat_i = w_K - h_i / lamb
    = w_K + H_i (the paper's x_K - lambda * g_hat_i); the server averages the x_hat_i.
  - ``all`` (the official server with the paper's client): clients upload w_K; the server
    keeps every client's H_i and sets  w_{t+1} = mean_S(w_K) + (1/N) sum_{all i} H_i.
  The correction (H_i: the sum of the client's deltas) does not depend on lamb and does
  not vanish as lamb -> 0. At lamb = 0 exactly, fedsim switches it off (the dual is off,
  no correction is uploaded or added: a fedsim convention, so that rho = lamb = 0 is
  FedAvg; it is not the limit lamb -> 0).

``reference``: the official code, step for step. Per minibatch:
    g_SAM = grad f_i(w + rho * g1 / (||g1|| + 1e-7))   (ESAM; alpha mixes g1 in as above)
    v = g_SAM + lamb * (H_i - w_t) = g_SAM - h_i - lamb * w_t;  clip ||v|| at max_norm;
    SGD step with weight decay (wd + lamb): w <- w - lr * (v_clipped + (wd + lamb) w).
  Without clipping this is the paper's step (v + lamb w = d); with clipping the two clip
  different vectors (the official one holds -lamb * w_t, about 8 in norm on ResNet-18
  against the threshold 10). Clients upload w_K; the server is ``all`` (above) with no
  switch-off at lamb = 0 (``server_correction`` must be left at ``all``).

Defaults are the official code's: rho 0.1, lamb 0.1, max_norm 10 (lr 0.1, decay 0.998,
weight decay 1e-3 are scenario ``train`` settings). ``alpha`` defaults to 1 (the code).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from .base import ClientAlgorithm, ClientJob, ServerSettings, StrategySpec, UploadView, VectorRule, model_delta
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
    fidelity: Literal["paper", "reference"] = Field(
        "paper", description="paper: Algorithm 1 (fedsim's clipping); reference: the official code step for step")

    @model_validator(mode="after")
    def _reference_server(self) -> "FedSpeedParams":
        if self.fidelity == "reference":
            if "server_correction" in self.model_fields_set and self.server_correction != "all":
                raise ValueError("fidelity 'reference' uses the official server (server_correction 'all')")
            self.server_correction = "all"
            if self.alpha != 1.0:  # fedsim's alpha mixes the first gradient into the step; ESAM's scales the
                # second loss: the reference client never mixes, so no alpha but 1 is the reference rule
                raise ValueError(f"fidelity 'reference' follows the official client, which takes the perturbed "
                                 f"gradient alone (alpha 1); got alpha {self.alpha}")
        return self


class FedSpeedStrategy(DeltaStrategy):
    def __init__(self, params: FedSpeedParams, settings: ServerSettings):
        super().__init__(settings)
        self.params = params
        self.delta_sum: NDArrays | None = None  # code mode: sum over all clients and rounds of deltas

    def aggregate(self, server_round: int, global_arrays: NDArrays, replies: list[Reply]) -> NDArrays:
        weights = examples_or_uniform(replies, self.params.weighting)
        mean = weighted_sum([r.arrays for r in replies], weights)
        p = self.params
        if p.server_correction == "participants" or (p.lamb == 0 and p.fidelity == "paper"):
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
        reference = p.fidelity == "reference"
        sam_eps = 1e-7 if reference else 1e-12  # ESAM's, fedsim's
        names = [n for n, _ in job.model.named_parameters()]
        trainer = job.trainer()
        params = trainer.params
        anchor = [q.detach().clone() for q in params]
        stored = load_state(job.state, STATE_KEY, job.device)
        h = [stored[n] for n in names] if stored is not None else [torch.zeros_like(a) for a in anchor]

        for xb, yb in trainer.batches():
            loss = nn.functional.cross_entropy(job.model(xb), yb)
            g1 = trainer.gradient(loss)
            g = g1
            if rho > 0 and alpha > 0:
                norm = torch.sqrt(sum((t * t).sum() for t in g1)) + sam_eps
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
                    if reference:  # lamb * (H_i - w_t); lamb * w is added after clipping
                        d = d - lamb * a
                    elif lamb:
                        d = d + lamb * (q - a)
                    q.grad = d
            if max_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, max_norm)
            if reference and lamb:
                with torch.no_grad():  # the official optimiser's weight decay is wd + lamb
                    for q in params:
                        q.grad.add_(q, alpha=lamb)
            trainer.apply(loss)

        with torch.no_grad():
            h_new = [hi - lamb * (q - a) for hi, q, a in zip(h, params, anchor)]
            save_state(job.state, STATE_KEY, dict(zip(names, h_new)))
            if p.server_correction == "participants" and lamb > 0:
                for q, hi in zip(params, h_new):  # x_hat = w_K - lambda * g_hat = w_K - h / lamb
                    q.sub_(hi / lamb)
        return job.upload(trainer)


class FedSpeedVectorRule(VectorRule):
    """``FedSpeedClient`` on stacked clients (``engine.name: vectorized``), both fidelity modes: per step
    each client's SAM pair of gradients (its own ascent direction, normalised by its own gradient norm),
    its dual h_i and prox correction, its own gradient-norm clip; then h_i updated in each client's
    ``Context.state`` and, under ``server_correction: participants``, x_hat uploaded."""

    params: FedSpeedParams

    def start(self, jobs, weights) -> None:
        self.anchor = {k: w.detach().clone() for k, w in weights.items()}
        stored = [load_state(job.state, STATE_KEY, job.device) for job in jobs]
        self.h = {k: torch.stack([s[k] if s is not None else torch.zeros_like(w[0]) for s in stored])
                  for k, w in weights.items()}

    def gradients(self, loss_of, weights):
        p = self.params
        params = {k: w.detach().requires_grad_() for k, w in weights.items()}
        loss = loss_of(params)
        g1 = dict(zip(params, torch.autograd.grad(loss.sum(), list(params.values()))))
        if p.rho == 0 or p.alpha == 0:
            return loss.detach(), g1
        sam_eps = 1e-7 if p.fidelity == "reference" else 1e-12  # ESAM's, fedsim's (FedSpeedClient)
        scale = p.rho / (_client_norms(g1) + sam_eps)
        perturbed = {k: (w.detach() + _per_client(scale, g1[k]) * g1[k]).requires_grad_() for k, w in weights.items()}
        g2 = torch.autograd.grad(loss_of(perturbed).sum(), list(perturbed.values()))
        return loss.detach(), {k: (1 - p.alpha) * g1[k] + p.alpha * b for k, b in zip(params, g2)}

    def before_step(self, grads, weights):
        p, reference = self.params, self.params.fidelity == "reference"
        d = {}
        for k, g in grads.items():
            d[k] = g - self.h[k]
            if reference:  # lamb * (H_i - w_t); lamb * w is added after clipping
                d[k] = d[k] - p.lamb * self.anchor[k]
            elif p.lamb:
                d[k] = d[k] + p.lamb * (weights[k] - self.anchor[k])
        if p.max_norm > 0:  # torch.nn.utils.clip_grad_norm_, each client over all its parameters
            coef = (p.max_norm / (_client_norms(d) + 1e-6)).clamp(max=1.0)
            d = {k: v * _per_client(coef, v) for k, v in d.items()}
        if reference and p.lamb:  # the official optimiser's weight decay is wd + lamb
            d = {k: v + p.lamb * weights[k] for k, v in d.items()}
        return d

    def finish(self, jobs, weights, steps):
        lamb = self.params.lamb
        h_new = {k: self.h[k] - lamb * (weights[k] - self.anchor[k]) for k in weights}
        for i, job in enumerate(jobs):
            save_state(job.state, STATE_KEY, {k: h[i] for k, h in h_new.items()})
        if self.params.server_correction == "participants" and lamb > 0:  # x_hat = w_K - h / lamb
            for k in list(weights):
                weights[k] = weights[k] - h_new[k] / lamb
        return [{} for _ in jobs]


def _client_norms(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """Each client's L2 norm over all its stacked tensors: [clients]."""
    return torch.sqrt(sum((t * t).flatten(1).sum(1) for t in tensors.values()))


def _per_client(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.view(-1, *([1] * (like.dim() - 1)))


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
    plain_local_step=False,  # SAM's two gradients a step / a loss on synthetic features
    vector_rule=FedSpeedVectorRule,
)
