"""``dgc``: Deep Gradient Compression (Lin, Han, Mao, Wang, Dally, ICLR 2018).

Reference: synxlin/deep-gradient-compression (``dgc/compression.py``: warm-up, sampled
threshold and its adaptation; ``dgc/memory.py``: momentum correction and factor masking).
Here the "gradient" of one step is the client's round update ``g = weights - sent``, and the
per-client memory lives in ``Context.state`` (record ``codec-dgc``: ``u`` momentum, kept only
when ``momentum`` > 0, and ``v`` accumulated velocity, float32 over the d values):

1. local clipping: ``g <- g * min(1, clip_norm / ||g||)`` (off when ``clip_norm`` is None);
2. momentum correction: ``u <- m*u + g``; residual accumulation: ``v <- v + u``;
3. per layer, a threshold from a strided sample of ``|v|`` (at least 1% of the layer and
   2/ratio values, random start), the layer's top ``ratio`` of the sample; values over it are
   selected; more than 1.3x the target: exact top-k among them; fewer than 0.8x: the
   threshold is lowered by 0.8 (at most 10 times), as the reference does;
4. send ``v[selected]`` (fp32 or fp16) with int32 indices; ``v[selected] <- 0`` (what was sent
   leaves the residual: sent + residual = accumulated, exactly, for fp32 values);
   momentum factor masking: ``u[selected] <- 0``;
5. warm-up: over the first ``warmup_rounds`` rounds the density is ``max(c^r, ratio)`` with
   ``c = ratio^(1/(warmup_rounds+1))`` (the reference's exponential schedule, per round
   instead of per epoch).

``momentum`` defaults to 0 (plain residual accumulation): the paper's 0.9 is the optimizer's
momentum of one SGD step; a round's update already holds many local steps with the client's
own momentum, and a client absent for rounds would apply stale momentum. Set it to use
momentum correction.
"""

from __future__ import annotations

import math
import warnings
from typing import Literal

import torch
from pydantic import Field

from ..records import decode, to_record
from .codec import RatioParams, generator, layer_views
from .topk import VALUE_DTYPES, SparseCodec

STATE = "codec-dgc"


class DgcParams(RatioParams):
    momentum: float = Field(0.0, ge=0, lt=1, description="momentum correction factor m (0: residuals only)")
    momentum_masking: bool = Field(True, description="zero the momentum where values were sent")
    clip_norm: float | None = Field(None, gt=0, description="local clipping of each update's L2 norm")
    warmup_rounds: int = Field(0, ge=0, description="rounds of exponentially decreasing density")
    sample_ratio: float = Field(0.01, gt=0, le=1, description="fraction of values sampled for the threshold")
    values: Literal["fp32", "fp16"] = "fp32"


def density(ratio: float, warmup_rounds: int, server_round: int) -> float:
    if warmup_rounds <= 0 or server_round > warmup_rounds:
        return ratio
    coeff = ratio ** (1.0 / (warmup_rounds + 1))
    return max(coeff ** server_round, ratio)


def select_layer(v: torch.Tensor, ratio: float, sample_ratio: float, start: int) -> torch.Tensor:
    """Indices (int64) of the values of one layer DGC sends at density ``ratio``."""
    numel = v.numel()
    importance = v.abs()
    num_selects = max(1, math.ceil(numel * ratio))
    wanted = max(math.ceil(numel * sample_ratio), math.ceil(2 / ratio))
    if numel <= wanted:
        samples = importance
    else:
        stride = max(1, numel // wanted)
        samples = importance[start % stride::stride]
    top = max(1, math.ceil(samples.numel() * ratio))
    threshold = torch.topk(samples, top, sorted=False).values.min()
    indices = torch.nonzero(importance >= threshold).view(-1)
    if samples.numel() < numel:
        for _ in range(10):
            if indices.numel() > num_selects * 1.3:
                break
            if indices.numel() < 0.8 * num_selects:
                threshold = threshold * 0.8
                indices = torch.nonzero(importance >= threshold).view(-1)
            else:
                break
    if indices.numel() > num_selects:
        indices = indices[torch.topk(importance[indices], num_selects, sorted=False).indices]
    return torch.sort(indices).values


def dgc_step(g: torch.Tensor, u: torch.Tensor | None, v: torch.Tensor | None, sizes: list[int], p: DgcParams,
             server_round: int, seed: int) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """One DGC step from the memory (u, v; None: zeros), which it does not modify: returns the new
    momentum (None when ``momentum`` is 0: there is none to keep), the accumulated velocity
    v' = v + u' and the selected flat indices of v'."""
    if p.clip_norm is not None:
        norm = float(g.norm())
        if norm > p.clip_norm:
            g = g * (p.clip_norm / norm)
    if p.momentum > 0:
        u = g.clone() if u is None else torch.add(g, u, alpha=p.momentum)
        step = u
    else:
        u, step = None, g
    v = step.clone() if v is None else torch.add(v, step)
    ratio = density(p.ratio, p.warmup_rounds, server_round)
    starts = torch.randint(0, 2**31 - 1, (len(sizes),), generator=generator(seed)).tolist()
    chosen, offset = [], 0
    for layer, start in zip(layer_views(v, sizes), starts):  # layers, not values
        chosen.append(select_layer(layer, ratio, p.sample_ratio, start) + offset)
        offset += layer.numel()
    return u, v, torch.cat(chosen)


def read_memory(state, d: int, device: torch.device | None = None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(u, v) from ``Context.state``, read in place (read-only views of the record's bytes; copied to
    ``device`` when that is not the CPU); None for what is not there (zeros)."""
    record = state.get(STATE)
    if record is None:
        return None, None
    with warnings.catch_warnings():  # the views are only read
        warnings.simplefilter("ignore", UserWarning)
        return tuple(torch.from_numpy(decode(record[k])).to(device or "cpu") if k in record
                     and tuple(record[k].shape) == (d,) else None for k in ("u", "v"))


class DgcCodec(SparseCodec):
    name = "dgc"
    Params = DgcParams
    values_remark = " (DGC: the client's accumulated residual)"  # earlier rounds' updates are in the values

    def encode_vector(self, delta, sizes, state, ctx):
        u, v, idx = dgc_step(delta, *read_memory(state, delta.numel(), delta.device), sizes, self.params,
                             ctx.server_round, ctx.client_seed())
        values = v[idx].to(VALUE_DTYPES[self.params.values])
        v[idx] = 0.0
        if u is not None and self.params.momentum_masking:
            u[idx] = 0.0
        state[STATE] = to_record({"v": v} if u is None else {"u": u, "v": v})
        return {"indices": idx.to(torch.int32), "values": values}
