"""The local optimiser: torch.optim.SGD's own update rule, without the Optimizer object.

Why: constructing any ``torch.optim.Optimizer`` imports ``torch._dynamo`` (its methods are
wrapped in ``torch._disable_dynamo``, which imports it on first call) although nothing is
compiled. That import costs about 1.5 s of CPU, once in every process that trains: every
run of the inline engine, every Ray actor, every SuperNode. ``torch.optim.sgd.sgd`` is
the function ``SGD.step`` calls, and it is not wrapped outside ``torch.compile``; calling
it with the arguments ``SGD.step`` would pass gives the same update, bit for bit
(tests/test_local_optimizer.py), with the same choice of for-each kernels per device.

Momentum buffers live here as ``SGD.state[p]["momentum_buffer"]`` does, created on a
parameter's first step with a gradient.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch.optim.sgd import sgd


class LocalSGD:
    """``torch.optim.SGD(params, lr, momentum, weight_decay)`` for one client's local training."""

    def __init__(self, params: Iterable[torch.Tensor], lr: float, momentum: float = 0.0,
                 weight_decay: float = 0.0):
        if lr < 0 or momentum < 0 or weight_decay < 0:
            raise ValueError(f"SGD needs lr, momentum, weight_decay >= 0 (got {lr}, {momentum}, {weight_decay})")
        self.params = list(params)
        self.lr, self.momentum, self.weight_decay = lr, momentum, weight_decay
        self.momentum_buffers: list[torch.Tensor | None] = [None] * len(self.params)

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        live = [i for i, p in enumerate(self.params) if p.grad is not None]
        if not live:
            return
        params = [self.params[i] for i in live]
        buffers = [self.momentum_buffers[i] for i in live]
        sgd(params, [p.grad for p in params], buffers,
            has_sparse_grad=any(p.grad.is_sparse for p in params), foreach=None, fused=None,
            weight_decay=self.weight_decay, momentum=self.momentum, lr=self.lr, dampening=0.0,
            nesterov=False, maximize=False)
        if self.momentum != 0:  # sgd() fills the list with the (new) buffers
            for i, buf in zip(live, buffers):
                self.momentum_buffers[i] = buf
