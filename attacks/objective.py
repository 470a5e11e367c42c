"""Differentiable re-simulation of what the client computed, and the matching losses.

The server-side half of every optimisation attack here: given candidate images,
labels (hard or soft) and, for Dropout Inversion, candidate dropout masks, recompute
the client's gradient (DLG, Zhu et al., NeurIPS 2019) or its whole multi-step local
SGD update (the unrolled attack of Geiping et al., NeurIPS 2020, Sec. 5) with
``torch.func.functional_call``, so that the result stays differentiable with respect
to the candidates and the parameters can be any point (SME's surrogate, Zhu et al.,
ICML 2023). Losses: squared L2 (DLG), one global cosine over all layers plus total
variation (Inverting Gradients). Both take an optional ``support`` (the observation's: per
parameter, the bool mask of the coordinates that travelled): only those coordinates enter
the loss, norms included, so a top-k upload's unsent coordinates (decoded as 0, though the
client's update was not 0 there) are not matched. The attacks go through ``project`` and
``observed_target``, which also map an upload to a sketch's space when the observation has a
``wire`` (the server knows the sketch S, so it compares S u(x') with the y that travelled).

Dropout is modelled by substitution (Scheliga et al., AAAI 2023): the model runs in
eval mode, and a forward hook on each ``nn.Dropout`` multiplies its input by a given
mask / (1 - p). The victim case uses the same hook with Bernoulli(1 - p) masks, which
is exactly train-mode dropout with known masks.
"""

from __future__ import annotations

import contextlib
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call


def dropout_layers(model: nn.Module) -> list[tuple[str, nn.Dropout]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Dropout)]


def dropout_shapes(model: nn.Module, input_shape: Sequence[int]) -> list[tuple[int, ...]]:
    """Per-sample input shape of each dropout layer (one probe forward)."""
    shapes: list[tuple[int, ...]] = []
    hooks = [m.register_forward_hook(lambda mod, inp, out: shapes.append(tuple(inp[0].shape[1:])))
             for _, m in dropout_layers(model)]
    try:
        with torch.no_grad():
            was = model.training
            model.eval()
            model(torch.zeros(1, *input_shape))
            model.train(was)
    finally:
        for h in hooks:
            h.remove()
    return shapes


@contextlib.contextmanager
def substitute_dropout(model: nn.Module, masks: Sequence[torch.Tensor] | None):
    """Run ``model`` (in eval mode) with the given dropout masks, one per dropout layer.

    ``masks=None`` leaves dropout off (expected-value forward, what an attack that
    ignores dropout assumes).
    """
    layers = dropout_layers(model)
    if masks is None:
        yield
        return
    if len(masks) != len(layers):
        raise ValueError(f"{len(masks)} masks for {len(layers)} dropout layers")
    hooks = []
    for (_, module), mask in zip(layers, masks):
        keep = 1.0 - module.p

        def hook(mod, inp, out, mask=mask, keep=keep):
            return inp[0] * mask / keep

        hooks.append(module.register_forward_hook(hook))
    try:
        yield
    finally:
        for h in hooks:
            h.remove()


def soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of -sum(target * log_softmax); ``target`` int labels or rows."""
    if target.dtype in (torch.int64, torch.int32):
        return F.cross_entropy(logits, target)
    return torch.mean(torch.sum(-target * F.log_softmax(logits, dim=-1), dim=-1))


def batch_gradients(
    model: nn.Module,
    params: dict[str, torch.Tensor],
    x: torch.Tensor,
    target: torch.Tensor,
    *,
    masks: Sequence[torch.Tensor] | None = None,
    create_graph: bool = True,
) -> list[torch.Tensor]:
    """d(mean cross-entropy)/d(params) at ``params``, differentiable if ``create_graph``."""
    with substitute_dropout(model, masks):
        logits = functional_call(model, params, (x,))
    loss = soft_cross_entropy(logits, target)
    return list(torch.autograd.grad(loss, list(params.values()), create_graph=create_graph))


def local_sgd_update(
    model: nn.Module,
    params: dict[str, torch.Tensor],
    x: torch.Tensor,
    target: torch.Tensor,
    *,
    lr: float,
    steps: int | None = None,
    batch_size: int | None = None,
    schedule: Sequence[Sequence[int] | torch.Tensor] | None = None,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    masks_per_step: Sequence[Sequence[torch.Tensor] | None] | None = None,
    create_graph: bool = True,
) -> list[torch.Tensor]:
    """The client's update ``w_T - w_0`` after its local SGD steps (``attacks.observation``).

    Step t trains on ``x[schedule[t]]``; without a schedule, on the consecutive slice
    ``[t*b, (t+1)*b)`` modulo ``len(x)`` for ``steps`` steps of ``b = batch_size``.
    The step is ``torch.optim.SGD(lr, momentum, weight_decay)`` (dampening 0, no
    Nesterov): d = g + wd * w; buf = d on the first step, momentum * buf + d after;
    w -= lr * buf. ``masks_per_step[t]`` holds per-sample dropout masks (one tensor
    per dropout layer, first dimension ``len(x)``), indexed by step t's batch.
    """
    if schedule is None:
        if steps is None or batch_size is None:
            raise ValueError("local_sgd_update needs a schedule, or steps and batch_size")
        n = x.shape[0]
        schedule = [torch.arange(t * batch_size, (t + 1) * batch_size) % n for t in range(steps)]
    elif steps is not None and len(schedule) != steps:
        raise ValueError(f"schedule has {len(schedule)} batches for {steps} steps")
    w = dict(params)
    buffers = None
    for t, idx in enumerate(schedule):
        idx = torch.as_tensor(idx, dtype=torch.int64)
        masks = None if masks_per_step is None else masks_per_step[t]
        if masks is not None:
            masks = [m[idx] for m in masks]
        direction = batch_gradients(model, w, x[idx], target[idx], masks=masks, create_graph=create_graph)
        # The branches skip exact no-ops, so that plain SGD stays the same arithmetic
        # (bit for bit) as before momentum and weight decay were modelled.
        if weight_decay:
            direction = [g + weight_decay * v for v, g in zip(w.values(), direction)]
        if momentum:
            if buffers is not None:
                direction = [momentum * b + d for b, d in zip(buffers, direction)]
            buffers = direction
        w = {k: v - lr * d for (k, v), d in zip(w.items(), direction)}
    return [w[k] - params[k] for k in params]


def leaf_parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    """Detached copies of the parameters that autograd can differentiate through."""
    return {n: p.detach().clone().requires_grad_(True) for n, p in model.named_parameters()}


def restrict(tensors: Sequence[torch.Tensor], support: Sequence[torch.Tensor] | None) -> list[torch.Tensor]:
    """Each tensor's coordinates inside its support (a flat tensor per parameter; differentiable);
    the tensors themselves when ``support`` is None."""
    if support is None:
        return list(tensors)
    return [t[m] for t, m in zip(tensors, support)]


def project(obs, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """An upload (simulated or observed, one tensor per parameter) as the attack compares it: mapped to
    the wire's space (``obs.wire_map``, a sketch), or restricted to ``obs.support``, or as it is."""
    if getattr(obs, "wire_map", None) is not None:
        return [obs.wire_map(torch.cat([t.reshape(-1) for t in tensors]))]
    return restrict(tensors, obs.support)


def observed_target(obs) -> list[torch.Tensor]:
    """What the attack matches ``project(obs, simulated)`` against: the wire itself when the observation
    has one, else the upload restricted to its support."""
    if getattr(obs, "wire", None) is not None:
        return [obs.wire]
    return restrict(obs.upload(), obs.support)


def squared_l2(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor],
               support: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
    """Summed squared L2 distance, over the ``support``'s coordinates only when one is given."""
    a, b = restrict(a, support), restrict(b, support)
    return sum(((x - y) ** 2).sum() for x, y in zip(a, b))


def cosine_distance(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor],
                    support: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
    """1 - cos over all layers at once (Inverting Gradients' global cosine), over the ``support``'s
    coordinates only when one is given."""
    a, b = restrict(a, support), restrict(b, support)
    dot = sum((x * y).sum() for x, y in zip(a, b))
    na = sum(x.pow(2).sum() for x in a).sqrt()
    nb = sum(y.pow(2).sum() for y in b).sqrt()
    return 1.0 - dot / (na * nb + 1e-12)


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """mean |dx| + mean |dy| (Inverting Gradients' TV prior)."""
    dx = (x[:, :, :, 1:] - x[:, :, :, :-1]).abs().mean()
    dy = (x[:, :, 1:, :] - x[:, :, :-1, :]).abs().mean()
    return dx + dy
