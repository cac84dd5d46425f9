"""`--backend processes`: the devices in worker processes, the coordinator in the driver."""

from __future__ import annotations

from pathlib import Path

import pytest

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
