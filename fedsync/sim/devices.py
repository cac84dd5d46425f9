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


def fleet_shards(config: SimulationConfig) -> list[Shard]:
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
        self, config: SimulationConfig, indices: Sequence[int], shards: Mapping[int, Shard] | None = None
    ) -> None:
        """`shards`: the devices' data when the host already has it (fleet_shards(config) otherwise)."""
        from client import Durability, EdgeClient
        from client.artifact_cache import ArtifactCache
        from fedsync.wire import ChannelPool

        self.config = config
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
        number of events journaled."""
        config = self.config
        journaled = 0
        for device in self.devices.values():
            client = device.client
            version = client.model_version
            if version == 0:
                continue
            speed = device.schedule.speed_factor
            shard = device.shard
            rng = np.random.default_rng([config.seed, device.index, round_index])
            count = min(scaled_workload(config.predictions_per_round, speed), len(shard.x))
            for row in rng.choice(len(shard.x), size=count, replace=False):
                client.predict(shard.x[row])
            journaled += count
            trains = cohort is None or (device.index in cohort and version == cohort_version)
            if trains and device.trained_on != version:
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
        return journaled

    def sync(self, indices: Sequence[int], address: str) -> list[SyncOutcome]:
        """Sync these devices one after the other; a device whose attempt is drawn to drop loses its
        link mid-way and resumes on its next sync. The group's devices share their connections."""
        from fedsync.wire import pooled_channels

        outcomes = []
        with pooled_channels(self.channels):
            for i in indices:
                device = self.devices[int(i)]
                cut_after = device.schedule.sync_cut_point(device.sync_attempts, MAX_CUT_MESSAGES)
                device.sync_attempts += 1
                outcomes.append(sync_device(device.client, device.index, address, cut_after))
        return outcomes

    def close(self) -> None:
        for device in self.devices.values():
            device.client.close()
        self.channels.close()
