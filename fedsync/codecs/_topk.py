"""Top-k sparse sections: the largest-magnitude fraction of values, the rest 0."""

from __future__ import annotations

import math

import numpy as np

from fedsync.codecs._base import (
    _F32,
    _U4,
    Codec,
    CodecError,
    TensorSpec,
    _view,
)


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
