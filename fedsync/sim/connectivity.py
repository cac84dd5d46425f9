"""Per-device on/off connectivity on a virtual clock, plus device heterogeneity.

Each device alternates between online and offline periods with exponentially
distributed durations (a two-state continuous-time Markov chain). The state at
t=0 is drawn from the stationary distribution, so ``online_fraction`` holds
from the start. Everything about a device derives from
``np.random.SeedSequence([seed, device_index])``, so a device behaves the same
whatever the fleet size and whatever order its queries arrive in.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

# On/off pairs generated each time a timeline is extended. Fixed so the drawn
# durations never depend on the query pattern.
_TIMELINE_BLOCK_PAIRS = 128
_DROPOUT_BLOCK = 256


@dataclass(frozen=True)
class ConnectivityModel:
    """Fleet-wide connectivity parameters.

    A zero mean duration encodes the edge cases: ``mean_offline_s == 0`` is
    always online, ``mean_online_s == 0`` is never online.
    """

    mean_online_s: float = 60.0
    mean_offline_s: float = 60.0
    dropout_prob: float = 0.0  # probability a sync attempt is cut mid-way
    speed_min: float = 0.5
    speed_max: float = 2.0

    def __post_init__(self) -> None:
        for name in ("mean_online_s", "mean_offline_s"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if self.mean_online_s == 0 and self.mean_offline_s == 0:
            raise ValueError("mean_online_s and mean_offline_s cannot both be 0")
        if not 0.0 <= self.dropout_prob <= 1.0:
            raise ValueError(f"dropout_prob must be in [0, 1], got {self.dropout_prob!r}")
        if not (
            math.isfinite(self.speed_min) and math.isfinite(self.speed_max) and 0 < self.speed_min <= self.speed_max
        ):
            raise ValueError(
                "speeds must satisfy 0 < speed_min <= speed_max, "
                f"got speed_min={self.speed_min!r}, speed_max={self.speed_max!r}"
            )

    @property
    def online_fraction(self) -> float:
        """Stationary probability of being online."""
        return self.mean_online_s / (self.mean_online_s + self.mean_offline_s)

    @classmethod
    def from_online_probability(cls, p: float, mean_cycle_s: float = 120.0, **kwargs: float) -> ConnectivityModel:
        """Model online a fraction ``p`` of the time, with one on+off cycle lasting ``mean_cycle_s``."""
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"p must be in [0, 1], got {p!r}")
        if not (math.isfinite(mean_cycle_s) and mean_cycle_s > 0):
            raise ValueError(f"mean_cycle_s must be a finite number > 0, got {mean_cycle_s!r}")
        return cls(mean_online_s=p * mean_cycle_s, mean_offline_s=(1.0 - p) * mean_cycle_s, **kwargs)


class DeviceSchedule:
    """One device's connectivity timeline, speed and sync-dropout draws."""

    def __init__(self, model: ConnectivityModel, seed: int, device_index: int) -> None:
        _require_int("seed", seed, minimum=0)
        _require_int("device_index", device_index, minimum=0)
        self._model = model
        self._seed = int(seed)
        self._device_index = int(device_index)

        # spawn(n) extends spawn(n - 1): adding a stream leaves the earlier streams' draws unchanged.
        sequences = np.random.SeedSequence([self._seed, self._device_index]).spawn(4)
        timeline_seq, speed_seq, dropout_seq, cut_seq = sequences
        self._timeline_rng = np.random.default_rng(timeline_seq)
        self._dropout_rng = np.random.default_rng(dropout_seq)
        self._cut_rng = np.random.default_rng(cut_seq)
        self._speed_factor = float(np.random.default_rng(speed_seq).uniform(model.speed_min, model.speed_max))

        self._starts_online = bool(self._timeline_rng.random() < model.online_fraction)
        first, second = (
            (model.mean_online_s, model.mean_offline_s)
            if self._starts_online
            else (model.mean_offline_s, model.mean_online_s)
        )
        self._scales = np.tile([first, second], _TIMELINE_BLOCK_PAIRS)
        # _ends[i] is where interval i ends; interval i spans [_ends[i-1], _ends[i]).
        self._ends = np.empty(0)
        self._dropout_draws = np.empty(0)
        self._cut_draws = np.empty(0)

    @property
    def model(self) -> ConnectivityModel:
        return self._model

    @property
    def seed(self) -> int:
        return self._seed

    @property
    def device_index(self) -> int:
        return self._device_index

    @property
    def speed_factor(self) -> float:
        """Relative compute/transfer speed, uniform in [speed_min, speed_max]."""
        return self._speed_factor

    def is_online(self, t: float) -> bool:
        """Whether the device is online at virtual time ``t`` seconds."""
        _check_time(t)
        if self._model.mean_offline_s == 0:
            return True
        if self._model.mean_online_s == 0:
            return False
        return self._interval_online(self._interval_at(t))

    def next_online(self, t: float) -> float | None:
        """Earliest time >= ``t`` at which the device is online; None if it never is."""
        return self._next_in_state(t, online=True)

    def next_offline(self, t: float) -> float | None:
        """Earliest time >= ``t`` at which the device is offline; None if it never is."""
        return self._next_in_state(t, online=False)

    def sync_dropped(self, attempt: int) -> bool:
        """Whether this device's sync attempt number ``attempt`` (0-based) is cut mid-way."""
        _require_int("attempt", attempt, minimum=0)
        p = self._model.dropout_prob
        if p in (0.0, 1.0):
            return p == 1.0
        self._dropout_draws = _draws_through(self._dropout_rng, self._dropout_draws, attempt)
        return bool(self._dropout_draws[attempt] < p)

    def sync_cut_point(self, attempt: int, max_messages: int) -> int | None:
        """For a dropped sync attempt, how many gRPC messages get through before the link goes
        (uniform in [0, max_messages)); None when the attempt is not dropped."""
        _require_int("max_messages", max_messages, minimum=1)
        if not self.sync_dropped(attempt):
            return None
        self._cut_draws = _draws_through(self._cut_rng, self._cut_draws, attempt)
        return int(self._cut_draws[attempt] * max_messages)

    def _next_in_state(self, t: float, online: bool) -> float | None:
        _check_time(t)
        always = self._model.mean_offline_s == 0 if online else self._model.mean_online_s == 0
        never = self._model.mean_online_s == 0 if online else self._model.mean_offline_s == 0
        if always:
            return float(t)
        if never:
            return None
        # Loops again only past zero-length intervals, which exponential draws can produce.
        while True:
            i = self._interval_at(t)
            if self._interval_online(i) == online:
                return float(t)
            t = float(self._ends[i])

    def _interval_online(self, i: int) -> bool:
        return (i % 2 == 0) == self._starts_online

    def _interval_at(self, t: float) -> int:
        self._extend_past(t)
        return int(np.searchsorted(self._ends, t, side="right"))

    def _extend_past(self, t: float) -> None:
        last = float(self._ends[-1]) if self._ends.size else 0.0
        blocks = []
        while last <= t:
            durations = self._timeline_rng.standard_exponential(self._scales.size) * self._scales
            block = last + np.cumsum(durations)
            blocks.append(block)
            last = float(block[-1])
        if blocks:
            self._ends = np.concatenate([self._ends, *blocks])


def fleet_schedules(model: ConnectivityModel, num_devices: int, seed: int) -> list[DeviceSchedule]:
    """Independent schedules for devices ``0..num_devices-1``."""
    _require_int("num_devices", num_devices, minimum=1)
    return [DeviceSchedule(model, seed, device) for device in range(num_devices)]


def online_devices(schedules: Iterable[DeviceSchedule], t: float) -> list[int]:
    """Device indices of the schedules online at time ``t``."""
    return [s.device_index for s in schedules if s.is_online(t)]


def _draws_through(rng: np.random.Generator, draws: np.ndarray, index: int) -> np.ndarray:
    """`draws` extended in fixed blocks until it holds `index`, so a draw never depends on the query order."""
    if index < draws.size:
        return draws
    missing = index + 1 - draws.size
    blocks = [rng.random(_DROPOUT_BLOCK) for _ in range(math.ceil(missing / _DROPOUT_BLOCK))]
    return np.concatenate([draws, *blocks])


def _check_time(t: float) -> None:
    if not (math.isfinite(t) and t >= 0):
        raise ValueError(f"virtual time must be a finite number >= 0, got {t!r}")


def _require_int(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
