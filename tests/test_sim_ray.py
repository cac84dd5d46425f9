"""`fedsync simulate --backend ray` against a local Ray instance: devices in Ray actors, the
coordinator and the rounds in the test process."""

from __future__ import annotations

import json
import math
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

ray = pytest.importorskip("ray", reason="the Ray backend needs Ray: pip install 'fedsync[ray]'")

from fedsync.cli import main  # noqa: E402
from fedsync.sim.connectivity import DeviceSchedule  # noqa: E402
from fedsync.sim.runner import run_simulation  # noqa: E402
from tests.test_sim_dropouts import check_exactly_once, small_fleet  # noqa: E402


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    # A raylet that loses the race for one of the ports Ray pre-selects never registers and ray.init
    # times out ("The current node timed out during startup"): start again on fresh ports.
    # If Ray cannot start here at all, that is this machine, not the backend: skip, saying why.
    for attempt in range(3):
        try:
            ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
            break
        except Exception as exc:
            ray.shutdown()
            if attempt == 2:
                pytest.skip(f"a local Ray instance did not start in 3 attempts: {exc}")
    try:
        yield
    finally:
        ray.shutdown()


def test_ray_actors_host_the_fleet_and_every_event_arrives_exactly_once(tmp_path: Path, local_ray: None) -> None:
    config = small_fleet(tmp_path, devices=6, rounds=3, backend="ray", dropout_prob=0.3)
    report = run_simulation(config)
    assert report.backend == "ray" and report.device_hosts == 2  # one actor per CPU, three devices each
    assert ray.is_initialized()  # the caller's Ray is left running
    assert report.sync_attempts == 6 * 3  # always online
    # The actors draw the same dropouts as the devices' seeded schedules (and the local backend) do.
    model = config.connectivity()
    drawn = sum(DeviceSchedule(model, config.seed, i).sync_dropped(a) for i in range(6) for a in range(3))
    assert report.sync_dropouts == drawn and 0 < report.syncs_cut <= drawn
    # The model arrives in round 1 (later for a device whose sync was cut); rounds 2 and 3 journal
    # 4 predictions per device holding a model.
    assert 0 < report.events_journaled <= 6 * 2 * 4
    assert report.events_synced <= report.events_at_coordinator <= report.events_journaled
    versions = [v["version"] for v in report.versions]
    assert versions == list(range(1, report.final_version + 1)) and report.final_version >= 2
    assert all(0.0 <= v["accuracy"] <= 1.0 for v in report.versions)
    assert report.final_accuracy > report.versions[0]["accuracy"]
    assert sum(report.staleness_histogram.values()) == sum(v["deltas"] for v in report.versions)
    assert report.bytes_up > 0 and report.bytes_down > 0
    assert check_exactly_once(config) == report.events_journaled


def test_simulate_cli_runs_on_ray(tmp_path: Path, local_ray: None) -> None:
    code = main(
        [
            "simulate", "--backend", "ray", "--devices", "4", "--rounds", "2", "--local-training", "head",
            "--aggregation", "sync", "--online-prob", "1", "--data-dir", str(tmp_path / "sim"),
            "--report", str(tmp_path / "report.json"),
        ]
    )  # fmt: skip
    assert code == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["backend"] == "ray" and report["device_hosts"] == 2
    assert report["final_version"] == 2 and not math.isnan(report["final_accuracy"])
    assert report["versions"][-1]["deltas"] == 4  # synchronous: the round's four deltas together


def test_synchronous_fedavg_on_ray_aggregates_only_fresh_cohort_deltas(tmp_path: Path, local_ray: None) -> None:
    config = small_fleet(tmp_path, rounds=8, backend="ray", aggregation="sync", online_probability=0.5)
    report = run_simulation(config)
    assert set(report.staleness_histogram) == {"0"}
    finished = [r for r in report.fedavg_rounds if r["published"] is not None]
    assert finished and [r["published"] for r in finished] == list(range(2, report.final_version + 1))
    for v in report.versions[1:]:
        assert v["deltas"] == v["delivered"] <= v["cohort"]
    with sqlite3.connect(config.data_dir / "coordinator" / "coordinator.db") as conn:
        aggregated = conn.execute("SELECT base_version, aggregated_into FROM deltas WHERE status = 'aggregated'")
        assert all(into == base + 1 for base, into in aggregated)
