"""`--backend ray`: the virtual devices in Ray actors; the coordinator and the rounds in the driver.

Each actor hosts a slice of the fleet as a `DeviceGroup` (real EdgeClients with their own SQLite
journals, sharing one LiteRT interpreter per model version within the actor), so there is about
one actor per CPU of the cluster, not one per device. In each round the actors do their devices'
local work in parallel; then each actor syncs its online devices, in the driver's seeded order, in
batches, with the actors' batches running concurrently against the coordinator. The driver
aggregates after every completed batch (asynchronous aggregation), or, for synchronous FedAvg,
checks after every completed batch whether the FedAvg round's cohort has delivered (and at the
round's end whether it timed out); the coordinator's own aggregation loop stays off, as with the
local backend.

Reproducibility: every device's data, connectivity, speed, dropouts, predictions and training seeds
are the same as with the local backend. What differs is the interleaving at the coordinator: the
local backend syncs one device at a time and aggregates after each, so a seed fixes the whole run;
here concurrent batches finish in an order Ray decides, which changes which deltas land in which
version (and how stale they are) from run to run. Synchronous aggregation is the least affected:
a FedAvg round's deltas are aggregated together whatever their arrival order, though devices that
sync after a round completes mid-round download the new version sooner.

The coordinator listens on loopback by default, so the actors run on the driver's machine; with
`--listen 0.0.0.0:PORT` (SimulationConfig.address) actors on the cluster's other nodes dial this
node's IP address as Ray sees it, or `--advertise-host` (see fedsync.sim.config.device_address).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections import deque
from collections.abc import Collection, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from fedsync.sim.config import SimulationConfig
from fedsync.sim.devices import DeviceGroup
from fedsync.sim.dropout import SyncOutcome


class RayFleet:
    def __init__(self, config: SimulationConfig) -> None:
        import ray

        self._ray = ray
        self._owns_ray = not ray.is_initialized()
        if self._owns_ray:
            # Workers' output would garble the driver's progress display.
            ray.init(
                address=config.ray_address,
                include_dashboard=False,
                log_to_driver=False,
                logging_level=logging.ERROR,
            )
        self._actors: list[Any] = []
        try:
            cpus = int(ray.cluster_resources().get("CPU", 1))
            slices = [s for s in np.array_split(np.arange(config.devices), max(1, cpus)) if len(s)]
            actor = ray.remote(num_cpus=1)(DeviceGroup)
            # Workers need not share the driver's working directory.
            config = dataclasses.replace(config, data_dir=Path(config.data_dir).resolve())
            self._actors = [actor.remote(config, [int(i) for i in s], defer_work=True) for s in slices]
            self._owner = {int(i): a for a, s in enumerate(slices) for i in s}
        except BaseException:
            self.close()
            raise

    @property
    def hosts(self) -> int:
        return len(self._actors)

    def work(self, round_index: int, cohort: Collection[int] | None = None, cohort_version: int = 0) -> int:
        return sum(self._ray.get([a.work.remote(round_index, cohort, cohort_version) for a in self._actors]))

    def sync(self, order: list[int], address: str, per_batch: int) -> Iterator[list[SyncOutcome]]:
        ray = self._ray
        size = max(1, math.ceil(per_batch / len(self._actors)))  # about per_batch devices fleet-wide
        queues: list[list[int]] = [[] for _ in self._actors]
        for i in order:
            queues[self._owner[i]].append(i)
        batches = [deque(q[k : k + size] for k in range(0, len(q), size)) for q in queues]
        pending: dict[Any, int] = {}

        def submit(a: int) -> None:
            if batches[a]:
                pending[self._actors[a].sync.remote(batches[a].popleft(), address)] = a

        for a in range(len(self._actors)):
            submit(a)
        while pending:
            [ready], _ = ray.wait(list(pending), num_returns=1)
            submit(pending.pop(ready))  # the actor goes on while the driver aggregates
            yield ray.get(ready)

    def close(self) -> None:
        ray = self._ray
        try:
            if self._actors:
                # Queued after any batch still running: journals close once their syncs are done.
                ray.get([a.close.remote() for a in self._actors], timeout=120)
        finally:
            for a in self._actors:
                ray.kill(a)
            self._actors = []
            if self._owns_ray:
                ray.shutdown()
