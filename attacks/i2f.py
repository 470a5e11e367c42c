"""Inversion Influence Function: how far a defense's perturbation moves the attack's reconstruction.

Zhang, Hong, Deng, Mahdavi, Zhou, "Understanding Deep Gradient Leakage via Inversion
Influence Functions", NeurIPS 2023 (I2F; code ``illidanlab/inversion-influence-function``).
A gradient-matching attack solves x*(g) = argmin_x |s(x) - g|^2, where s(x) is what the
client would upload for inputs x (a gradient, or here also a whole local-SGD update).
At the clean upload g0 = s(x0) the solution is the private batch x0; the defense sends
g0 + delta instead. By the implicit function theorem the solution moves to

    x*(g0 + delta) - x0 ~= (A^T A)^+ A^T delta,        A = ds/dx at x0  (d_upload x d_x),

the paper's I2F (their J is A^T). Its norm predicts the attack's reconstruction error
under the defense without running the attack; the paper's cheap lower bound
|A^T delta| / lambda_max(A^T A) ranks images backwards on LeNet (measured when the issue
was filed), so only the exact form is computed here.

Exact form, matrix-free: columns of A^T A are A^T (A e_i): one Jacobian-vector product
(double backward through s) and one vector-Jacobian product per input coordinate,
batched over chunks of coordinates (``torch.autograd.grad(..., is_grads_batched=True)``),
so the d_upload x d_x Jacobian is never stored. That is d_x products: cheap up to a few
thousand input values (``MAX_INPUTS``), which covers LeNet-size images. The normal
matrix is solved by its eigendecomposition in float64, dropping directions with
eigenvalue below ``rcond`` times the largest (directions the upload does not constrain:
the attack's priors decide there, not the perturbation).

The auditor knows x0 (it re-derives the client's batch to score), so it can compute the
clean upload s(x0) and delta = observed - s(x0); for an exact replay (FedAvg) delta is
exactly what the defense added. With an observation's ``support`` (top-k, DGC) s and the
upload keep only the coordinates that travelled, the attack's own objective: A is the
Jacobian of the sent coordinates, and the perturbation is what the codec did to those
(clipping, residuals from earlier rounds), not the zeros of the unsent ones; with a ``wire``
(a sketch) s is the sketched upload and the perturbation the sketch's noise.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import math

import torch

from .objective import batch_gradients, leaf_parameters, local_sgd_update, observed_target, project
from .observation import Observation

MAX_INPUTS = 4096
RCOND = 1e-7


def upload_function(obs: Observation, labels: torch.Tensor) -> Callable[[torch.Tensor], list[torch.Tensor]]:
    """x -> what the client would upload for inputs x (the attacks' own replay, differentiable)."""
    params = leaf_parameters(obs.model)
    if obs.threat == "gradient":
        return lambda x: project(obs, batch_gradients(obs.model, params, x, labels))
    return lambda x: project(obs, local_sgd_update(obs.model, params, x, labels, lr=obs.lr, steps=obs.local_steps,
                                                   batch_size=obs.local_batch_size, schedule=obs.schedule,
                                                   momentum=obs.momentum, weight_decay=obs.weight_decay))


def _flat(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def normal_matrix(upload: Callable, x0: torch.Tensor, chunk: int = 64) -> tuple[torch.Tensor, torch.Tensor, Callable]:
    """(A^T A, s(x0), v -> A^T v) for A = ds/dx at ``x0``, built from batched JVPs and VJPs."""
    x = x0.detach().clone().requires_grad_(True)
    s = _flat(upload(x))
    d = x.numel()
    # A^T v is linear in v; differentiating it in v gives A u (the double-backward JVP trick).
    v = torch.zeros_like(s, requires_grad=True)
    at_v = torch.autograd.grad(s, x, grad_outputs=v, create_graph=True)[0].reshape(-1)
    normal = torch.empty(d, d, dtype=torch.float64)
    eye = torch.eye(d)
    for start in range(0, d, chunk):
        basis = eye[start:start + chunk]
        a_u = torch.autograd.grad(at_v, v, grad_outputs=basis, retain_graph=True, is_grads_batched=True)[0]
        at_a_u = torch.autograd.grad(s, x, grad_outputs=a_u, retain_graph=True, is_grads_batched=True)[0]
        normal[:, start:start + chunk] = at_a_u.reshape(len(basis), d).T.to(torch.float64)

    def vjp(vec: torch.Tensor) -> torch.Tensor:
        return torch.autograd.grad(s, x, grad_outputs=vec, retain_graph=True)[0].reshape(-1)

    return (normal + normal.T) / 2, s.detach(), vjp


def reconstruction_shift(obs: Observation, x0: torch.Tensor, labels: torch.Tensor,
                         observed: Sequence[torch.Tensor] | None = None, *, rcond: float = RCOND) -> torch.Tensor:
    """I2F: the predicted move of the reconstruction away from ``x0`` (shape of ``x0``).

    ``observed``: the upload as it travelled (default: the observation's own; dense, the
    observation's support picks its coordinates); the perturbation is ``observed`` minus the
    clean upload recomputed at ``x0``."""
    if x0.numel() > MAX_INPUTS:
        raise ValueError(f"I2F is computed exactly for at most {MAX_INPUTS} input values, got {x0.numel()}")
    upload = upload_function(obs, labels)
    normal, clean, vjp = normal_matrix(upload, x0)
    delta = _flat(project(obs, observed) if observed is not None else observed_target(obs)) - clean
    rhs = vjp(delta).to(torch.float64)
    evals, evecs = torch.linalg.eigh(normal)
    keep = evals > rcond * evals.max().clamp_min(1e-300)
    coef = (evecs[:, keep].T @ rhs) / evals[keep]
    return (evecs[:, keep] @ coef).to(x0.dtype).reshape(x0.shape)


def predicted_psnr(obs: Observation, x0: torch.Tensor, labels: torch.Tensor,
                   observed: Sequence[torch.Tensor] | None = None) -> float | None:
    """Mean over the batch of each image's PSNR between x0 and x0 + I2F shift (clamped to the data
    range, as the attacks keep their images); None when the predicted shift is zero."""
    lo, hi = obs.data_range
    shift = reconstruction_shift(obs, x0, labels, observed)
    moved = (x0 + shift).clamp(lo, hi)
    mse = (moved - x0).pow(2).flatten(1).mean(1)
    if float(mse.max()) == 0.0:
        return None
    values = [10.0 * math.log10((hi - lo) ** 2 / float(m)) if m > 0 else float("inf") for m in mse]
    finite = [v for v in values if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else None
