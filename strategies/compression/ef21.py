"""``ef21``: EF21 error feedback around a biased codec (Richtarik, Sokolov, Fatkhullin, "EF21: A New,
Simpler, Theoretically Better, and Practically Faster Error Feedback", NeurIPS 2021, Algorithm 1).

Each client i keeps an estimate ``g_i`` of its update (record ``codec-ef21`` in its
``Context.state``), sends ``c_i = C(delta_i - g_i)`` with the inner codec C (``inner``:
topk, sign or terngrad, with ``ratio`` for topk), and sets ``g_i <- g_i + C^-1(c_i)``; the
server keeps the same ``g_i`` (by partition id, from the first round it hears from client i,
starting at zero as the client does) and decodes the model ``sent + g_i``. The strategy then
averages these as it would whole local models, which is EF21's ``g = mean g_i`` step with
the model update applied by the strategy. Both sides decode ``c_i`` with the same function,
so client and server estimates stay equal bit for bit. Server memory: d floats per client
seen.
"""

from __future__ import annotations

from typing import Literal

import torch
from flwr.app import ArrayRecord, RecordDict
from pydantic import BaseModel, ConfigDict, Field

from ..records import to_record, to_torch
from ..rules import RuleViolation
from .codec import PAYLOAD, AuditRequest, AuditView, CodecContext, DeltaCodec, float_keys, rebuild
from .sign import SignCodec
from .terngrad import TernGradCodec
from .topk import TopKCodec, TopKParams

STATE = "codec-ef21"


class Ef21Params(BaseModel):
    model_config = ConfigDict(extra="forbid")
    inner: Literal["topk", "sign", "terngrad"] = Field("topk", description="the compressor C")
    ratio: float = Field(0.01, gt=0, le=1, description="topk's fraction of values kept")


def inner_codec(p: BaseModel) -> DeltaCodec:
    """The compressor C named by ``p.inner`` (with ``p.ratio`` for topk)."""
    if p.inner == "topk":
        return TopKCodec(TopKParams(ratio=p.ratio))
    return SignCodec() if p.inner == "sign" else TernGradCodec()


class EstimateCodec(DeltaCodec):
    """Error feedback's server side: per client, an estimate of its update that every reply moves by the
    compressed change it carries (both sides decode it with the inner codec, so they stay equal bit for
    bit); the server decodes a reply to ``sent + estimate``."""

    def __init__(self, params=None):
        super().__init__(params)
        self.inner = inner_codec(self.params)
        self.estimates: dict[int, torch.Tensor] = {}  # server side: the estimate by partition id

    def decode_vector(self, payload, sizes, ctx):
        """The change of the estimate (the server adds it to its estimate in ``decode``)."""
        return self.inner.decode_vector(payload, sizes, ctx)

    def decode(self, content: RecordDict, sent: ArrayRecord, ctx: CodecContext = CodecContext()) -> RecordDict:
        base = to_torch(sent)
        sizes = [base[k].numel() for k in float_keys(base)]
        c = self.decode_vector(to_torch(content[PAYLOAD]), sizes, ctx)
        g = self.estimates.get(ctx.client)
        g = c if g is None or g.numel() != c.numel() else g + c
        self.estimates[ctx.client] = g
        return rebuild(content, base, g)

    def support(self, content, sent):
        return None  # sent + estimate: every coordinate the client ever sent

    @classmethod
    def check(cls, params, scenario, at=("upload",)) -> None:
        """No ``train.deadline_s``: a straggler's reply, dropped before the codec decodes it (docs/time.md),
        would move the client's estimate and not the server's, and the two would drift apart for good."""
        super().check(params, scenario, at)
        if getattr(scenario.train, "deadline_s", None) is not None:
            raise RuleViolation(("train", "deadline_s"), f"{cls.name} keeps each client's estimate on both sides; "
                                f"a straggler dropped at the deadline would move only the client's copy: use "
                                f"another codec or no deadline")


class Ef21Codec(EstimateCodec):
    name = "ef21"
    Params = Ef21Params

    def encode_vector(self, delta, sizes, state, ctx):
        g = to_torch(state[STATE], delta.device)["g"] if STATE in state else None
        if g is None or g.numel() != delta.numel():
            g = torch.zeros_like(delta)
        payload = self.inner.encode_vector(delta - g, sizes, state, ctx)
        g += self.inner.decode_vector(payload, sizes, ctx)
        state[STATE] = to_record({"g": g})
        return payload

    def audit_view(self, request: AuditRequest) -> AuditView:
        return AuditView(note="ef21: the server's estimate sent + g_i of the client's update")
