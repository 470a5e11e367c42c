"""``sketch``: a sparse Johnson-Lindenstrauss sketch of the update, drawn each round from a seed
the server and every client share (the matrix never travels); with ``noise``, the
sketch-and-noise mechanism (Song et al., ICML 2023): the sketch is clipped and Gaussian noise
added in sketch space, and its DP statement is reported each round.

The sketch (Kane & Nelson, "Sparser Johnson-Lindenstrauss Transforms", J. ACM 2014, the
block construction): m = ceil(ratio * d) rows in ``blocks`` blocks of m/blocks rows; column j
has one nonzero per block, ``s_b(j) / sqrt(blocks)`` at row ``h_b(j)`` of block b (hashes from
``hashing.signed_hashes``). Encoding is O(blocks * d) (one scatter-add per block), the
de-sketch is the transpose ``S^T y`` (one gather per block), O(blocks * d). For every x,
E||Sx||^2 = ||x||^2 and E<Sx, Sy> = <x, y>, with Var||Sx||^2 <= 2||x||^4 / m (the JL bound
tests/test_codecs.py checks). ``S^T S`` is not the identity: the server averages ``S^T y``
(an unbiased estimate of the update), as sketched SGD without unsketching heavy hitters does.

Noise (``noise`` = z > 0, ``clip_norm`` = C): y <- y * min(1, C / ||y||) + N(0, (zC)^2 I_m),
each client with its own seed. Each upload is then a Gaussian mechanism of L2 sensitivity C
(add/remove one client's update) on the client's data, whatever the sketch: clipping in
sketch space bounds it exactly. ``report`` gives local DP per client, epsilon at ``delta``
from Flower's RDP accountant for a client that took part in every round so far (the worst
case; no amplification by sampling), the same accountant as defense ``dp_user``.
"""

from __future__ import annotations

import math

import torch
from flwr.supercore.privacy_accounting import (GaussianPrivacyEvent, NeighboringRelation, PrivacyConfig,
                                               SamplingMethod)
from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant
from pydantic import Field, model_validator

from ..records import to_torch
from .codec import PAYLOAD, AuditRequest, AuditView, CodecContext, DeltaCodec, RatioParams, float_keys, generator
from .hashing import sketch_chunked, transpose_chunked

ROUND_STREAM = 1  # CodecContext.round_seed stream of the sketch


class SketchParams(RatioParams):
    blocks: int = Field(1, ge=1, le=64, description="nonzeros per column (sparse JL blocks)")
    noise: float | None = Field(None, gt=0, description="noise multiplier z (sketch-and-noise); None: no noise")
    clip_norm: float | None = Field(None, gt=0, description="L2 bound C of the sketch (needed with noise)")
    delta: float = Field(1e-5, gt=0, lt=1, description="delta at which epsilon is reported")

    @model_validator(mode="after")
    def _noise_needs_clip(self):
        if self.noise is not None and self.clip_norm is None:
            raise ValueError("noise needs clip_norm (the sketch's L2 bound)")
        return self


