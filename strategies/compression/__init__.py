"""Upload codecs by name: how a client's ``Upload`` travels and how the server reads it back.

A new codec is one module with a ``Codec`` subclass (its settings a pydantic ``Params``)
plus one line in ``_CODECS``. The scenario's ``upload`` section is ``codec`` plus that
codec's settings; the server sends them to clients in the config (``codec``,
``codec-params`` as JSON, ``codec-seed``: ``codec_seed``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from pydantic import BaseModel

from .codec import Codec, CodecContext, DeltaCodec, IdentityCodec
from .countsketch import CountSketchCodec
from .dgc import DgcCodec
from .econtrol import EControlCodec
from .ef21 import Ef21Codec
from .sign import SignCodec
from .sketch import SketchCodec
from .terngrad import TernGradCodec
from .topk import TopKCodec

# The codec's stream of the one scenario seed (fedsim.world lists them all).
CODEC_STREAM = 7

# The registry: one line a codec (and its import above).
_CODECS: dict[str, type[Codec]] = {c.name: c for c in (
    IdentityCodec,
    TopKCodec,
    SignCodec,
    TernGradCodec,
    DgcCodec,
    Ef21Codec,
    SketchCodec,
    CountSketchCodec,
    EControlCodec,
)}


def codec_names() -> list[str]:
    return sorted(_CODECS)


def codec_params(name: str, params: dict[str, Any] | str | None = None) -> BaseModel:
    """The codec's validated settings from a mapping or their JSON (pydantic errors propagate)."""
    cls = codec_class(name)
    if isinstance(params, str):
        return cls.Params.model_validate_json(params)
    return cls.Params(**(params or {}))


def codec_class(name: str) -> type[Codec]:
    if name not in _CODECS:
        raise KeyError(f"unknown upload codec {name!r}; choose one of {', '.join(codec_names())}")
    return _CODECS[name]


def get_codec(name: str, params: BaseModel | dict[str, Any] | str | None = None) -> Codec:
    cls = codec_class(name)
    return cls(params if isinstance(params, BaseModel) else codec_params(name, params))


def codec_seed(seed: int) -> int:
    """The seed every client and the server share for codec randomness in one run."""
    return int(np.random.default_rng([seed, CODEC_STREAM]).integers(2**62))


__all__ = ["CODEC_STREAM", "Codec", "CodecContext", "DeltaCodec", "IdentityCodec", "codec_names", "codec_params",
           "codec_seed", "get_codec"]
