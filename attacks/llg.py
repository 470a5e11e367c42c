"""LLG: label counts from the classifier's weight-gradient row sums (Wainakh et al.,
"User-Level Label Leakage from Gradients in Federated Learning", PoPETs 2022; reference
code ``tklab-tud/LLG``, ``Code/Predictor.py``: ``LLG_prediction``, ``LLGp_prediction``,
``LLGs_prediction``, read at commit 58f3aa2).

With mean cross-entropy over a batch of B and penultimate features h_n, row k of the last
layer's weight gradient sums to g_k = (1/B) sum_n (p_nk - y_nk) S_n, S_n = sum(h_n). Two
properties are used: (P1) with non-negative features only a class in the batch can make
g_k negative; (P2) every occurrence of class k adds about the same negative "impact" m,
on top of an "offset" s_k that the other samples' p_nk S_n contribute. The rule:

1. every class with g_k < 0 is predicted once (most negative first, at most B of them);
2. g <- g - s, then each prediction of k adds -m to g_k (g_k - m, with m < 0);
3. the remaining slots go, one at a time, to argmin g, each again followed by g_k - m.

The variants differ in how m and s are estimated:

- ``llg``: no data; m = (sum of the negative g_k / B) * (1 + 1/K), s = 0.
- ``llg+``: auxiliary data labelled like the victim's (here: any labelled images the
  server holds, e.g. a held-out split). ``repeats`` times, for every class i, a batch of
  B auxiliary samples all of class i (drawn with replacement, as the reference's
  ``get_batch``) goes through the model the server sent; m is the mean over classes and
  repeats of g_i / B on those batches, times (1 + 1/K); s_j is the mean of g_j over the
  batches of every other class i != j (so s_j is a whole-batch value, m per occurrence).
- ``llg*``: the same estimate with dummy inputs instead of data: ``dummy="zero"`` or
  ``"one"`` (constant images, as the reference's DUMMY-ZERO/DUMMY-ONE) or ``"uniform"``.
  Deviation, named: the reference's DUMMY-RANDOM calls ``Tensor.random_()``, which on a
  float tensor draws integers in [0, 2^24], far outside the [0, 1] images the model is
  trained on; ``uniform`` draws uniformly in the observation's data range instead.

The (1 + 1/K) factor and the per-class/per-repeat averaging are the reference's
empirical choices, kept as they are. The reference computes the estimation batches'
gradients with autograd over the whole model; only the last layer's weight row sums enter,
so this module computes exactly those in closed form, (1/B) sum_n (p_n - y_n) S_n, from one
forward pass (``aux_row_sums``; a test checks the closed form against autograd).

Multi-step updates: ``attacks.label_recovery`` turns an update into an average gradient,
which (when every sample is seen equally often) is the mean-loss gradient of all
``num_samples`` samples, so B = ``obs.batch_size`` is the per-occurrence scale for both
threats. The reference instead sums per-step gradients and divides m by the number of
local iterations; that layout does not arise here.

Depends on torch and ``attacks.observation`` only.
"""

from __future__ import annotations

import torch

from .base import seeded_generator
from .observation import Observation

LLG_VARIANTS = ("llg", "llg+", "llg*")
DUMMIES = ("zero", "one", "uniform")


