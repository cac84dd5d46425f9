"""Codecs by name."""

from __future__ import annotations

from functools import lru_cache

from fedsync.codecs._base import (
    Codec,
    CodecError,
)
from fedsync.codecs._float import _Float16Codec, _Float32Codec
from fedsync.codecs._int8 import _Int8ChannelCodec, _Int8Codec
from fedsync.codecs._topk import _TopKCodec

_FIXED_CODECS: dict[str, type[Codec]] = {
    "float32": _Float32Codec,
    "float16": _Float16Codec,
    "int8": _Int8Codec,
    "int8-channel": _Int8ChannelCodec,
}


def codec_names() -> list[str]:
    """Codec names accepted by :func:`get_codec` (``topk`` takes a fraction)."""
    return [*_FIXED_CODECS, "topk:<fraction>"]


@lru_cache(maxsize=64)
def get_codec(name: str) -> Codec:
    """Return the codec called ``name``, e.g. ``"int8"`` or ``"topk:0.01"``."""
    if name in _FIXED_CODECS:
        return _FIXED_CODECS[name]()
    prefix, sep, arg = name.partition(":")
    if prefix == "topk" and sep:
        try:
            fraction = float(arg)
        except ValueError:
            raise CodecError(f"bad topk fraction in codec name {name!r}") from None
        return _TopKCodec(fraction)
    raise CodecError(f"unknown codec {name!r}; known: {', '.join(codec_names())}")
