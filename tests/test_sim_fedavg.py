"""`fedsync simulate --aggregation sync`: synchronous FedAvg in rounds, as Flower runs it (a cohort
sampled among the online devices, trained on one version, waited for until it delivers or the
round times out, stale updates dropped)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from client import EdgeClient
from fedsync.sim import runner
from fedsync.sim.config import ROUND_SECONDS, SimulationConfig
from fedsync.sim.connectivity import DeviceSchedule, fleet_schedules
from fedsync.sim.devices import device_id
from fedsync.sim.runner import SimulationReport, run_simulation
from tests.test_sim_dropouts import small_fleet


def deltas(config: SimulationConfig) -> list[tuple[str, int, str, str, int | None]]:
    """(device, base version, status, reason, version aggregated into) of every delta the coordinator got."""
    with sqlite3.connect(Path(config.data_dir) / "coordinator" / "coordinator.db") as conn:
        return conn.execute("SELECT device_id, base_version, status, reason, aggregated_into FROM deltas").fetchall()


def round_spans(report: SimulationReport) -> list[tuple[int, int | None, int, int, int | None]]:
    return [
        (r["start_round"], r["end_round"], r["cohort"], r["delivered"], r["published"])  # type: ignore[misc]
        for r in report.fedavg_rounds
    ]


def check_only_fresh_deltas_aggregated(config: SimulationConfig, report: SimulationReport) -> None:
    assert set(report.staleness_histogram) <= {"0"}
    for _, base, status, _, into in deltas(config):
        if status == "aggregated":
            assert into == base + 1
    for v in report.versions[1:]:
        assert v["deltas"] == v["delivered"] <= v["cohort"]


class Outage:
    """A device's schedule with some rounds forced offline."""

    def __init__(self, schedule: DeviceSchedule, offline_rounds: set[int]) -> None:
        self.schedule = schedule
        self.offline_rounds = offline_rounds

    def is_online(self, t: float) -> bool:
        return round(t / ROUND_SECONDS) not in self.offline_rounds and self.schedule.is_online(t)


def device_0_offline(monkeypatch: pytest.MonkeyPatch, offline_rounds: set[int]) -> None:
    def schedules(*args: object) -> list:
        fleet: list = fleet_schedules(*args)  # type: ignore[arg-type]
        fleet[0] = Outage(fleet[0], offline_rounds)
        return fleet

    monkeypatch.setattr(runner, "fleet_schedules", schedules)


def test_always_online_every_round_gets_the_whole_cohort_one_version_per_round_trip(tmp_path: Path) -> None:
    config = small_fleet(tmp_path, rounds=6, aggregation="sync")
    report = run_simulation(config)
    # Round 1 sends version 1 to the cohort, round 2 trains it and returns the deltas; and so on.
    assert round_spans(report) == [(1, 2, 6, 6, 2), (3, 4, 6, 6, 3), (5, 6, 6, 6, 4)]
    assert [r.version for r in report.rounds] == [1, 2, 2, 3, 3, 4]
    assert [(v["version"], v.get("cohort"), v.get("delivered"), v.get("rounds")) for v in report.versions] == [
        (1, None, None, None),
        (2, 6, 6, 2),
        (3, 6, 6, 2),
        (4, 6, 6, 2),
    ]
    assert report.staleness_histogram == {"0": 18} and report.deltas_rejected == 0
    assert report.final_accuracy > report.versions[0]["accuracy"]


