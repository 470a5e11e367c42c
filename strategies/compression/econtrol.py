"""``econtrol``: EControl, error feedback with a controlled feedback strength around a contractive
compressor (Gao, Islamov, Stich, "EControl: Fast Distributed Optimization with Compression and
Error Control", ICLR 2024; arXiv:2311.05645; Algorithm 1).

Paper, client i at step t with gradient g_i^t, error e_i^t and gradient estimate h_i^t
(e_i^0 = 0), one compressed message Delta_i^t a step::

    Delta_i^t   = C(eta * e_i^t + g_i^t - h_i^t)
    e_i^{t+1}   = e_i^t + g_i^t - h_i^t - Delta_i^t
    h_i^{t+1}   = h_i^t + Delta_i^t

and the server, which keeps h = mean_i h_i, steps x^{t+1} = x^t - gamma (h^t + mean_i Delta_i^t),
that is with h^{t+1}. eta = 0 is EF21 (no error term); eta = 1 compresses e_i + g_i - h_i, EF14's
error feedback applied to EF21's difference; eta in between tempers the feedback.

fedsim's mapping (as ``ef21``'s): the paper's g_i^t is the client's round update
``delta_i = weights - sent`` (float entries, flattened; ``DeltaCodec``). Each client keeps e_i
and h_i (record ``codec-econtrol`` in its ``Context.state``, float32, d values each, starting at
zero, kept while it sits out rounds), sends the inner codec's payload of
``eta * e_i + delta_i - h_i`` (``inner``: topk, sign or terngrad, with ``ratio`` for topk), and
updates e_i and h_i with Delta_i = C^-1(payload), the decoded message, so that what it stores is
what the server reads. The server keeps the same h_i per client (by partition id, from the first
round it hears from client i, starting at zero as the client does) and decodes the reply to the
model ``sent + h_i^{t+1}``; the strategy averages these as it would whole local models, which is
the paper's step with h^{t+1} = mean h_i^{t+1} as the model update (server step 1; FedAvg weighs
by examples, and with partial participation the mean runs over the round's clients, as for
``ef21``). Both sides decode Delta_i with the same function, so their h_i agree bit for bit.

The equations above were checked against one public third-party implementation (an ``ECONTROL``
branch of a distributed SGD optimizer, same order of updates, the step taken with the new h); no
code of the authors' was found, and the paper's full text could not be read where this was written.

``eta`` (> 0, default 0.1): a practical default, not a number taken from the paper (its analysis
takes eta small, relative to the compressor's contraction). On 8 non-IID digits clients (15
rounds, one seed) top-k 1% ended better than EF21 at eta 0.1-0.2 and collapsed at eta 1 (accuracy
0.16). ``inner: terngrad`` is unbiased rather than contractive, outside the paper's assumption
(offered as ``ef21`` offers it); topk and the scaled sign are contractive.

Initialisation: h_i^0 = 0, so a client's first upload is C(delta_i) like every later one (fedsim's
uploads are all compressed; ``ef21`` also starts at zero); an h_i^0 from one dense first upload
is not done here. Server memory: d floats per client seen; client memory: 2d floats.
"""

from __future__ import annotations

from typing import Literal

import torch
from flwr.app import RecordDict
from pydantic import BaseModel, ConfigDict, Field

from ..records import to_record, to_torch
from .codec import AuditRequest, AuditView
from .ef21 import EstimateCodec

STATE = "codec-econtrol"


class EControlParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    inner: Literal["topk", "sign", "terngrad"] = Field("topk", description="the contractive compressor C")
    ratio: float = Field(0.01, gt=0, le=1, description="topk's fraction of values kept")
    eta: float = Field(0.1, gt=0, description="feedback strength: the weight of the error e_i in what is compressed")


def _memory(state: RecordDict, d: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(e_i, h_i) from ``Context.state``, on ``device``; zeros when absent or of another size."""
    if STATE in state:
        mem = to_torch(state[STATE], device)
        e, h = mem.get("e"), mem.get("h")
        if e is not None and h is not None and e.numel() == d and h.numel() == d:
            return e, h
    return torch.zeros(d, device=device), torch.zeros(d, device=device)


class EControlCodec(EstimateCodec):
    name = "econtrol"
    Params = EControlParams

    # ---------------------------------------------------------------- client
    def encode_vector(self, delta, sizes, state, ctx):
        e, h = _memory(state, delta.numel(), delta.device)
        payload = self.inner.encode_vector(self.params.eta * e + delta - h, sizes, state, ctx)
        step = self.inner.decode_vector(payload, sizes, ctx)  # Delta_i, as the server reads it
        e = e + delta - h - step
        h = h + step
        state[STATE] = to_record({"e": e, "h": h})
        return payload

    # the server side (h_i by partition id, decoded to sent + h_i) is error feedback's: ``EstimateCodec``

    def audit_view(self, request: AuditRequest) -> AuditView:
        return AuditView(exact=False, note="econtrol: the server's estimate sent + h_i of the client's update (the "
                         "sum of every round's compressed message Delta_i, each carrying eta times the client's "
                         "accumulated error e_i), not this round's update")
