"""``countsketch``: FetchSGD (Rothchild, Panda, Ullah, Ivkin, Stoica, Braverman, Gonzalez, Arora,
"FetchSGD: Communication-Efficient Federated Learning with Sketching", ICML 2020, Algorithm 1;
reference code kiddyboots216/CommEfficient).

Each client sends the count sketch S(delta_i) of its update: a table of ``rows`` x ``cols``
(rows * cols = ratio * d) with hashes fixed for the whole run (momentum and error live in
sketch space across rounds, so the sketch cannot change). The server, once per round
(``decode_round``), with the sketches' example-weighted mean S:

    S_u <- rho * S_u + S                (momentum in sketch space)
    S_e <- S_e + S_u                    (error accumulation in sketch space; server lr 1)
    Delta = top-k(U(S_e))               (U: per coordinate the median over rows of s_r(j) S_e[r, h_r(j)])
    S_e <- 0 where S(Delta) is nonzero; S_u <- 0 there too

``error_reset`` says how S_e forgets what was applied. ``zero`` (the default) is the reference
code's rule (``_server_helper_sketched`` in CommEfficient's fed_aggregator.py): zero every bucket
the sketch of Delta touches, which also drops the other coordinates' error in those buckets.
``subtract`` is the paper's Algorithm 1, S_e <- S_e - S(Delta); the reference code carries it
commented out with the note that the model diverges, and so did it here (experiments/uploads
RESULTS.md: every seed of the non-IID digits run, loss 0.87 -> 2,202 -> NaN by round 19).

and every reply decodes to the same model ``sent + Delta``: a strategy averaging the replies'
models gets exactly ``sent + Delta`` (the server never sees one client's update unsketched).
``momentum`` defaults to 0 (see dgc's note: a round's update already holds the clients' local
steps); FetchSGD's experiments use 0.9. ``topk`` is k as a fraction of d.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import torch
from flwr.app import RecordDict
from pydantic import Field

from ..records import to_torch
from .codec import PAYLOAD, AuditRequest, AuditView, CodecContext, DeltaCodec, RatioParams, float_keys, rebuild
from .hashing import median_chunked, sketch_chunked
from .topk import keep_count, select_topk

RUN_STREAM = 2  # the run's fixed hashes: CodecContext.seed with this stream


class CountSketchParams(RatioParams):
    rows: int = Field(5, ge=1, le=32, description="rows of the count sketch")
    topk: float = Field(0.002, gt=0, le=1, description="k of the top-k unsketch, as a fraction of d")
    momentum: float = Field(0.0, ge=0, lt=1, description="rho, server momentum in sketch space")
    error_reset: Literal["zero", "subtract"] = Field(
        "zero", description="zero: the reference code's rule (zero S_e's buckets Delta touched); "
                            "subtract: the paper's S_e - S(Delta) (diverges, as the reference code notes)")


class CountSketchCodec(DeltaCodec):
    name = "countsketch"

    def audit_view(self, request: AuditRequest) -> AuditView:
        """Every reply decodes to the round's aggregate ``sent + Delta`` (the server aggregates in sketch space)."""
        return AuditView(exact=False, note="countsketch: every reply decodes to the round's aggregate: the attack "
                                           "sees the aggregate, not one client's update")
    Params = CountSketchParams

    def __init__(self, params=None):
        super().__init__(params)
        self.momentum_table: torch.Tensor | None = None  # S_u
        self.error_table: torch.Tensor | None = None     # S_e

    def shape(self, d: int) -> tuple[int, int]:
        rows = self.params.rows
        return rows, max(1, math.ceil(self.params.ratio * d / rows))

    @staticmethod
    def hash_seed(ctx: CodecContext) -> int:
        """The run's hashes (the same every round)."""
        return int(np.random.default_rng([ctx.seed, RUN_STREAM]).integers(2**62))

    def sketch(self, x: torch.Tensor, ctx: CodecContext) -> torch.Tensor:
        rows, cols = self.shape(x.numel())
        return sketch_chunked(x, self.hash_seed(ctx), cols, rows)

    def encode_vector(self, delta, sizes, state, ctx):
        return {"table": self.sketch(delta, ctx)}

    def unsketch(self, table: torch.Tensor, d: int, ctx: CodecContext) -> torch.Tensor:
        """Per coordinate, the median over rows of its signed bucket."""
        return median_chunked(table, self.hash_seed(ctx), d)

    def decode_vector(self, payload, sizes, ctx):
        """One sketch alone, unsketched and top-k'd (not what a round does: see ``decode_round``)."""
        d = sum(sizes)
        est = self.unsketch(payload["table"], d, ctx)
        out = torch.zeros(d)
        idx = select_topk(est, keep_count(d, self.params.topk))
        out[idx] = est[idx]
        return out

    def decode_round(self, contents: list[RecordDict], sent, ctx: CodecContext = CodecContext()):
        if not contents:
            return []
        base = to_torch(sent)
        d = sum(base[k].numel() for k in float_keys(base))
        weights = torch.tensor([float(c["metrics"]["num-examples"]) if "metrics" in c else 1.0 for c in contents])
        weights = weights / weights.sum()
        table = sum(float(w) * to_torch(c[PAYLOAD])["table"] for w, c in zip(weights, contents))
        if self.error_table is None or self.error_table.shape != table.shape:
            self.momentum_table, self.error_table = torch.zeros_like(table), torch.zeros_like(table)
        self.momentum_table.mul_(self.params.momentum).add_(table)
        self.error_table.add_(self.momentum_table)
        est = self.unsketch(self.error_table, d, ctx)
        idx = select_topk(est, keep_count(d, self.params.topk))
        update = torch.zeros(d)
        update[idx] = est[idx]
        sent_sketch = self.sketch(update, ctx)
        touched = sent_sketch != 0
        if self.params.error_reset == "zero":
            self.error_table[touched] = 0.0
        else:
            self.error_table.sub_(sent_sketch)
        self.momentum_table[touched] = 0.0
        return [rebuild(c, base, update) for c in contents]
