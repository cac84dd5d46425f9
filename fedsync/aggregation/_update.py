"""Updates and the delta forms they may carry (plain tensors or encoded payloads)."""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from fedsync.codecs import EncodedDelta, add_scaled


@dataclass(frozen=True, eq=False)
class ScaledDelta:
    """``factor * source``, kept lazy so encoded deltas stay encoded."""

    source: Delta
    factor: float


Delta = Mapping[str, np.ndarray] | EncodedDelta | ScaledDelta


@dataclass(frozen=True, eq=False)
class Update:
    """One client's contribution to an aggregation round.

    ``staleness`` is how many global versions were published between the
    version the client trained on and the one it is aggregated into.
    """

    delta: Delta
    num_examples: int
    staleness: int = 0
    device_id: str = ""

    def __post_init__(self) -> None:
        if self.num_examples < 0:
            raise ValueError(f"num_examples must be >= 0, got {self.num_examples}")
        if self.staleness < 0:
            raise ValueError(f"staleness must be >= 0, got {self.staleness}")


def _unscaled(delta: Delta) -> tuple[Mapping[str, np.ndarray] | EncodedDelta, float]:
    factor = 1.0
    while isinstance(delta, ScaledDelta):
        factor *= delta.factor
        delta = delta.source
    return delta, factor


def delta_shapes(delta: Delta) -> dict[str, tuple[int, ...]]:
    source, _ = _unscaled(delta)
    if isinstance(source, EncodedDelta):
        return source.shapes()
    return {name: np.shape(tensor) for name, tensor in source.items()}


def iter_tensors(delta: Delta) -> Iterator[tuple[str, np.ndarray]]:
    """Yield ``(name, float32 tensor)`` one at a time; tensors may be read-only views."""
    source, factor = _unscaled(delta)
    pairs = source.iter_decode() if isinstance(source, EncodedDelta) else source.items()
    for name, tensor in pairs:
        array = np.asarray(tensor, dtype=np.float32)
        yield name, array if factor == 1.0 else array * np.float32(factor)


def materialize(delta: Delta) -> dict[str, np.ndarray]:
    return dict(iter_tensors(delta))


def accumulate(delta: Delta, weight: float, acc: dict[str, np.ndarray], flat: np.ndarray | None = None) -> None:
    """``acc[name] += weight * delta[name]`` one tensor at a time, decoding lazily. ``flat``: the
    array whose consecutive views, in order, ``acc``'s tensors are (see Codec.accumulate_into)."""
    source, factor = _unscaled(delta)
    if isinstance(source, EncodedDelta):
        source.accumulate_into(weight * factor, acc, flat)
        return
    for name, tensor in source.items():
        add_scaled(acc[name], np.asarray(tensor), weight * factor)


def squared_norm(tensor: np.ndarray) -> float:
    """Squared L2 norm; ``inf``/``nan`` when ``tensor`` holds a non-finite value."""
    flat = tensor.reshape(-1)
    with np.errstate(over="ignore", invalid="ignore"):
        total = float(np.dot(flat, flat))
    if math.isinf(total) and np.isfinite(flat).all():
        # float32 accumulation overflowed on finite values: redo in float64.
        total = float(np.dot(flat.astype(np.float64), flat.astype(np.float64)))
    return total


def global_norm(delta: Delta) -> float:
    """L2 norm over all tensors of ``delta`` taken as one flat vector."""
    return math.sqrt(sum(squared_norm(tensor) for _, tensor in iter_tensors(delta)))


def check_same_tensors(updates: Sequence[Update]) -> dict[str, tuple[int, ...]]:
    """Return the common tensor shapes, or raise ValueError naming the odd update."""
    if not updates:
        raise ValueError("cannot aggregate zero updates")
    shapes = delta_shapes(updates[0].delta)
    for update in updates[1:]:
        other = delta_shapes(update.delta)
        if other != shapes:
            raise ValueError(
                f"update from {update.device_id or '<unknown device>'} has tensors {other}, expected {shapes}"
            )
    return shapes


def check_weights(weights: np.ndarray | Sequence[float], count: int) -> np.ndarray:
    array = np.asarray(weights, dtype=np.float64).reshape(-1)
    if array.size != count:
        raise ValueError(f"got {array.size} weights for {count} updates")
    if not (np.isfinite(array).all() and (array >= 0).all()):
        raise ValueError(f"weights must be finite and >= 0, got {array}")
    return array
