"""Lossless float32 and lossy float16 sections."""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from fedsync.codecs._base import (
    _CHUNK,
    _F16,
    _F16_EXPONENT,
    _F16_MAX,
    _F32,
    _F32_SIGN_AND_LOW_28_BITS,
    _I2,
    _U2,
    Codec,
    CodecError,
    TensorSpec,
    _scratch,
    _view,
    add_scaled,
)


class _RawCodec(Codec):
    """Values stored as-is in a fixed float dtype."""

    wire_dtype: ClassVar[np.dtype]
    fixed_sections = True

    def _accumulate_whole(self, buf: np.ndarray, weight: float, flat: np.ndarray) -> bool:
        # The payload is one array of values, a tensor after the other, each decoded on its own.
        count = flat.size
        if buf.size != count * self.wire_dtype.itemsize:
            return False
        self._accumulate_section(TensorSpec("", (count,)), buf, 0, weight, flat)
        return True

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
