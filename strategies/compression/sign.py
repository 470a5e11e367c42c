"""``sign``: one bit a value (the sign, packed eight to a byte) and one scale per layer.

signSGD with a per-layer magnitude: the decoded update of a layer is ``mean(|g|) * sign(g)``
(the scaled sign of Karimireddy et al., "Error Feedback Fixes SignSGD", ICML 2019; plain
signSGD of Bernstein et al. 2018 with its scale). Biased: wrap it in ``ef21`` for error
feedback. ``ratio`` does not apply (1/32 of fp32 plus the scales).
"""

from __future__ import annotations

import torch

from .codec import AuditRequest, AuditView, DeltaCodec, NoCodecParams, layer_views
from .packing import pack1, unpack1


class SignCodec(DeltaCodec):
    name = "sign"

    def audit_view(self, request: AuditRequest) -> AuditView:
        return AuditView(note=f"{self.name}: the decoded values")  # per-layer scale times sign
    Params = NoCodecParams

    def encode_vector(self, delta, sizes, state, ctx):
        scales = torch.stack([v.abs().mean() for v in layer_views(delta, sizes)])
        return {"signs": pack1(delta >= 0), "scales": scales}

    def decode_vector(self, payload, sizes, ctx):
        out = unpack1(payload["signs"], sum(sizes)).float().mul_(2).sub_(1)
        for layer, scale in zip(layer_views(out, sizes), payload["scales"]):  # layers, not values
            layer.mul_(scale)
        return out
