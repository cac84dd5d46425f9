"""Virtual devices: what each device does in a round, whichever process hosts it.

A `DeviceGroup` holds some of the fleet's devices (all of them for the local backend, a slice per
Ray actor): real EdgeClients with their own SQLite journals, their data shards and their
connectivity schedules. Everything a device does derives from the seed and its index, so a device
behaves the same whichever group hosts it.
"""

from __future__ import annotations

import functools
import hashlib
import shutil
import threading
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from fedsync.sim.config import SimulationConfig, scaled_workload
from fedsync.sim.connectivity import DeviceSchedule
from fedsync.sim.data import Shard, load_digits_split, partition
from fedsync.sim.dropout import MAX_CUT_MESSAGES, SyncOutcome, sync_device

if TYPE_CHECKING:
    from client import EdgeClient


def device_id(index: int) -> str:
    return f"device-{index:05d}"


def device_home(config: SimulationConfig, index: int) -> Path:
    return Path(config.data_dir) / "devices" / device_id(index)


_shards_lock = threading.Lock()  # the driver's threads may ask at once: one partition, not two


def fleet_shards(config: SimulationConfig) -> list[Shard]:
    with _shards_lock:
        return list(_shards(config.seed, config.devices, config.partition, config.alpha, config.overlap))


@functools.lru_cache(maxsize=2)  # the driver needs them twice (the workers' data, the ground truth)
def _shards(seed: int, devices: int, scheme: str, alpha: float, overlap: float) -> tuple[Shard, ...]:
    train, _ = load_digits_split(seed=seed)
    shards = tuple(partition(train, devices, scheme, seed=seed, alpha=alpha, overlap=overlap))
    for shard in shards:  # shared by every caller: nobody may change them
        shard.x.flags.writeable = False
        shard.y.flags.writeable = False
    return shards


def ground_truth(shards: Sequence[Shard]) -> dict[bytes, int]:
    """The true label of every input on the fleet, by the hash the journals record."""
    return {hashlib.sha256(x.tobytes()).digest(): int(y) for s in shards for x, y in zip(s.x, s.y, strict=True)}


def reset_devices(config: SimulationConfig) -> None:
    shutil.rmtree(Path(config.data_dir) / "devices", ignore_errors=True)


@dataclass
class _Device:
    index: int
    client: EdgeClient  # imported lazily: it brings LiteRT
    shard: Shard
    schedule: DeviceSchedule
    trained_on: int = -1  # the model version the device last fine-tuned
    sync_attempts: int = 0


class DeviceGroup:
    """Devices `indices` of the fleet, hosted in this process."""

    def __init__(
        self,
        config: SimulationConfig,
        indices: Sequence[int],
        shards: Mapping[int, Shard] | None = None,
        *,
        defer_work: bool = False,
    ) -> None:
        """`shards`: the devices' data when the host already has it (fleet_shards(config) otherwise).
        `defer_work`: a round's work runs device by device right before the device syncs (see work)."""
        from client import Durability, EdgeClient
        from client.artifact_cache import ArtifactCache
        from fedsync.wire import ChannelPool

        self.config = config
        self.defer_work = defer_work
        self._deferred: tuple[int, frozenset[int] | None, int, set[int]] | None = None
        self.channels = ChannelPool()
        if shards is None:
            shards = dict(enumerate(fleet_shards(config)))
        model = config.connectivity()
        # The devices download each model version once per host; the rest link it (see client.artifact_cache).
        shared = ArtifactCache(Path(config.data_dir) / "devices" / ".shared-artifacts")
        self.devices: dict[int, _Device] = {}
        for i in indices:
            client = EdgeClient(
                device_home(config, i),
                device_id(i),
                durability=Durability.PROCESS,
                fine_tuning=config.local_training,
                artifact_cache=shared,
            )
            self.devices[i] = _Device(i, client, shards[i], DeviceSchedule(model, config.seed, i))

    def work(self, round_index: int, cohort: Collection[int] | None = None, cohort_version: int = 0) -> int:
        """Each device with a model predicts on some of its inputs and fine-tunes once per model
        version it receives; a device's speed scales how much it gets through. With a `cohort`
        (synchronous FedAvg), only its members fine-tune, and only on `cohort_version`. Returns the
        number of events journaled.

        With `defer_work`, a device does its round's work right before it syncs (nothing changes its
        model in between, so it does exactly the same work), and a device that does not sync does it
        at the next call of work or close: the host's training then overlaps with the
        coordinator's handling of other hosts' syncs instead of holding up the round."""
        if not self.defer_work:
            return sum(self._work(device, round_index, cohort, cohort_version) for device in self.devices.values())
        self._finish_deferred_work()
        members = None if cohort is None else frozenset(cohort)
        self._deferred = (round_index, members, cohort_version, set(self.devices))
        return sum(self._events_due(device) for device in self.devices.values())

    def _events_due(self, device: _Device) -> int:
        if device.client.model_version == 0:
            return 0
        wanted = scaled_workload(self.config.predictions_per_round, device.schedule.speed_factor)
        return min(wanted, len(device.shard.x))

    def _work(self, device: _Device, round_index: int, cohort: Collection[int] | None, cohort_version: int) -> int:
        config = self.config
        client = device.client
        version = client.model_version
        if version == 0:
            return 0
        count = self._events_due(device)
        shard = device.shard
        rng = np.random.default_rng([config.seed, device.index, round_index])
        for row in rng.choice(len(shard.x), size=count, replace=False):
            client.predict(shard.x[row])
        trains = cohort is None or (device.index in cohort and version == cohort_version)
        if trains and device.trained_on != version:
            speed = device.schedule.speed_factor
            client.fine_tune(
                shard.x,
                shard.y,
                epochs=scaled_workload(config.local_epochs, speed),
                batch_size=config.batch_size,
                learning_rate=config.learning_rate,
                codec=config.codec,
                seed=config.seed + round_index * config.devices + device.index,
            )
            device.trained_on = version
        return count

    def _deferred_work_of(self, index: int) -> None:
        if self._deferred is not None and index in self._deferred[3]:
            round_index, cohort, cohort_version, waiting = self._deferred
            waiting.discard(index)
            self._work(self.devices[index], round_index, cohort, cohort_version)

    def _finish_deferred_work(self) -> None:
        if self._deferred is not None:
            for index in sorted(self._deferred[3]):
                self._deferred_work_of(index)
            self._deferred = None

    def sync(self, indices: Sequence[int], address: str) -> list[SyncOutcome]:
        """Sync these devices one after the other; a device whose attempt is drawn to drop loses its
        link mid-way and resumes on its next sync. The group's devices share their connections."""
        from fedsync.wire import pooled_channels

        outcomes = []
        with pooled_channels(self.channels):
            for i in indices:
                self._deferred_work_of(int(i))
                device = self.devices[int(i)]
                cut_after = device.schedule.sync_cut_point(device.sync_attempts, MAX_CUT_MESSAGES)
                device.sync_attempts += 1
                outcomes.append(sync_device(device.client, device.index, address, cut_after))
        return outcomes

    def close(self) -> None:
        self._finish_deferred_work()
        for device in self.devices.values():
            device.client.close()
        self.channels.close()