def aux_row_sums(obs: Observation, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-sample last-layer weight-gradient row sums, (N, K): (p_n - onehot(y_n)) * S_n.

    The row sums of the mean-loss gradient of any batch are the mean of these rows over
    the batch (the model is the one the server sent, in eval mode: dropout off).
    """
    _, linear, _ = obs.last_linear()
    feats: list[torch.Tensor] = []
    hook = linear.register_forward_hook(lambda m, inp, out: feats.append(inp[0]))
    try:
        with torch.no_grad():
            logits = obs.model(x)
    finally:
        hook.remove()
    if logits.shape[-1] != obs.num_classes:
        raise ValueError(f"the model gives {logits.shape[-1]} logits, the observation has {obs.num_classes} classes")
    feature_sum = feats[0].flatten(1).sum(dim=1)
    err = torch.softmax(logits, dim=-1) - torch.nn.functional.one_hot(y, obs.num_classes).to(logits.dtype)
    return err * feature_sum.unsqueeze(1)


def _estimation_inputs(obs: Observation, variant: str, aux, dummy: str, repeats: int,
                       gen: torch.Generator) -> list[list[torch.Tensor]]:
    """``[repeat][class]`` -> per-sample row sums (B, K) of one all-that-class batch."""
    batch, k = obs.batch_size, obs.num_classes
    if variant == "llg+":
        if aux is None:
            raise ValueError("llg+ needs auxiliary data: aux=(images, labels)")
        x, y = (torch.as_tensor(t) for t in aux)
        if tuple(x.shape[1:]) != tuple(obs.input_shape) or y.dim() != 1 or len(y) != len(x):
            raise ValueError(f"aux must be images of shape (N, {', '.join(map(str, obs.input_shape))}) "
                             f"and N labels, got {tuple(x.shape)} and {tuple(y.shape)}")
        y = y.to(torch.int64)
        missing = [c for c in range(k) if not bool((y == c).any())]
        if missing:
            # the reference would fail the same way (no sample to draw); say which classes
            raise ValueError(f"llg+ needs auxiliary samples of every class; none of {missing}")
        rows = aux_row_sums(obs, x.to(torch.float32), y)
        pools = [torch.nonzero(y == c).flatten() for c in range(k)]
        return [[rows[pool[torch.randint(len(pool), (batch,), generator=gen)]] for pool in pools]
                for _ in range(repeats)]
    if dummy not in DUMMIES:
        raise ValueError(f"unknown dummy {dummy!r}; choose one of {', '.join(DUMMIES)}")
    out = []
    for _ in range(repeats):
        if dummy == "uniform":
            lo, hi = obs.data_range
            x = lo + (hi - lo) * torch.rand(k * batch, *obs.input_shape, generator=gen)
        else:
            x = torch.full((k * batch, *obs.input_shape), 0.0 if dummy == "zero" else 1.0)
        y = torch.arange(k).repeat_interleave(batch)
        rows = aux_row_sums(obs, x, y)
        out.append([rows[i * batch:(i + 1) * batch] for i in range(k)])
    return out


def impact_and_offset(obs: Observation, variant: str, *, aux=None, dummy: str = "zero", repeats: int = 10,
                      seed: int = 0) -> tuple[float, torch.Tensor]:
    """(m, s) of LLG+ / LLG* estimated on auxiliary or dummy batches (module docstring)."""
    if repeats < 1:
        raise ValueError("repeats must be >= 1")
    batch, k = obs.batch_size, obs.num_classes
    gen = seeded_generator(seed)
    impact = 0.0
    offset = torch.zeros(k, dtype=torch.float64)
    for per_class in _estimation_inputs(obs, variant, aux, dummy, repeats, gen):
        for i, rows in enumerate(per_class):
            g = rows.to(torch.float64).mean(0)  # row sums of this batch's mean-loss gradient
            impact += float(g[i])
            keep = torch.ones(k, dtype=torch.bool)
            keep[i] = False
            offset[keep] += g[keep]
    impact = impact / (k * batch * repeats) * (1 + 1 / k)
    return impact, (offset / (repeats * (k - 1))).to(torch.float32)


def llg_counts(obs: Observation, row_sums: torch.Tensor, *, variant: str = "llg+", aux=None,
               dummy: str | None = None, repeats: int = 10, seed: int = 0) -> torch.Tensor:
    """Label counts (int64, sum = batch size) from the last layer's weight-gradient row sums.

    ``aux`` only for llg+, ``dummy`` (default ``zero``) only for llg*: an option the variant
    does not read is an error rather than silently unused.
    """
    if variant not in LLG_VARIANTS:
        raise ValueError(f"unknown LLG variant {variant!r}; choose one of {', '.join(LLG_VARIANTS)}")
    if aux is not None and variant != "llg+":
        raise ValueError(f"{variant} uses no auxiliary data (that is llg+)")
    if dummy is not None and variant != "llg*":
        raise ValueError(f"{variant} uses no dummy inputs (that is llg*)")
    dummy = dummy or "zero"
    batch, k = obs.batch_size, obs.num_classes
    g = row_sums.detach().to(torch.float32).clone()
    negative = torch.nonzero(g < 0).flatten()
    if variant == "llg":
        impact = float(g[negative].sum()) / batch * (1 + 1 / k)
        offset = torch.zeros(k)
    else:
        impact, offset = impact_and_offset(obs, variant, aux=aux, dummy=dummy, repeats=repeats, seed=seed)
    g -= offset
    counts = torch.zeros(k, dtype=torch.int64)
    # (P1): the reference's LLG+ sorts these most-negative first and stops at B; the
    # same cap is applied to every variant so that the counts always sum to B.
    negative = negative[torch.argsort(row_sums[negative])][:batch]
    counts[negative] += 1
    g[negative] -= impact
    for _ in range(batch - len(negative)):
        c = int(torch.argmin(g))
        counts[c] += 1
        g[c] -= impact
    return counts
