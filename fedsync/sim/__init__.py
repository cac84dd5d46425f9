"""Simulation inputs: digits data partitioned over devices, and device connectivity."""

from fedsync.sim.connectivity import (
    ConnectivityModel,
    DeviceSchedule,
    fleet_schedules,
    online_devices,
)
from fedsync.sim.data import (
    SCHEMES,
    Dataset,
    Shard,
    load_digits_split,
    partition,
    partition_dirichlet,
    partition_iid,
    partition_label_skew,
)

__all__ = [
    "SCHEMES",
    "ConnectivityModel",
    "Dataset",
    "DeviceSchedule",
    "Shard",
    "fleet_schedules",
    "load_digits_split",
    "online_devices",
    "partition",
    "partition_dirichlet",
    "partition_iid",
    "partition_label_skew",
]
