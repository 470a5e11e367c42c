"""The codec interface, and ``none``: the upload travels as it is.

``encode(upload, state, ctx)`` runs on the client and returns the records that travel
(Flower ``ArrayRecord``s only, never pickles); per-client codec state (residuals, error
feedback) lives in ``state``, the node's ``Context.state``. ``decode_round(contents, sent,
ctx)`` runs on the server once per round on every valid reply's content, with the arrays
the server sent that round, and returns the contents the strategy aggregates: the model
under ``"arrays"`` plus the strategy's extra records, whatever the codec did on the wire.
Its default decodes each reply alone with ``decode``; a codec that aggregates in its own
space (FetchSGD's count sketch) overrides it. The codec object on the server lives for the
whole run, so server-side codec state (EF21's estimates, FetchSGD's sketches) is kept on it.

Randomness: ``CodecContext.seed`` is one seed shared by the server and every client (from
the scenario seed's codec stream, ``CODEC_STREAM``, sent in the config as ``codec-seed``);
per-round shared randomness (a sketch) is ``round_seed``; client-private randomness
(TernGrad's rounding, a sketch's noise) is ``client_seed``.

``DeltaCodec``: codecs of the update ``weights - sent``. The floating-point entries are
flattened, in the order of the state dict, into one float32 vector of d values
(``sizes`` gives each entry's length); the payload goes under the record ``codec``,
non-floating entries (BatchNorm's counter) travel dense under ``codec-dense``, and the
strategy's extra records (SCAFFOLD's control variates, FedImpro's statistics ...) travel
dense beside them. The server decodes to ``sent + decoded_delta`` under ``arrays``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable

import numpy as np
import torch
from flwr.app import ArrayRecord, RecordDict
from pydantic import BaseModel, ConfigDict, Field

from ..records import to_record, to_torch
from ..upload import Upload

PAYLOAD, DENSE = "codec", "codec-dense"


class NoCodecParams(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RatioParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    ratio: float = Field(0.01, gt=0, le=1, description="fraction of the d values kept (or sketch size / d)")


@dataclass(frozen=True)
class CodecContext:
    seed: int = 0          # shared by server and all clients (config "codec-seed")
    server_round: int = 1
    client: int = 0        # partition id (client-private randomness, server-side per-client state)

    def round_seed(self, stream: int = 0) -> int:
        """Shared by server and clients in this round."""
        return int(np.random.default_rng([self.seed, self.server_round, stream]).integers(2**62))

    def client_seed(self, stream: int = 0) -> int:
        """This client's own in this round (the server never needs it)."""
        return int(np.random.default_rng([self.seed, self.server_round, stream, 1, self.client]).integers(2**62))

    def for_client(self, client: int) -> "CodecContext":
        return replace(self, client=client)


@dataclass(frozen=True)
class AuditRequest:
    """What the auditor knows of one reply when it asks a codec what an attacker sees through it."""
    wire: RecordDict | None          # the reply as it travelled (encoded), None when not kept
    sent: dict[str, torch.Tensor]    # the arrays the server sent the client this round
    ctx: CodecContext                # the round's codec context (shared seed, round, client)
    param_names: list[str]           # the model's parameters, in order (what the attack matches)
    support_fraction: float | None   # the fraction of parameter coordinates the reply carried (None: all)
    support_requested: bool = True   # audit.support: match only the carried coordinates
    codec_space: bool = True         # audit.sketch_space: match in the codec's own space where it has one


@dataclass(frozen=True)
class AuditView:
    """What an honest-but-curious server's attacker sees through one transform of the upload."""
    exact: bool = True               # the decoded reply is this client's own update of this round
    note: str = ""                   # what the attack matched, for the audit row
    wire: torch.Tensor | None = None            # what travelled, in the codec's own space ...
    wire_map: Callable[[torch.Tensor], torch.Tensor] | None = None  # ... and the map of a flat update into it


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed) % (2**63))


class Codec:
    name = "?"
    Params: type[BaseModel] = NoCodecParams
    direction = "up"  # which direction this codec compresses (the downlink stays dense)
    perturbs = True   # what travels differs from the clean upload (I2F predicts the attack's loss from it)

    def __init__(self, params: BaseModel | None = None):
        self.params = params if params is not None else self.Params()

    def encode(self, upload: Upload, state: RecordDict, ctx: CodecContext = CodecContext()) -> RecordDict:
        raise NotImplementedError

    def decode(self, content: RecordDict, sent: ArrayRecord, ctx: CodecContext = CodecContext()) -> RecordDict:
        raise NotImplementedError

    def decode_round(self, contents: list[RecordDict], sent: ArrayRecord,
                     ctx: CodecContext = CodecContext()) -> list[RecordDict]:
        """Every valid reply of one round (by node id); default: each decoded alone."""
        return [self.decode(c, sent, ctx.for_client(partition_of(c))) for c in contents]

    def support(self, content: RecordDict, sent: ArrayRecord) -> dict[str, np.ndarray] | None:
        """For an attacker of the upload: per float entry, a bool mask of the coordinates this reply
        carried (sparsifying codecs); None when every coordinate travelled (in some form)."""
        return None

    def report(self, server_round: int) -> dict:
        """Fields for this round's metrics row (what was compressed; a DP statement where one holds)."""
        return {"codec": self.name, "codec_direction": self.direction}

    def audit_view(self, request: AuditRequest) -> AuditView:
        """What the audit's update attack sees through this codec (``fedsim.audit``); default: the
        decoded upload, one client's own update."""
        return AuditView(note=f"{self.name}: the decoded upload")

    @classmethod
    def check(cls, params: BaseModel, scenario: Any, at: tuple[str, ...] = ("upload",)) -> None:
        """The rules this codec imposes on the rest of the scenario: raise ``strategies.rules.RuleViolation``
        with the key path of the setting to change (``at``: the codec's own section)."""


