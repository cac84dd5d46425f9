"""A delta in wire form, and client-side error feedback for lossy codecs."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import numpy as np

from fedsync.codecs._base import (
    Codec,
    Payload,
    TensorSpec,
)
from fedsync.codecs._registry import get_codec


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

    def accumulate_into(self, weight: float, acc: dict[str, np.ndarray], flat: np.ndarray | None = None) -> None:
        self.codec.accumulate_into(self.specs, self.payload, weight, acc, flat)


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
