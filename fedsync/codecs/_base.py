"""The section layout every codec shares: specs, the Codec base class, scratch buffers, add_scaled."""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

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
    #: True when a section's size follows from its spec alone, never from the payload's bytes:
    #: then the layout of one tuple of specs is worked out once (see _layout).
    fixed_sections: ClassVar[bool] = False

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
        flat: np.ndarray | None = None,
    ) -> None:
        """``acc[name] += weight * decoded[name]`` for every spec, one tensor at a time.

        ``flat``: an array whose consecutive parts, in ``acc``'s order, are ``acc``'s tensors
        (views of it). When the specs come in that order too, a codec that decodes value by value
        may update it in one go: the same arithmetic on every value, fewer calls.
        """
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
        if (
            flat is not None
            and len(sections) == len(acc)
            and all(section.spec.name == name for section, name in zip(sections, acc, strict=True))
            and self._accumulate_whole(buf, weight, flat)
        ):
            return
        for section in sections:
            self._accumulate_section(section.spec, buf, section.offset, weight, acc[section.spec.name])

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
        if not self.fixed_sections or not isinstance(specs, tuple):
            return buf, self._sections(specs, buf)
        # Keyed by identity (the cache holds the tuple, so its id is not reused): deltas parsed
        # from the same specs JSON share one tuple (coordinator.aggregator.encoded_delta).
        cache: dict[int, tuple[tuple[TensorSpec, ...], int, list[_Section]]] = self.__dict__.setdefault("_layouts", {})
        known = cache.get(id(specs))
        if known is None or known[0] is not specs or known[1] != buf.size:
            sections = self._sections(specs, buf)
            if len(cache) >= 64:
                cache.clear()
            cache[id(specs)] = (specs, buf.size, sections)
            return buf, sections
        sections = known[2]
        if type(self)._check_section is not Codec._check_section:
            for section in sections:  # what _sections checks of the bytes themselves
                try:
                    self._check_section(section.spec, buf, section.offset)
                except CodecError as exc:
                    raise CodecError(f"tensor {section.spec.name!r}: {exc}") from None
        return buf, sections

    def _sections(self, specs: Sequence[TensorSpec], buf: np.ndarray) -> list[_Section]:
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
        return sections

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

    def _accumulate_whole(self, buf: np.ndarray, weight: float, flat: np.ndarray) -> bool:
        """``flat += weight * decoded payload``, all tensors at once, when the codec can (a
        validated payload); False when it cannot, and then it did nothing."""
        return False


def _view(buf: np.ndarray, dtype: np.dtype, offset: int, count: int) -> np.ndarray:
    return np.frombuffer(buf, dtype=dtype, count=count, offset=offset)
