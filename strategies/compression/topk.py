"""``topk``: the k = ceil(ratio * d) largest-magnitude values of the update, with their indices.

Plain (biased) top-k sparsification (Aji & Heafield 2017; Stich et al., "Sparsified SGD with
memory", NeurIPS 2018, without the memory: wrap it in ``ef21`` for error feedback). Values
fp32 or fp16, indices int32. The selection is exact; a sampled threshold only narrows the
candidates first (``select_topk``), so 11M values cost one pass plus a small top-k.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from flwr.app import ArrayRecord, RecordDict
from pydantic import Field

from ..records import to_torch
from .codec import PAYLOAD, AuditRequest, AuditView, DeltaCodec, RatioParams, generator, sparse_support

VALUE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16}


class TopKParams(RatioParams):
    values: Literal["fp32", "fp16"] = Field("fp32", description="dtype of the values sent")


def keep_count(d: int, ratio: float) -> int:
    return max(1, min(d, math.ceil(ratio * d)))


def select_topk(x: torch.Tensor, k: int, seed: int = 0) -> torch.Tensor:
    """Indices (int64, ascending) of the k largest |x|, exactly (ties broken by torch.topk).

    A sample of |x| gives a threshold expected to leave about 2k candidates; top-k runs on those
    only, or on everything when the sample was unlucky and fewer than k passed."""
    d = x.numel()
    mag = x.abs()
    if k >= d:
        return torch.arange(d, device=x.device)
    if d > 200_000 and k < d // 20:
        n = min(d, max(20_000, 40 * d // k))
        sample = mag[torch.randint(0, d, (n,), generator=generator(seed)).to(x.device)]  # drawn on the CPU
        q = max(1, min(n, math.ceil(2 * k / d * n)))
        threshold = torch.topk(sample, q, sorted=False).values.min()
        candidates = torch.nonzero(mag >= threshold).view(-1)
        if candidates.numel() >= k:
            chosen = candidates[torch.topk(mag[candidates], k, sorted=False).indices]
            return torch.sort(chosen).values
    return torch.sort(torch.topk(mag, k, sorted=False).indices).values


class SparseCodec(DeltaCodec):
    """A codec whose payload is (int32 indices, values) into the flat update: top-k and DGC."""

    def decode_vector(self, payload, sizes, ctx):
        out = torch.zeros(sum(sizes), device=payload["values"].device)  # EControl decodes on the client's device
        out[payload["indices"].long()] = payload["values"].float()
        return out

    def support(self, content: RecordDict, sent: ArrayRecord):
        return sparse_support(to_torch(content[PAYLOAD])["indices"], sent)

    values_remark = ""  # what the carried values are, where they are more than this round's update

    def audit_view(self, request: AuditRequest) -> AuditView:
        """The attack matches only the coordinates the reply carried (``RoundRecord.support``), not the zeros
        the unsent ones decode to, unless the audit asks for the decoded upload (``audit.support: false``)."""
        fraction = request.support_fraction
        if fraction is None:
            why = "audit.support: false" if not request.support_requested else "no parameter coordinate travelled"
            return AuditView(note=f"{self.name}: the decoded upload, unsent coordinates matched as 0 ({why})")
        return AuditView(note=f"{self.name}: only the {100 * fraction:.3g}% of coordinates the reply carried are "
                              f"matched{self.values_remark}")


class TopKCodec(SparseCodec):
    name = "topk"
    Params = TopKParams

    def encode_vector(self, delta, sizes, state, ctx):
        idx = select_topk(delta, keep_count(delta.numel(), self.params.ratio), ctx.client_seed())
        return {"indices": idx.to(torch.int32), "values": delta[idx].to(VALUE_DTYPES[self.params.values])}
