"""Staleness discounts ``s(tau)``: how much an update trained ``tau`` versions ago counts."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass


class StalenessFunction(ABC):
    """Maps staleness ``tau >= 0`` to a multiplier in ``(0, 1]``."""

    def __call__(self, tau: int) -> float:
        if tau < 0:
            raise ValueError(f"staleness must be >= 0, got {tau}")
        return self._discount(tau)

    @abstractmethod
    def _discount(self, tau: int) -> float: ...


@dataclass(frozen=True)
class constant_staleness(StalenessFunction):
    """``s(tau) = 1``: staleness does not change an update's weight."""

    def _discount(self, tau: int) -> float:
        return 1.0


@dataclass(frozen=True)
class polynomial_staleness(StalenessFunction):
    """``s(tau) = (1 + tau) ** -a`` (FedAsync / FedBuff)."""

    a: float = 0.5

    def __post_init__(self) -> None:
        if self.a < 0:
            raise ValueError(f"a must be >= 0, got {self.a}")

    def _discount(self, tau: int) -> float:
        return float((1.0 + tau) ** -self.a)


@dataclass(frozen=True)
class hinge_staleness(StalenessFunction):
    """``s(tau) = 1`` up to ``b``, then ``1 / (a * (tau - b) + 1)`` (FedAsync)."""

    a: float = 10.0
    b: int = 4

    def __post_init__(self) -> None:
        if self.a < 0 or self.b < 0:
            raise ValueError(f"a and b must be >= 0, got a={self.a}, b={self.b}")

    def _discount(self, tau: int) -> float:
        if tau <= self.b:
            return 1.0
        return 1.0 / (self.a * (tau - self.b) + 1.0)
