"""Aggregation rules and their composition.

A rule turns buffered updates plus one weight per update into one aggregated
delta. Preprocessing stages such as :class:`norm_clipping` compose in front of
a final reducer with ``|``, tenacity style::

    rule = norm_clipping(max_norm=5.0) | trimmed_mean(beta=0.1)

A stage used alone (or a chain of stages only) reduces with :class:`weighted_mean`.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Literal

import numpy as np

from ._update import (
    ScaledDelta,
    Update,
    accumulate,
    check_same_tensors,
    check_weights,
    global_norm,
)


class AggregationRule(ABC):
    """Reduces updates to one delta: ``aggregate(updates, weights) -> delta``."""

    @property
    def min_updates(self) -> int:
        """Fewest updates this rule is defined for."""
        return 1

    @abstractmethod
    def aggregate(self, updates: Sequence[Update], weights: np.ndarray | Sequence[float]) -> dict[str, np.ndarray]: ...

    def __or__(self, other: object) -> AggregationRule:
        raise TypeError(
            f"{self!r} is a final reducer and must come last; only preprocessing "
            f"stages such as norm_clipping(...) can be placed before '|'"
        )


class Preprocessor(AggregationRule):
    """A stage that rewrites updates before a reducer sees them."""

    @abstractmethod
    def transform(self, updates: Sequence[Update]) -> list[Update]: ...

    def aggregate(self, updates: Sequence[Update], weights: np.ndarray | Sequence[float]) -> dict[str, np.ndarray]:
        return Pipeline((self,)).aggregate(updates, weights)

    def __or__(self, other: object) -> AggregationRule:
        return Pipeline((self,)) | other


@dataclass(frozen=True)
class Pipeline(AggregationRule):
    """Preprocessing ``stages`` applied in order, then ``reducer`` (default weighted_mean)."""

    stages: tuple[Preprocessor, ...]
    reducer: AggregationRule | None = None

    @property
    def min_updates(self) -> int:
        return self._final().min_updates

    def aggregate(self, updates: Sequence[Update], weights: np.ndarray | Sequence[float]) -> dict[str, np.ndarray]:
        staged = list(updates)
        for stage in self.stages:
            staged = stage.transform(staged)
        return self._final().aggregate(staged, weights)

    def _final(self) -> AggregationRule:
        return self.reducer if self.reducer is not None else weighted_mean()

    def __or__(self, other: object) -> AggregationRule:
        if self.reducer is not None:
            return super().__or__(other)
        if isinstance(other, Pipeline):
            return Pipeline(self.stages + other.stages, other.reducer)
        if isinstance(other, Preprocessor):
            return Pipeline((*self.stages, other))
        if isinstance(other, AggregationRule):
            return Pipeline(self.stages, other)
        return NotImplemented

    def __repr__(self) -> str:
        parts = [*self.stages, *([self.reducer] if self.reducer is not None else [])]
        return " | ".join(repr(part) for part in parts)


@dataclass(frozen=True)
class weighted_mean(AggregationRule):
    """``sum(w_i * delta_i) / sum(w_i)``, streamed one update at a time.

    Each update (plain or encoded) is added into one preallocated
    accumulator per tensor, so memory stays at one model plus one chunk of
    scratch however many updates there are. ``precision="float64"`` trades
    speed for a float64 accumulator; the result is float32 either way.
    """

    precision: Literal["float32", "float64"] = "float32"

    def aggregate(self, updates: Sequence[Update], weights: np.ndarray | Sequence[float]) -> dict[str, np.ndarray]:
        shapes = check_same_tensors(updates)
        weights = check_weights(weights, len(updates))
        total = float(weights.sum())
        if total <= 0:
            raise ValueError("weighted_mean needs a positive total weight")
        # One accumulator, each tensor a view of it, so a payload can be added in one go.
        flat = np.zeros(sum(math.prod(shape) for shape in shapes.values()), dtype=self.precision)
        acc: dict[str, np.ndarray] = {}
        offset = 0
        for name, shape in shapes.items():
            size = math.prod(shape)
            acc[name] = flat[offset : offset + size].reshape(shape)
            offset += size
        for update, weight in zip(updates, weights, strict=True):
            if weight > 0:
                accumulate(update.delta, float(weight) / total, acc, flat)
        return {name: tensor.astype(np.float32, copy=False) for name, tensor in acc.items()}


@dataclass(frozen=True)
class norm_clipping(Preprocessor):
    """Scales each update's delta down to global L2 norm ``max_norm`` if it is larger.

    The norm is taken over all tensors as one flat vector. Clipping is lazy
    (the delta is wrapped with a scale factor), so encoded deltas stay encoded.
    """

    max_norm: float

    def __post_init__(self) -> None:
        if not self.max_norm > 0:
            raise ValueError(f"max_norm must be > 0, got {self.max_norm}")

    def transform(self, updates: Sequence[Update]) -> list[Update]:
        clipped = []
        for update in updates:
            norm = global_norm(update.delta)
            if norm > self.max_norm:
                update = replace(update, delta=ScaledDelta(update.delta, self.max_norm / norm))
            clipped.append(update)
        return clipped
