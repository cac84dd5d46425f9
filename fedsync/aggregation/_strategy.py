"""Strategy: when to aggregate, how much each update counts, and how to apply the result."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from ._optimizers import ServerOptimizer, server_sgd
from ._rules import AggregationRule, weighted_mean
from ._staleness import StalenessFunction, constant_staleness, polynomial_staleness
from ._update import Update


class Strategy:
    """A buffered (a)synchronous aggregation policy built from small parts.

    Each update is weighted ``num_examples * staleness(tau)``; updates older
    than ``max_staleness`` versions are refused. The coordinator buffers
    accepted updates and aggregates when ``buffer_size`` are waiting, or when
    the oldest has waited ``max_wait_s`` seconds. Synchronous FedAvg is the
    configuration :meth:`fedavg`; FedBuff is :meth:`fedbuff`.

    ``optimizer`` defaults to a fresh ``server_sgd(lr=1.0)``; a stateful
    optimizer must not be shared between strategies.
    """

    def __init__(
        self,
        rule: AggregationRule | None = None,
        staleness: StalenessFunction | None = None,
        max_staleness: int | None = None,
        optimizer: ServerOptimizer | None = None,
        buffer_size: int = 10,
        max_wait_s: float | None = None,
    ) -> None:
        self.rule = rule if rule is not None else weighted_mean()
        self.staleness = staleness if staleness is not None else constant_staleness()
        self.max_staleness = max_staleness
        self.optimizer = optimizer if optimizer is not None else server_sgd(lr=1.0)
        self.buffer_size = buffer_size
        self.max_wait_s = max_wait_s
        if max_staleness is not None and max_staleness < 0:
            raise ValueError(f"max_staleness must be >= 0 or None, got {max_staleness}")
        if buffer_size < 1:
            raise ValueError(f"buffer_size must be >= 1, got {buffer_size}")
        if max_wait_s is not None and not max_wait_s >= 0:
            raise ValueError(f"max_wait_s must be >= 0 or None, got {max_wait_s}")
        if buffer_size < self.rule.min_updates:
            raise ValueError(
                f"{self.rule!r} needs at least {self.rule.min_updates} updates but buffer_size is {buffer_size}"
            )

    @classmethod
    def fedavg(cls, num_clients: int) -> Strategy:
        """Synchronous FedAvg: wait for ``num_clients`` fresh updates, example-weighted mean."""
        return cls(
            rule=weighted_mean(),
            staleness=constant_staleness(),
            max_staleness=0,
            optimizer=server_sgd(lr=1.0),
            buffer_size=num_clients,
        )

    @classmethod
    def fedbuff(
        cls,
        buffer_size: int = 10,
        a: float = 0.5,
        max_staleness: int | None = None,
        lr: float = 1.0,
        max_wait_s: float | None = None,
    ) -> Strategy:
        """FedBuff: aggregate every ``buffer_size`` updates, discounted by ``(1 + tau) ** -a``."""
        return cls(
            rule=weighted_mean(),
            staleness=polynomial_staleness(a=a),
            max_staleness=max_staleness,
            optimizer=server_sgd(lr=lr),
            buffer_size=buffer_size,
            max_wait_s=max_wait_s,
        )

    def weight(self, update: Update) -> float:
        return update.num_examples * self.staleness(update.staleness)

    def accepts(self, staleness: int) -> str | None:
        """``None`` if an update this stale may be buffered, else the rejection reason."""
        if staleness < 0:
            return "invalid_staleness"
        if self.max_staleness is not None and staleness > self.max_staleness:
            return "stale"
        return None

    def should_aggregate(self, buffered: int, oldest_age_s: float) -> bool:
        """True when the buffer is full, or the oldest update has waited ``max_wait_s``.

        A timeout never fires with fewer updates than the rule needs (at least one).
        """
        if buffered >= self.buffer_size:
            return True
        return (
            self.max_wait_s is not None
            and buffered >= max(1, self.rule.min_updates)
            and oldest_age_s >= self.max_wait_s
        )

    def aggregate(self, global_weights: Mapping[str, np.ndarray], updates: Sequence[Update]) -> dict[str, np.ndarray]:
        """Reduce ``updates`` with the rule and apply the result with the optimizer.

        Returns new float32 global weights in ``global_weights`` order; the
        input is not modified. Callers filter with :meth:`accepts` beforehand.
        """
        if not updates:
            raise ValueError("cannot aggregate zero updates")
        weights = np.array([self.weight(update) for update in updates], dtype=np.float64)
        delta = self.rule.aggregate(updates, weights)
        new_weights = self.optimizer.step(global_weights, delta)
        return {name: new_weights[name].astype(np.float32, copy=False) for name in global_weights}

    def __repr__(self) -> str:
        return (
            f"Strategy(rule={self.rule!r}, staleness={self.staleness!r}, "
            f"max_staleness={self.max_staleness!r}, optimizer={self.optimizer!r}, "
            f"buffer_size={self.buffer_size!r}, max_wait_s={self.max_wait_s!r})"
        )
