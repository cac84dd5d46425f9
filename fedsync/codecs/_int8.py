"""int8 sections with one scale per tensor or per output channel."""

from __future__ import annotations

import numpy as np

from fedsync.codecs._base import (
    _CHUNK,
    _F32,
    _I1,
    Codec,
    CodecError,
    TensorSpec,
    _scratch,
    _view,
    add_scaled,
)


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
    fixed_sections = True

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
    fixed_sections = True

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
