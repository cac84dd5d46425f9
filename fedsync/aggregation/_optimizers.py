"""Server optimizers: apply an aggregated delta to the global weights (FedOpt style).

The aggregated delta points from the old global weights towards the clients'
(``new_local - base``), so it is added, i.e. treated as a negative gradient.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np


def _check_same_names(global_weights: Mapping[str, np.ndarray], delta: Mapping[str, np.ndarray]) -> None:
    if global_weights.keys() != delta.keys():
        raise ValueError(f"delta tensors {sorted(delta)} do not match global tensors {sorted(global_weights)}")


class ServerOptimizer(ABC):
    """``step(global_weights, aggregated_delta) -> new global weights`` (new float32 arrays)."""

    @abstractmethod
    def step(
        self, global_weights: Mapping[str, np.ndarray], aggregated_delta: Mapping[str, np.ndarray]
    ) -> dict[str, np.ndarray]: ...

    def state(self) -> dict[str, np.ndarray]:
        """Optimizer state to persist with a checkpoint (empty when stateless)."""
        return {}

    def load_state(self, state: Mapping[str, np.ndarray]) -> None:
        if state:
            raise ValueError(f"{self!r} is stateless but got state {sorted(state)}")

    def reset(self) -> None:
        """Forget accumulated state, e.g. after the model is replaced."""
        self.load_state({})


@dataclass
class server_sgd(ServerOptimizer):
    """``w <- w + lr * delta``; ``lr=1.0`` is plain FedAvg."""

    lr: float = 1.0

    def step(
        self, global_weights: Mapping[str, np.ndarray], aggregated_delta: Mapping[str, np.ndarray]
    ) -> dict[str, np.ndarray]:
        _check_same_names(global_weights, aggregated_delta)
        lr = np.float32(self.lr)
        return {
            name: np.add(
                np.asarray(weights, dtype=np.float32),
                np.multiply(aggregated_delta[name], lr, dtype=np.float32),
                dtype=np.float32,
            )
            for name, weights in global_weights.items()
        }


@dataclass
class server_momentum(ServerOptimizer):
    """Heavy-ball momentum (FedAvgM): ``v <- momentum * v + delta; w <- w + lr * v``.

    With ``nesterov=True`` the step is ``lr * (momentum * v + delta)``. The
    velocity starts at zero and lives in this object; persist it with
    :meth:`state` / :meth:`load_state`.
    """

    lr: float = 1.0
    momentum: float = 0.9
    nesterov: bool = False
    _velocity: dict[str, np.ndarray] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not 0 <= self.momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum}")

    def step(
        self, global_weights: Mapping[str, np.ndarray], aggregated_delta: Mapping[str, np.ndarray]
    ) -> dict[str, np.ndarray]:
        _check_same_names(global_weights, aggregated_delta)
        beta = np.float32(self.momentum)
        new_weights = {}
        for name, weights in global_weights.items():
            delta = np.asarray(aggregated_delta[name], dtype=np.float32)
            velocity = self._velocity.get(name)
            if velocity is None or velocity.shape != delta.shape:
                velocity = np.zeros_like(delta)
            velocity = beta * velocity + delta
            self._velocity[name] = velocity
            direction = beta * velocity + delta if self.nesterov else velocity
            new_weights[name] = np.asarray(weights, dtype=np.float32) + np.float32(self.lr) * direction
        return new_weights

    def state(self) -> dict[str, np.ndarray]:
        return {name: velocity.copy() for name, velocity in self._velocity.items()}

    def load_state(self, state: Mapping[str, np.ndarray]) -> None:
        self._velocity = {name: np.array(v, dtype=np.float32) for name, v in state.items()}

    def reset(self) -> None:
        self._velocity = {}
