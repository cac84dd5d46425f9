"""Byzantine-robust reducers: coordinate-wise median, trimmed mean, Krum, Multi-Krum.

Unlike :class:`weighted_mean` these need every update at once, so encoded
deltas are decoded in full (one float32 copy per update; plain float32
deltas are used in place).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ._rules import AggregationRule, weighted_mean
from ._update import Update, check_same_tensors, check_weights, materialize

# Columns per float64 block when building the Krum Gram matrix (bounds memory).
_GRAM_COLUMNS = 64 * 1024


def _stacked(updates: Sequence[Update]) -> tuple[dict[str, tuple[int, ...]], list[dict]]:
    shapes = check_same_tensors(updates)
    return shapes, [materialize(update.delta) for update in updates]


@dataclass(frozen=True)
class coordinate_median(AggregationRule):
    """Per-coordinate median of the deltas (mean of the two middle values for even n).

    Weights are ignored: every update counts once.
    """

    def aggregate(self, updates: Sequence[Update], weights: np.ndarray | Sequence[float]) -> dict[str, np.ndarray]:
        check_weights(weights, len(updates))
        shapes, deltas = _stacked(updates)
        return {name: np.median(np.stack([d[name] for d in deltas]), axis=0).astype(np.float32) for name in shapes}


@dataclass(frozen=True)
class trimmed_mean(AggregationRule):
    """Per coordinate, drop the ``floor(beta * n)`` largest and smallest values, average the rest.

    Weights are ignored: every update counts once.
    """

    beta: float = 0.1

    def __post_init__(self) -> None:
        if not 0 <= self.beta < 0.5:
            raise ValueError(f"beta must be in [0, 0.5), got {self.beta}")

    def aggregate(self, updates: Sequence[Update], weights: np.ndarray | Sequence[float]) -> dict[str, np.ndarray]:
        check_weights(weights, len(updates))
        shapes, deltas = _stacked(updates)
        n = len(deltas)
        trim = math.floor(self.beta * n)
        result = {}
        for name in shapes:
            stack = np.stack([d[name] for d in deltas])
            if trim:
                # Partitioning at both cut points leaves exactly the kept values in between.
                stack = np.partition(stack, (trim, n - trim - 1), axis=0)[trim : n - trim]
            result[name] = stack.mean(axis=0, dtype=np.float64).astype(np.float32)
        return result


def krum_scores(updates: Sequence[Update], f: int) -> np.ndarray:
    """Krum score per update: sum of squared L2 distances to its ``n - f - 2`` nearest others.

    Distances are over the flattened concatenation of all tensors, computed
    from a float64 Gram matrix built one tensor at a time.
    """
    n = len(updates)
    if n < 2 * f + 3:
        raise ValueError(f"Krum with f={f} needs at least {2 * f + 3} updates, got {n}")
    shapes, deltas = _stacked(updates)
    gram = np.zeros((n, n), dtype=np.float64)
    for name in shapes:
        flats = [d[name].reshape(-1) for d in deltas]
        for start in range(0, flats[0].size, _GRAM_COLUMNS):
            block = np.stack([flat[start : start + _GRAM_COLUMNS] for flat in flats])
            block = block.astype(np.float64)
            gram += block @ block.T
    sq_norms = np.diag(gram)
    distances = np.maximum(sq_norms[:, None] + sq_norms[None, :] - 2.0 * gram, 0.0)
    np.fill_diagonal(distances, np.inf)
    nearest = np.sort(distances, axis=1)[:, : n - f - 2]
    return nearest.sum(axis=1)


@dataclass(frozen=True)
class krum(AggregationRule):
    """Returns the single delta with the lowest Krum score (ties: first one).

    Tolerates up to ``f`` Byzantine updates out of ``n >= 2f + 3``. Weights are ignored.
    """

    f: int = 1

    def __post_init__(self) -> None:
        if self.f < 0:
            raise ValueError(f"f must be >= 0, got {self.f}")

    @property
    def min_updates(self) -> int:
        return 2 * self.f + 3

    def aggregate(self, updates: Sequence[Update], weights: np.ndarray | Sequence[float]) -> dict[str, np.ndarray]:
        check_weights(weights, len(updates))
        best = int(np.argmin(krum_scores(updates, self.f)))
        return {name: np.array(tensor, dtype=np.float32) for name, tensor in materialize(updates[best].delta).items()}


@dataclass(frozen=True)
class multi_krum(AggregationRule):
    """Averages the ``m`` deltas with the lowest Krum scores (scores computed once).

    The average is weighted by the given weights, renormalized over the
    selected updates; pass equal weights for the unweighted original.
    ``m=None`` selects ``n - f``.
    """

    f: int = 1
    m: int | None = None

    def __post_init__(self) -> None:
        if self.f < 0:
            raise ValueError(f"f must be >= 0, got {self.f}")
        if self.m is not None and self.m < 1:
            raise ValueError(f"m must be >= 1, got {self.m}")

    @property
    def min_updates(self) -> int:
        return max(2 * self.f + 3, self.m or 1)

    def aggregate(self, updates: Sequence[Update], weights: np.ndarray | Sequence[float]) -> dict[str, np.ndarray]:
        weights = check_weights(weights, len(updates))
        m = len(updates) - self.f if self.m is None else self.m
        if m > len(updates):
            raise ValueError(f"cannot select m={m} of {len(updates)} updates")
        chosen = np.argsort(krum_scores(updates, self.f), kind="stable")[:m]
        return weighted_mean().aggregate([updates[i] for i in chosen], weights[chosen])