def partition_of(content: RecordDict) -> int:
    fedsim = content.get("fedsim")
    return int(fedsim["partition-id"]) if fedsim is not None else 0


class IdentityCodec(Codec):
    """The local weights as one ArrayRecord named ``arrays``, extras beside it (the bytes of a
    plain Flower FedAvg reply)."""

    name = "none"
    direction = "none"
    perturbs = False

    def encode(self, upload: Upload, state: RecordDict, ctx: CodecContext = CodecContext()) -> RecordDict:
        return RecordDict({"arrays": to_record(upload.weights), **upload.extras})

    def decode(self, content: RecordDict, sent: ArrayRecord, ctx: CodecContext = CodecContext()) -> RecordDict:
        return content

    def decode_round(self, contents, sent, ctx=CodecContext()):
        return list(contents)

    def audit_view(self, request: AuditRequest) -> AuditView:
        return AuditView()


# ----------------------------------------------------------------------------- delta codecs


def float_keys(tensors: dict) -> list[str]:
    return [k for k, v in tensors.items() if v.is_floating_point()]


def layer_views(flat: torch.Tensor, sizes: list[int]) -> list[torch.Tensor]:
    return list(torch.split(flat, sizes))


class DeltaCodec(Codec):
    """Compresses the flattened update ``weights - sent`` (float32, d values)."""

    def encode_vector(self, delta: torch.Tensor, sizes: list[int], state: RecordDict,
                      ctx: CodecContext) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def decode_vector(self, payload: dict[str, torch.Tensor], sizes: list[int], ctx: CodecContext) -> torch.Tensor:
        raise NotImplementedError

    # ---------------------------------------------------------------- client
    def encode(self, upload: Upload, state: RecordDict, ctx: CodecContext = CodecContext()) -> RecordDict:
        keys = float_keys(upload.sent)
        sizes = [upload.sent[k].numel() for k in keys]
        flat = torch.cat([(upload.weights[k].float() - upload.sent[k].float()).reshape(-1) for k in keys])
        out = RecordDict({PAYLOAD: to_record(self.encode_vector(flat, sizes, state, ctx))})
        dense = {k: v for k, v in upload.weights.items() if not v.is_floating_point()}
        if dense:
            out[DENSE] = to_record(dense)
        for name, record in upload.extras.items():
            out[name] = record
        return out

    # ---------------------------------------------------------------- server
    def decode(self, content: RecordDict, sent: ArrayRecord, ctx: CodecContext = CodecContext()) -> RecordDict:
        base = to_torch(sent)
        sizes = [base[k].numel() for k in float_keys(base)]
        flat = self.decode_vector(to_torch(content[PAYLOAD]), sizes, ctx)
        return rebuild(content, base, flat)


def rebuild(content: RecordDict, base: dict[str, torch.Tensor], flat: torch.Tensor) -> RecordDict:
    """``content`` with the payload replaced by ``arrays`` = ``base + flat`` (float entries, in order;
    non-float entries from the dense record)."""
    dense = to_torch(content[DENSE]) if DENSE in content else {}
    arrays, offset = {}, 0
    for k, v in base.items():
        if v.is_floating_point():
            n = v.numel()
            arrays[k] = (v.float() + flat[offset:offset + n].view(v.shape)).to(v.dtype)
            offset += n
        else:
            arrays[k] = dense.get(k, v)
    out = RecordDict({"arrays": to_record(arrays)})
    for name, record in content.items():
        if name not in (PAYLOAD, DENSE):
            out[name] = record
    return out


def sparse_support(indices: torch.Tensor, sent: ArrayRecord) -> dict[str, np.ndarray]:
    """Per float entry of ``sent``, the mask of the flat ``indices`` (int) that travelled."""
    base = to_torch(sent)
    keys = float_keys(base)
    mask = torch.zeros(sum(base[k].numel() for k in keys), dtype=torch.bool)
    mask[indices.long()] = True
    out, offset = {}, 0
    for k in keys:
        n = base[k].numel()
        out[k] = mask[offset:offset + n].view(base[k].shape).numpy()
        offset += n
    return out