def test_an_offline_cohort_member_stalls_the_round_until_it_returns(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    device_0_offline(monkeypatch, {3, 4})  # 0-based rounds: device 0 is gone in rounds 4 and 5
    config = small_fleet(tmp_path, rounds=8, aggregation="sync", round_timeout=4)
    report = run_simulation(config)
    # The second FedAvg round sends version 2 in round 3; device 0 trains it offline and delivers
    # in round 6, the others in round 4.
    assert round_spans(report) == [(1, 2, 6, 6, 2), (3, 6, 6, 6, 3), (7, 8, 6, 6, 4)]
    assert [r.version for r in report.rounds] == [1, 2, 2, 2, 2, 3, 3, 4]
    assert [r.online for r in report.rounds] == [6, 6, 6, 5, 5, 6, 6, 6]
    check_only_fresh_deltas_aggregated(config, report)
    assert report.deltas_rejected == 0


def test_the_round_timeout_aggregates_without_the_absent_member_and_its_late_delta_is_rejected(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    device_0_offline(monkeypatch, {3, 4})
    config = small_fleet(tmp_path, rounds=8, aggregation="sync", round_timeout=1)
    report = run_simulation(config)
    # Version 3 comes from 5 of the 6 deltas at the timeout (round 4); device 0, offline when the
    # next FedAvg round starts, is not in its cohort.
    assert round_spans(report) == [(1, 2, 6, 6, 2), (3, 4, 6, 5, 3), (5, 6, 5, 5, 4), (7, 8, 6, 6, 5)]
    check_only_fresh_deltas_aggregated(config, report)
    late = [d for d in deltas(config) if d[2] == "rejected"]
    assert late == [(device_id(0), 2, "rejected", "stale", None)]
    assert report.deltas_rejected == 1
    assert sum(v["deltas"] for v in report.versions) == 6 + 5 + 5 + 6


def test_only_the_sampled_cohort_trains(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    trained: list[tuple[str, int]] = []
    original = EdgeClient.fine_tune

    def recording_fine_tune(self: EdgeClient, *args: object, **kwargs: object) -> int:
        trained.append((self.device_id, self.model_version))
        return original(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(EdgeClient, "fine_tune", recording_fine_tune)
    config = small_fleet(tmp_path, rounds=6, aggregation="sync", cohort_fraction=0.5)
    report = run_simulation(config)
    assert round_spans(report) == [(1, 2, 3, 3, 2), (3, 4, 3, 3, 3), (5, 6, 3, 3, 4)]
    # Every fine-tuning was a cohort member's, and made it into the next version.
    aggregated = [(d, into - 1) for d, _, status, _, into in deltas(config) if status == "aggregated"]
    assert sorted(trained) == sorted(aggregated)
    cohorts = [{d for d, v in trained if v == version} for version in (1, 2, 3)]
    assert len({frozenset(c) for c in cohorts}) > 1  # sampled afresh every round


def test_under_intermittency_rounds_wait_for_their_cohort_and_stale_deltas_are_rejected(tmp_path: Path) -> None:
    config = small_fleet(tmp_path, devices=8, rounds=16, aggregation="sync", online_probability=0.5, round_timeout=2)
    report = run_simulation(config)
    check_only_fresh_deltas_aggregated(config, report)
    rejected = [d for d in deltas(config) if d[2] == "rejected"]
    assert rejected and {reason for *_, reason, _ in rejected} == {"stale"}
    assert report.deltas_rejected == len(rejected)

    schedules = fleet_schedules(config.connectivity(), config.devices, config.seed)

    def online(i: int, round_number: int) -> bool:
        return schedules[i].is_online((round_number - 1) * ROUND_SECONDS)

    finished = [r for r in report.fedavg_rounds if r["end_round"] is not None]
    present, absent = [], []
    for r in finished:
        start, end = r["start_round"], r["end_round"]
        assert r["cohort"] == sum(online(i, start) for i in range(config.devices))  # type: ignore[arg-type]
        span = end - start + 1  # type: ignore[operator]
        cohort = [i for i in range(config.devices) if online(i, start)]  # type: ignore[arg-type]
        if all(online(i, start + 1) for i in cohort):  # type: ignore[operator]
            assert span <= 2 and r["delivered"] == r["cohort"]
            present.append(span)
        else:
            absent.append(span)
        if r["delivered"] < r["cohort"]:  # type: ignore[operator]
            assert span == config.round_timeout + 1
    assert present and absent
    assert sum(absent) / len(absent) > sum(present) / len(present)
