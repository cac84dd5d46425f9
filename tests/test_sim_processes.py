"""`--backend processes`: the devices in worker processes, the coordinator in the driver."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

import fedsync.sim.devices as devices
from fedsync.sim.devices import DeviceGroup
from fedsync.sim.process_backend import ProcessFleet, WorkerError
from fedsync.sim.runner import run_simulation
from tests.test_sim_dropouts import check_exactly_once, small_fleet


def test_devices_in_two_worker_processes_sync_exactly_once_and_train_the_model(tmp_path: Path) -> None:
    config = small_fleet(tmp_path, backend="processes", workers=2, dropout_prob=0.3, rounds=6)
    report = run_simulation(config)
    assert report.device_hosts == 2
    assert len(report.device_host_peak_rss_mb) == 2 and all(mb > 0 for mb in report.device_host_peak_rss_mb)
    assert report.final_version >= 3 and report.deltas_synced >= config.devices
    assert report.final_accuracy > 0.3
    # One host: after the first device of a worker downloaded a version, the others linked it.
    assert report.bytes_down_shared > 0
    assert check_exactly_once(config) == report.events_journaled


def test_a_failing_worker_raises_with_its_traceback(tmp_path: Path) -> None:
    fleet = ProcessFleet(small_fleet(tmp_path, backend="processes", workers=1))
    try:
        assert fleet.work(0) == 0  # no model yet: no work
        with pytest.raises(WorkerError, match="KeyError: 999"):
            fleet._workers[0].call("sync", [999], "127.0.0.1:1")  # no such device in the worker
        assert fleet.work(1) == 0  # the worker survives a failed request
    finally:
        fleet.close()
    assert len(fleet.peak_rss_mb) == 1


def test_deferred_work_gives_the_same_fleet_as_work_done_up_front(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Worker processes defer a device's round work to just before its sync; on the (deterministic)
    local backend, doing so must change nothing: the same versions, accuracies and journals."""
    trained_when_work_returned: dict[bool, list[int]] = {False: [], True: []}

    def run(deferred: bool) -> tuple:
        class Group(DeviceGroup):
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                super().__init__(*args, **kwargs, defer_work=deferred)

            def work(self, *args: Any) -> int:
                journaled = super().work(*args)
                pending = sum(d.client.journal.pending_delta_count() for d in self.devices.values())
                trained_when_work_returned[deferred].append(pending)
                return journaled

        monkeypatch.setattr(devices, "DeviceGroup", Group)
        config = small_fleet(tmp_path / str(deferred), online_probability=0.6, rounds=4)
        report = run_simulation(config)
        return (
            [(v["version"], v["deltas"], v["accuracy"]) for v in report.versions],
            report.events_journaled,
            report.deltas_synced,
            report.conflicts_resolved,
            check_exactly_once(config),
        )

    up_front, deferred = run(False), run(True)
    assert deferred == up_front
    assert up_front[1] > 0 and up_front[2] > 0
    # Deferred, only the devices that did not sync last round have trained when work returns.
    assert sum(trained_when_work_returned[True]) < sum(trained_when_work_returned[False])
