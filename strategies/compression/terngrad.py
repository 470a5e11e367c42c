"""``terngrad``: stochastic ternary values, 2 bits each, and one scale per layer.

Wen, Xu, Yan, Wu, Wang, Chen, Li, "TernGrad: Ternary Gradients to Reduce Communication in
Distributed Deep Learning", NeurIPS 2017; reference: wenwei202/terngrad
(``bingrad_common.py``: ``clip_gradients``, layer-wise clipping at ``clip_factor`` = 2.5 times
the layer's (population) std; ``stochastical_binarize_gradients``, ``u ~ U[0, scaler)``, send
``sign(g) * scaler`` where ``u < |g|``, with ``scaler = max|g|``). Per layer l, with
``c = clip`` (2.5 in the paper):

    g <- clamp(g, -c*std(g), c*std(g));  s = max|g|;  t = s * sign(g) * b,  b ~ Bernoulli(|g|/s)

so E[t] = the clipped g (unbiased after clipping). Codes {-1, 0, 1} travel as {0, 1, 2} in two
bits, four to a byte (``packing.pack2``); the scales as fp32. The Bernoulli draws use the
client's own seed for the round. ``ratio`` does not apply (1/16 of fp32 plus the scales).
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field

from .codec import AuditRequest, AuditView, DeltaCodec, generator, layer_views
from .packing import pack2, unpack2


class TernGradParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    clip: float | None = Field(2.5, gt=0, description="clip each layer at clip * std (None: no clipping)")


def clip_layers(delta: torch.Tensor, sizes: list[int], clip: float | None) -> torch.Tensor:
    """The update with each layer clamped to +-clip * std (a copy)."""
    out = torch.empty_like(delta)
    for layer, dst in zip(layer_views(delta, sizes), layer_views(out, sizes)):  # layers, not values
        if clip is not None and layer.numel() > 1:
            bound = float(clip * layer.std(correction=0))
            torch.clamp(layer, -bound, bound, out=dst)
        else:
            dst.copy_(layer)
    return out


def layer_scales(delta: torch.Tensor, sizes: list[int], clip: float | None) -> torch.Tensor:
    """Per layer, s = max|clamp(g, -c std, c std)| = min(max|g|, c std), without the clamped copy."""
    scales = []
    for layer in layer_views(delta, sizes):  # layers, not values
        lo, hi = torch.aminmax(layer)
        s = torch.maximum(-lo, hi)
        if clip is not None and layer.numel() > 1:
            s = torch.minimum(s, clip * layer.std(correction=0))
        scales.append(s)
    return torch.stack(scales)


def ternarize(delta: torch.Tensor, sizes: list[int], clip: float | None,
              seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes in {0,1,2} as uint8, per-layer scales s): code - 1 = sign(g) * Bernoulli(|g_clipped| / s), drawn
    as ``u * s < |g|`` with u ~ U[0, 1): where |g| >= s (clipped values) that holds always, so the
    clamp is implicit."""
    scales = layer_scales(delta, sizes, clip)
    positive = delta > 0
    u = torch.rand(delta.numel(), generator=generator(seed)).to(delta.device)  # drawn on the CPU: same on every device
    for layer, s in zip(layer_views(u, sizes), scales):
        layer.mul_(s)
    keep = u < delta.abs()  # never for an all-zero layer (s = 0)
    codes = (~keep).to(torch.uint8)
    codes.add_((keep & positive).to(torch.uint8), alpha=2)
    return codes, scales


class TernGradCodec(DeltaCodec):
    name = "terngrad"

    def audit_view(self, request: AuditRequest) -> AuditView:
        return AuditView(note=f"{self.name}: the decoded values")  # per-layer scale times the ternary code
    Params = TernGradParams

    def encode_vector(self, delta, sizes, state, ctx):
        codes, scales = ternarize(delta, sizes, self.params.clip, ctx.client_seed())
        return {"codes": pack2(codes), "scales": scales}

    def decode_vector(self, payload, sizes, ctx):
        out = unpack2(payload["codes"], sum(sizes)).float().sub_(1)
        for layer, scale in zip(layer_views(out, sizes), payload["scales"]):
            layer.mul_(scale)
        return out
