"""Upload codecs by name: how a client's ``Upload`` travels and how the server reads it back.

A new codec is one module with a ``Codec`` subclass plus one line in ``_CODECS``.
"""

from __future__ import annotations

from .codec import Codec, IdentityCodec

_CODECS: dict[str, type[Codec]] = {"none": IdentityCodec}


def codec_names() -> list[str]:
    return sorted(_CODECS)


def get_codec(name: str) -> Codec:
    if name not in _CODECS:
        raise KeyError(f"unknown upload codec {name!r}; choose one of {', '.join(codec_names())}")
    return _CODECS[name]()


__all__ = ["Codec", "IdentityCodec", "codec_names", "get_codec"]