class SparseJL:
    """The round's sketch S (m x d), given by its seed; ``apply`` = S x, ``transpose`` = S^T y."""

    def __init__(self, seed: int, d: int, m: int, blocks: int = 1):
        self.seed, self.d, self.blocks = seed, d, max(1, min(blocks, m))
        self.width = max(1, m // self.blocks)
        self.m = self.width * self.blocks
        self.scale = 1.0 / math.sqrt(self.blocks)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return sketch_chunked(x, self.seed, self.width, self.blocks).view(-1).mul_(self.scale)

    def transpose(self, y: torch.Tensor) -> torch.Tensor:
        # the scale on the m sketch values, not on the d results
        return transpose_chunked(y.view(self.blocks, self.width) * self.scale, self.seed, self.d)


class SketchMap:
    """The round's sparse JL sketch S as a differentiable map of the flat upload (``SparseJL.apply`` without its
    in-place chunks, so that autograd goes through it); picklable (it travels to the attack's worker). The
    privacy audit matches a sketched upload in sketch space with it (``fedsim.audit``)."""

    def __init__(self, seed: int, d: int, m: int, blocks: int):
        jl = SparseJL(seed, d, m, blocks)
        self.seed, self.d, self.width, self.blocks, self.scale = jl.seed, d, jl.width, jl.blocks, jl.scale
        self._codes = None

    def __getstate__(self):
        return {**self.__dict__, "_codes": None}  # redrawn from the seed in the worker

    def __call__(self, flat: torch.Tensor) -> torch.Tensor:
        from .hashing import signed_hashes

        if self._codes is None:
            self._codes = signed_hashes(self.seed, self.d, self.width, self.blocks)
        if self._codes.device != flat.device:  # the attack's device (drawn on the CPU, moved once)
            self._codes = self._codes.to(flat.device)
        rows = []
        for codes in self._codes:
            both = flat.new_zeros(2 * self.width).index_add(0, codes, flat)
            rows.append(both[0::2] - both[1::2])
        return torch.cat(rows) * self.scale


def sketch_size(d: int, ratio: float) -> int:
    return max(1, min(d, math.ceil(ratio * d)))


class SketchCodec(DeltaCodec):
    name = "sketch"
    Params = SketchParams

    def matrix(self, d: int, ctx: CodecContext) -> SparseJL:
        return SparseJL(ctx.round_seed(ROUND_STREAM), d, sketch_size(d, self.params.ratio), self.params.blocks)

    def encode_vector(self, delta, sizes, state, ctx):
        y = self.matrix(delta.numel(), ctx).apply(delta)
        p = self.params
        if p.noise is not None:
            norm = float(y.norm())
            if norm > p.clip_norm:
                y.mul_(p.clip_norm / norm)
            y.add_(torch.randn(y.numel(), generator=generator(ctx.client_seed(ROUND_STREAM))).to(y.device),
                   alpha=p.noise * p.clip_norm)
        return {"sketch": y}

    def decode_vector(self, payload, sizes, ctx):
        return self.matrix(sum(sizes), ctx).transpose(payload["sketch"])

    def audit_view(self, request: AuditRequest) -> AuditView:
        """The server holds the round's shared seed, so it knows S. By default the attack matches in sketch
        space: the simulated update sketched, S u(x'), against the y that travelled, where the true batch is
        an exact solution without noise (``codec_space: false``, or BatchNorm buffers among the flattened
        entries: the de-sketch S^T y, a dense but noisy estimate of the update)."""
        noisy = " and noise" if self.params.noise is not None else ""
        wire, wire_map = self._wire(request) if request.codec_space else (None, None)
        if wire is None:
            return AuditView(note=f"sketch{noisy}: the de-sketch S^T y with the round's shared seed")
        return AuditView(note=f"sketch{noisy}: matched in sketch space, S u(x') against the y that travelled (S "
                              "from the round's shared seed)", wire=wire, wire_map=wire_map)

    def _wire(self, request: AuditRequest):
        """(y, S) of a sketched reply, S rebuilt from the shared seed as the decoder does; (None, None) when
        the float entries the codec flattened are not exactly the model's parameters (BatchNorm's buffers)."""
        keys = float_keys(request.sent)
        if request.wire is None or keys != request.param_names:
            return None, None
        d = sum(request.sent[k].numel() for k in keys)
        sketch_map = SketchMap(request.ctx.round_seed(ROUND_STREAM), d, sketch_size(d, self.params.ratio),
                               self.params.blocks)
        return to_torch(request.wire[PAYLOAD])["sketch"].float(), sketch_map

    def report(self, server_round: int) -> dict:
        out = super().report(server_round)
        p = self.params
        if p.noise is not None:
            out.update({"codec_epsilon": local_epsilon(p.noise, server_round, p.delta), "codec_delta": p.delta})
        return out


def local_epsilon(noise: float, rounds: int, delta: float) -> float:
    """Epsilon of ``rounds`` Gaussian mechanisms of noise multiplier ``noise`` on one client's data."""
    acc = RdpAccountant(PrivacyConfig(target_delta=delta, population_size=1,
                                      neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
                                      sampling_method=SamplingMethod.NO_AMPLIFICATION))
    acc.compose(GaussianPrivacyEvent(noise_multiplier=noise, sample_size=1, population_size=1), rounds)
    return float(acc.get_epsilon(delta))
