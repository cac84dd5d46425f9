"""Wire codecs for model deltas.

A delta travels as a list of :class:`TensorSpec` plus one ``bytes`` payload.
The payload is the concatenation of one *section* per spec, in spec order,
little-endian, with no header and no padding; each codec defines its section:

``float32``       ``n`` x ``<f4``
``float16``       ``n`` x ``<f2``
``int8``          one ``<f4`` scale, then ``n`` x ``i1``; value = q * scale
``int8-channel``  ``C`` x ``<f4`` scales (``C`` = last axis, 1 for scalars),
                  then ``n`` x ``i1`` in C order; value = q * scale[last index]
``topk:<frac>``   ``<u4`` count ``k``, ``k`` x ``<u4`` strictly increasing flat
                  indices, ``k`` x ``<f4`` values; every other value is 0

``n`` is the element count of the spec's shape and ``TensorSpec.dtype`` is the
dtype of the decoded tensor (always ``"float32"``). A payload is validated in
full (length, counts, indices, scales) before anything is decoded or
accumulated, so a bad payload raises :class:`CodecError` and never leaves an
accumulator half-updated.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import ClassVar

import numpy as np

__all__ = [
    "Codec",
    "CodecError",
    "EncodedDelta",
    "ErrorFeedback",
    "TensorSpec",
    "add_scaled",
    "codec_names",
    "get_codec",
]

Payload = bytes | bytearray | memoryview

# Elements per chunk in add_scaled. Smaller chunks stay in L2 but pay more
# per-call overhead; 1 MiB of float32 scratch measured fastest on 1M-float tensors.
_CHUNK = 256 * 1024
_F32 = np.dtype("<f4")
_F16 = np.dtype("<f2")
_U4 = np.dtype("<u4")
_I1 = np.dtype("i1")
_U2 = np.dtype("<u2")
_I2 = np.dtype("<i2")
_F16_MAX = float(np.finfo(np.float16).max)
_F16_EXPONENT = np.uint16(0x7C00)
_F32_SIGN_AND_LOW_28_BITS = np.int32(-0x70000001)  # 0x8FFFFFFF as int32


_scratch_buffers = threading.local()


def _scratch(dtype: np.dtype | type, size: int) -> np.ndarray:
    """A reusable per-thread buffer of ``size`` elements.

    Allocating a fresh MiB-sized buffer per tensor per update costs page
    faults comparable to the arithmetic itself, so each thread keeps one
    buffer per dtype. Callers must not hold it across another _scratch call
    for the same dtype.
    """
    dtype = np.dtype(dtype)
    buffers: dict[str, np.ndarray] = _scratch_buffers.__dict__.setdefault("by_dtype", {})
    buffer = buffers.get(dtype.str)
    if buffer is None or buffer.size < size:
        buffer = buffers[dtype.str] = np.empty(max(size, _CHUNK), dtype=dtype)
    return buffer[:size]


class CodecError(ValueError):
    """A codec name, tensor or payload that cannot be encoded or decoded."""


@dataclass(frozen=True)
class TensorSpec:
    """Name, shape and decoded dtype of one tensor in a payload."""

    name: str
    shape: tuple[int, ...]
    dtype: str = "float32"

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(int(d) for d in self.shape))

    @property
    def size(self) -> int:
        return math.prod(self.shape)


def add_scaled(acc: np.ndarray, x: np.ndarray, weight: float) -> None:
    """``acc += weight * x`` in place, without a full-size temporary.

    ``acc`` must be a contiguous floating array; ``x`` any real array of the
    same size (int8, float16 and float64 are converted chunk by chunk).
    """
    if not acc.flags.c_contiguous or acc.dtype.kind != "f":
        raise ValueError("accumulator must be a C-contiguous floating array")
    acc_flat = acc.reshape(-1)
    x_flat = x.reshape(-1)
    if acc_flat.size != x_flat.size:
        raise ValueError(f"size mismatch: acc has {acc_flat.size}, x has {x_flat.size}")
    if weight == 1.0 and x_flat.dtype == acc_flat.dtype:
        np.add(acc_flat, x_flat, out=acc_flat)
        return
    w = acc_flat.dtype.type(weight)
    scratch = _scratch(acc_flat.dtype, min(_CHUNK, acc_flat.size))
    for start in range(0, acc_flat.size, _CHUNK):
        stop = min(start + _CHUNK, acc_flat.size)
        part = scratch[: stop - start]
        np.multiply(x_flat[start:stop], w, out=part, dtype=acc_flat.dtype)
        np.add(acc_flat[start:stop], part, out=acc_flat[start:stop])


@dataclass(frozen=True)
class _Section:
    spec: TensorSpec
    offset: int
    nbytes: int


class Codec:
    """Base class: encodes float tensors to one payload and back.

    Subclasses define one section per tensor through ``_encode_tensor``,
    ``_section_size``, ``_check_section``, ``_decode_section`` and
    ``_accumulate_section``; this class handles ordering and validation.
    """

    name: str = ""
    #: True when decode(encode(x)) == x exactly (error feedback is then a no-op).
    lossless: ClassVar[bool] = False

    def encode(self, tensors: Mapping[str, np.ndarray]) -> tuple[list[TensorSpec], bytes]:
        specs: list[TensorSpec] = []
        parts: list[bytes] = []
        for name, tensor in tensors.items():
            array = np.asarray(tensor)
            if array.dtype.kind not in "fiu":
                raise CodecError(f"tensor {name!r}: cannot encode dtype {array.dtype}")
            array = np.asarray(array, dtype=np.float32, order="C")
            specs.append(TensorSpec(name, array.shape))
            try:
                parts.append(self._encode_tensor(array))
            except CodecError as exc:
                raise CodecError(f"tensor {name!r}: {exc}") from None
        return specs, b"".join(parts)

    def decode(self, specs: Sequence[TensorSpec], payload: Payload) -> dict[str, np.ndarray]:
        """Decode every tensor to a fresh, writable float32 array."""
        return {name: np.array(view, dtype=np.float32) for name, view in self.iter_decode(specs, payload)}

    def iter_decode(self, specs: Sequence[TensorSpec], payload: Payload) -> Iterator[tuple[str, np.ndarray]]:
        """Yield ``(name, float32 tensor)`` one at a time (may be read-only views)."""
        buf, sections = self._layout(specs, payload)
        for section in sections:
            yield section.spec.name, self._decode_section(section.spec, buf, section.offset)

    def accumulate_into(
        self,
        specs: Sequence[TensorSpec],
        payload: Payload,
        weight: float,
        acc: dict[str, np.ndarray],
    ) -> None:
        """``acc[name] += weight * decoded[name]`` for every spec, one tensor at a time."""
        if not math.isfinite(weight):
            raise CodecError(f"weight must be finite, got {weight}")
        buf, sections = self._layout(specs, payload)
        for section in sections:
            spec = section.spec
            target = acc.get(spec.name)
            if target is None:
                raise CodecError(f"no accumulator for tensor {spec.name!r}")
            if target.shape != spec.shape:
                raise CodecError(f"accumulator for {spec.name!r} has shape {target.shape}, payload has {spec.shape}")
            self._accumulate_section(spec, buf, section.offset, weight, target)

    def encoded_size(self, specs: Sequence[TensorSpec], payload: Payload) -> int:
        """Validate ``payload`` against ``specs`` and return its length."""
        buf, _ = self._layout(specs, payload)
        return buf.size

    def __repr__(self) -> str:
        return f"get_codec({self.name!r})"

    # -- layout and validation ------------------------------------------

    def _layout(self, specs: Sequence[TensorSpec], payload: Payload) -> tuple[np.ndarray, list[_Section]]:
        try:
            buf = np.frombuffer(payload, dtype=np.uint8)
        except (TypeError, ValueError) as exc:
            raise CodecError(f"payload is not a byte buffer: {exc}") from None
        sections: list[_Section] = []
        seen: set[str] = set()
        offset = 0
        for spec in specs:
            if spec.name in seen:
                raise CodecError(f"duplicate tensor name {spec.name!r} in specs")
            seen.add(spec.name)
            if spec.dtype != "float32":
                raise CodecError(f"tensor {spec.name!r}: unsupported dtype {spec.dtype!r}")
            if any(d < 0 for d in spec.shape):
                raise CodecError(f"tensor {spec.name!r}: negative dimension in {spec.shape}")
            nbytes = self._section_size(spec, buf, offset)
            if offset + nbytes > buf.size:
                raise CodecError(
                    f"{self.name} payload too short: tensor {spec.name!r} needs bytes "
                    f"{offset}..{offset + nbytes}, payload has {buf.size}"
                )
            try:
                self._check_section(spec, buf, offset)
            except CodecError as exc:
                raise CodecError(f"tensor {spec.name!r}: {exc}") from None
            sections.append(_Section(spec, offset, nbytes))
            offset += nbytes
        if offset != buf.size:
            raise CodecError(f"{self.name} payload has {buf.size} bytes, specs describe {offset}")
        return buf, sections

    # -- per-codec hooks --------------------------------------------------

    def _encode_tensor(self, array: np.ndarray) -> bytes:
        raise NotImplementedError

    def _section_size(self, spec: TensorSpec, buf: np.ndarray, offset: int) -> int:
        raise NotImplementedError

    def _check_section(self, spec: TensorSpec, buf: np.ndarray, offset: int) -> None:
        """Raise CodecError if the (in-bounds) section holds invalid values."""

    def _decode_section(self, spec: TensorSpec, buf: np.ndarray, offset: int) -> np.ndarray:
        raise NotImplementedError

    def _accumulate_section(
        self, spec: TensorSpec, buf: np.ndarray, offset: int, weight: float, acc: np.ndarray
    ) -> None:
        add_scaled(acc, self._decode_section(spec, buf, offset), weight)


def _view(buf: np.ndarray, dtype: np.dtype, offset: int, count: int) -> np.ndarray:
    return np.frombuffer(buf, dtype=dtype, count=count, offset=offset)


class _RawCodec(Codec):
    """Values stored as-is in a fixed float dtype."""

    wire_dtype: ClassVar[np.dtype]

    def _section_size(self, spec: TensorSpec, buf: np.ndarray, offset: int) -> int:
        return spec.size * self.wire_dtype.itemsize

    def _decode_section(self, spec: TensorSpec, buf: np.ndarray, offset: int) -> np.ndarray:
        values = _view(buf, self.wire_dtype, offset, spec.size).reshape(spec.shape)
        return values if self.wire_dtype == _F32 else values.astype(np.float32)

    def _accumulate_section(
        self, spec: TensorSpec, buf: np.ndarray, offset: int, weight: float, acc: np.ndarray
    ) -> None:
        add_scaled(acc, _view(buf, self.wire_dtype, offset, spec.size), weight)


class _Float32Codec(_RawCodec):
    name = "float32"
    lossless = True
    wire_dtype = _F32

    def _encode_tensor(self, array: np.ndarray) -> bytes:
        return array.astype(_F32, copy=False).tobytes()


class _Float16Codec(_RawCodec):
    """IEEE half precision; payloads holding inf or nan are rejected as invalid."""

    name = "float16"
    wire_dtype = _F16

    def _encode_tensor(self, array: np.ndarray) -> bytes:
        if array.size and not np.isfinite(array).all():
            raise CodecError("float16 codec needs finite values")
        if array.size and float(np.abs(array).max()) > _F16_MAX:
            raise CodecError(f"values exceed the float16 range (±{_F16_MAX:g}); use float32")
        return array.astype(_F16).tobytes()

    def _check_section(self, spec: TensorSpec, buf: np.ndarray, offset: int) -> None:
        bits = _view(buf, _U2, offset, spec.size)
        exponents = _scratch(_U2, min(_CHUNK, bits.size))
        for start in range(0, bits.size, _CHUNK):
            part = exponents[: min(_CHUNK, bits.size - start)]
            np.bitwise_and(bits[start : start + _CHUNK], _F16_EXPONENT, out=part)
            if part.max() == _F16_EXPONENT:
                raise CodecError("float16 payload holds inf or nan")

    def _accumulate_section(
        self, spec: TensorSpec, buf: np.ndarray, offset: int, weight: float, acc: np.ndarray
    ) -> None:
        halves = _view(buf, _I2, offset, spec.size)
        # numpy's float16 -> float32 cast runs at ~2 ns/value. Moving a half's
        # sign, exponent and mantissa bits into float32 position instead gives
        # exactly value * 2**-112 (subnormals included), so one multiply by
        # weight * 2**112 finishes the conversion ~4x faster. Valid because
        # _check_section has ruled out inf/nan (exponent 31).
        scale = weight * 2.0**112
        if abs(scale) > float(np.finfo(acc.dtype).max) or halves.size == 0:
            add_scaled(acc, halves.view(_F16), weight)
            return
        scale = acc.dtype.type(scale)
        acc_flat = acc.reshape(-1)
        wide = _scratch(np.int32, min(_CHUNK, halves.size))
        scratch = wide.view(np.float32) if acc.dtype == np.float32 else _scratch(acc.dtype, wide.size)
        for start in range(0, halves.size, _CHUNK):
            stop = min(start + _CHUNK, halves.size)
            bits, values = wide[: stop - start], scratch[: stop - start]
            np.copyto(bits, halves[start:stop])  # sign-extends bit 15 into bits 16..31
            np.left_shift(bits, 13, out=bits)
            np.bitwise_and(bits, _F32_SIGN_AND_LOW_28_BITS, out=bits)
            np.multiply(bits.view(np.float32), scale, out=values)
            np.add(acc_flat[start:stop], values, out=acc_flat[start:stop])


def _quantize(values: np.ndarray, scale: np.ndarray) -> np.ndarray:
    safe = np.where(scale > 0, scale, np.float32(1))
    return np.clip(np.rint(values / safe), -127, 127).astype(_I1)


def _scales_for(amax: np.ndarray) -> np.ndarray:
    if not np.isfinite(amax).all():
        raise CodecError("int8 codecs need finite values")
    return (amax / np.float32(127)).astype(_F32)


def _check_scales(scales: np.ndarray) -> None:
    if not (np.isfinite(scales).all() and (scales >= 0).all()):
        bad = scales[~(np.isfinite(scales) & (scales >= 0))][0]
        raise CodecError(f"bad int8 scale {bad!r}: must be finite and >= 0")


class _Int8Codec(Codec):
    """Symmetric int8 with one scale per tensor: max |x| maps to 127."""

    name = "int8"

    def _encode_tensor(self, array: np.ndarray) -> bytes:
        amax = np.abs(array).max(initial=0.0)
        scale = _scales_for(np.asarray(amax, dtype=np.float32).reshape(1))
        return scale.tobytes() + _quantize(array, scale[0]).tobytes()

    def _section_size(self, spec: TensorSpec, buf: np.ndarray, offset: int) -> int:
        return _F32.itemsize + spec.size

    def _check_section(self, spec: TensorSpec, buf: np.ndarray, offset: int) -> None:
        _check_scales(_view(buf, _F32, offset, 1))

    def _decode_section(self, spec: TensorSpec, buf: np.ndarray, offset: int) -> np.ndarray:
        scale = _view(buf, _F32, offset, 1)[0]
        q = _view(buf, _I1, offset + _F32.itemsize, spec.size)
        return np.multiply(q, scale, dtype=np.float32).reshape(spec.shape)

    def _accumulate_section(
        self, spec: TensorSpec, buf: np.ndarray, offset: int, weight: float, acc: np.ndarray
    ) -> None:
        scale = float(_view(buf, _F32, offset, 1)[0])
        q = _view(buf, _I1, offset + _F32.itemsize, spec.size)
        add_scaled(acc, q, weight * scale)


def _channels(spec_shape: tuple[int, ...]) -> int:
    return spec_shape[-1] if spec_shape else 1


class _Int8ChannelCodec(Codec):
    """Symmetric int8 with one scale per output channel (the last axis)."""

    name = "int8-channel"

    def _encode_tensor(self, array: np.ndarray) -> bytes:
        channels = _channels(array.shape)
        rows = array.reshape(-1, channels) if channels else array.reshape(0, 0)
        amax = np.abs(rows).max(axis=0, initial=0.0).astype(np.float32)
        scales = _scales_for(amax)
        return scales.tobytes() + _quantize(rows, scales).tobytes()

    def _section_size(self, spec: TensorSpec, buf: np.ndarray, offset: int) -> int:
        return _channels(spec.shape) * _F32.itemsize + spec.size

    def _check_section(self, spec: TensorSpec, buf: np.ndarray, offset: int) -> None:
        _check_scales(_view(buf, _F32, offset, _channels(spec.shape)))

    def _split(self, spec: TensorSpec, buf: np.ndarray, offset: int) -> tuple[np.ndarray, np.ndarray]:
        channels = _channels(spec.shape)
        scales = _view(buf, _F32, offset, channels)
        q = _view(buf, _I1, offset + channels * _F32.itemsize, spec.size)
        return scales, q.reshape(-1, channels) if channels else q.reshape(0, 0)

    def _decode_section(self, spec: TensorSpec, buf: np.ndarray, offset: int) -> np.ndarray:
        scales, q = self._split(spec, buf, offset)
        return np.multiply(q, scales, dtype=np.float32).reshape(spec.shape)

    def _accumulate_section(
        self, spec: TensorSpec, buf: np.ndarray, offset: int, weight: float, acc: np.ndarray
    ) -> None:
        scales, q = self._split(spec, buf, offset)
        if q.size == 0:
            return
        row_scale = scales * acc.dtype.type(weight)
        acc_rows = acc.reshape(q.shape)
        step = max(1, _CHUNK // q.shape[1])
        rows = min(step, q.shape[0])
        scratch = _scratch(acc.dtype, rows * q.shape[1]).reshape(rows, q.shape[1])
        for start in range(0, q.shape[0], step):
            stop = min(start + step, q.shape[0])
            part = scratch[: stop - start]
            np.multiply(q[start:stop], row_scale, out=part, dtype=acc.dtype)
            np.add(acc_rows[start:stop], part, out=acc_rows[start:stop])


class _TopKCodec(Codec):
    """Keeps the ``ceil(fraction * n)`` largest-magnitude entries of each tensor."""

    def __init__(self, fraction: float) -> None:
        if not (0.0 < fraction <= 1.0):
            raise CodecError(f"topk fraction must be in (0, 1], got {fraction}")
        self.fraction = fraction
        self.name = f"topk:{fraction:g}"

    def keep_count(self, size: int) -> int:
        return 0 if size == 0 else min(size, max(1, math.ceil(self.fraction * size)))

    def _encode_tensor(self, array: np.ndarray) -> bytes:
        flat = array.reshape(-1)
        if flat.size >= 2**32:
            raise CodecError("topk codec supports tensors of fewer than 2**32 elements")
        k = self.keep_count(flat.size)
        if k == flat.size:
            indices = np.arange(k)
        else:
            indices = np.sort(np.argpartition(np.abs(flat), flat.size - k)[flat.size - k :])
        return np.array([k], dtype=_U4).tobytes() + indices.astype(_U4).tobytes() + flat[indices].astype(_F32).tobytes()

    def _count(self, buf: np.ndarray, offset: int) -> int:
        if offset + _U4.itemsize > buf.size:
            raise CodecError(f"{self.name} payload truncated before a count at byte {offset}")
        return int(_view(buf, _U4, offset, 1)[0])

    def _section_size(self, spec: TensorSpec, buf: np.ndarray, offset: int) -> int:
        k = self._count(buf, offset)
        if k > spec.size:
            raise CodecError(f"tensor {spec.name!r}: count {k} exceeds its {spec.size} elements")
        return _U4.itemsize + k * (_U4.itemsize + _F32.itemsize)

    def _split(self, buf: np.ndarray, offset: int) -> tuple[np.ndarray, np.ndarray]:
        k = self._count(buf, offset)
        indices = _view(buf, _U4, offset + _U4.itemsize, k)
        values = _view(buf, _F32, offset + _U4.itemsize * (1 + k), k)
        return indices, values

    def _check_section(self, spec: TensorSpec, buf: np.ndarray, offset: int) -> None:
        indices, _ = self._split(buf, offset)
        if indices.size and int(indices[-1]) >= spec.size:
            raise CodecError(f"index {int(indices[-1])} out of range for {spec.size} elements")
        if indices.size > 1 and not (indices[1:] > indices[:-1]).all():
            raise CodecError("indices must be strictly increasing")

    def _decode_section(self, spec: TensorSpec, buf: np.ndarray, offset: int) -> np.ndarray:
        indices, values = self._split(buf, offset)
        dense = np.zeros(spec.size, dtype=np.float32)
        dense[indices] = values
        return dense.reshape(spec.shape)

    def _accumulate_section(
        self, spec: TensorSpec, buf: np.ndarray, offset: int, weight: float, acc: np.ndarray
    ) -> None:
        indices, values = self._split(buf, offset)
        flat = acc.reshape(-1)
        # Indices are validated unique, so fancy-index += is exact (no np.add.at needed).
        flat[indices] += values * flat.dtype.type(weight)


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


@dataclass(frozen=True, eq=False)
class EncodedDelta:
    """A delta still in wire form; decoded lazily, one tensor at a time."""

    codec_name: str
    specs: tuple[TensorSpec, ...]
    payload: Payload = field(repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "specs", tuple(self.specs))

    @classmethod
    def encode(cls, codec_name: str, tensors: Mapping[str, np.ndarray]) -> EncodedDelta:
        specs, payload = get_codec(codec_name).encode(tensors)
        return cls(codec_name, tuple(specs), payload)

    @property
    def codec(self) -> Codec:
        return get_codec(self.codec_name)

    @property
    def nbytes(self) -> int:
        return memoryview(self.payload).nbytes

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {spec.name: spec.shape for spec in self.specs}

    def check(self) -> None:
        """Raise CodecError unless the payload is valid for the specs."""
        self.codec.encoded_size(self.specs, self.payload)

    def decode(self) -> dict[str, np.ndarray]:
        return self.codec.decode(self.specs, self.payload)

    def iter_decode(self) -> Iterator[tuple[str, np.ndarray]]:
        return self.codec.iter_decode(self.specs, self.payload)

    def accumulate_into(self, weight: float, acc: dict[str, np.ndarray]) -> None:
        self.codec.accumulate_into(self.specs, self.payload, weight, acc)


class ErrorFeedback:
    """Client-side error feedback for lossy codecs.

    Each :meth:`encode` sends ``delta + residual`` and keeps what the codec
    lost as the next residual, so quantization error is not dropped but sent
    in later rounds. Residuals for tensors whose shape changed are reset.
    """

    def __init__(self, codec: Codec | str) -> None:
        self.codec = get_codec(codec) if isinstance(codec, str) else codec
        self._residual: dict[str, np.ndarray] = {}

    def encode(self, delta: Mapping[str, np.ndarray]) -> tuple[list[TensorSpec], bytes]:
        corrected: dict[str, np.ndarray] = {}
        for name, tensor in delta.items():
            value = np.array(tensor, dtype=np.float32)
            residual = self._residual.get(name)
            if residual is not None and residual.shape == value.shape:
                value += residual
            corrected[name] = value
        specs, payload = self.codec.encode(corrected)
        if self.codec.lossless:
            self._residual = {}
            return specs, payload
        for name, sent in self.codec.iter_decode(specs, payload):
            corrected[name] -= sent
        self._residual = corrected
        return specs, payload

    def state(self) -> dict[str, np.ndarray]:
        return {name: residual.copy() for name, residual in self._residual.items()}

    def load_state(self, state: Mapping[str, np.ndarray]) -> None:
        self._residual = {name: np.array(residual, dtype=np.float32) for name, residual in state.items()}

    def __repr__(self) -> str:
        return f"ErrorFeedback({self.codec!r})"
