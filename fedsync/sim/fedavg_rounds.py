"""Synchronous FedAvg's round state in the simulation driver (see fedsync.sim.runner): a FedAvg
round's cohort, the version it trains, when it completes or times out, and what it published."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from fedsync.sim.config import SimulationConfig

if TYPE_CHECKING:
    from fedsync.sim.runner import SimulationReport


@dataclass
class FedAvgRound:
    start: int  # the simulation round it started in (0-based)
    version: int  # the model its cohort trains
    cohort: frozenset[int]
    end: int | None = None
    delivered: int = 0  # cohort members whose delta on `version` arrived in time
    published: int | None = None  # the version it produced; None if no fresh delta arrived

    def summary(self) -> dict[str, int | None]:
        return {
            "start_round": self.start + 1,
            "end_round": None if self.end is None else self.end + 1,
            "version": self.version,
            "cohort": len(self.cohort),
            "delivered": self.delivered,
            "published": self.published,
        }


class FedAvgRounds:
    """Synchronous FedAvg's round state in the driver; who delivered is read from the
    coordinator's store (buffered deltas whose base is the FedAvg round's version)."""

    def __init__(self, config: SimulationConfig, coordinator: object) -> None:
        from fedsync.sim.devices import device_id

        self.config = config
        self.coordinator = coordinator
        self.rng = np.random.default_rng([config.seed, 1])  # apart from the sync order's stream
        self.index = {device_id(i): i for i in range(config.devices)}
        self.current: FedAvgRound | None = None
        self.done: list[FedAvgRound] = []

    def start(self, round_index: int, online: list[int]) -> None:
        """Start a FedAvg round if none is running and some device is online to train."""
        if self.current is not None or not online:
            return
        size = max(1, round(self.config.cohort_fraction * len(online)))
        cohort = frozenset(int(i) for i in self.rng.choice(online, size=size, replace=False))
        self.current = FedAvgRound(round_index, self.coordinator.version, cohort)  # type: ignore[attr-defined]

    def training(self) -> tuple[frozenset[int], int]:
        """Who fine-tunes this round, on which version: nobody between FedAvg rounds."""
        if self.current is None:
            return frozenset(), 0
        return self.current.cohort, self.current.version

    def _fresh(self) -> list[tuple[str, int]]:
        """The buffered deltas on the current FedAvg round's version."""
        store = self.coordinator.store  # type: ignore[attr-defined]
        assert self.current is not None
        with store.lock:
            return store.conn.execute(
                "SELECT device_id, seq FROM deltas WHERE status = 'buffered' AND base_version = ?",
                (self.current.version,),
            ).fetchall()

    def complete(self) -> bool:
        if self.current is None:
            return False
        return {self.index.get(d) for d, _ in self._fresh()} >= self.current.cohort

    def timed_out(self, round_index: int) -> bool:
        return self.current is not None and round_index >= self.current.start + self.config.round_timeout

    def close(self, round_index: int) -> bool:
        """Aggregate the FedAvg round's fresh deltas; True if that published a version."""
        current = self.current
        assert current is not None
        fresh = self._fresh()
        # Only a FedAvg round that timed out with nothing leaves its version current, and then a
        # past member's delta on it may arrive in the next round: like a late result, it is dropped.
        outsiders = [(d, seq, "not in the cohort") for d, seq in fresh if self.index.get(d) not in current.cohort]
        if outsiders:
            self.coordinator.store.commit_version_rejections(outsiders)  # type: ignore[attr-defined]
        published = self.coordinator.aggregate_now(force=True)  # type: ignore[attr-defined]
        current.end = round_index
        if published is not None:
            current.published = published.version
            store = self.coordinator.store  # type: ignore[attr-defined]
            with store.lock:
                used = store.conn.execute(
                    "SELECT device_id FROM deltas WHERE aggregated_into = ?", (published.version,)
                ).fetchall()
            current.delivered = len({self.index.get(d) for (d,) in used} & current.cohort)
        self.done.append(current)
        self.current = None
        return published is not None


def fedavg_figures(fedavg: FedAvgRounds, report: SimulationReport) -> None:
    unfinished = [fedavg.current] if fedavg.current is not None else []
    report.fedavg_rounds = [r.summary() for r in fedavg.done + unfinished]
    by_version = {r.published: r for r in fedavg.done if r.published is not None}
    for entry in report.versions:
        r = by_version.get(int(entry["version"]))
        if r is not None:
            entry.update(cohort=len(r.cohort), delivered=r.delivered, rounds=r.end - r.start + 1)  # type: ignore[operator]
