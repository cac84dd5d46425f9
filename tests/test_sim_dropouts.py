"""Mid-sync dropouts over real gRPC, and device speed factors, in `fedsync simulate`."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import numpy as np
import pytest

import client.sync as client_sync
from client import Durability, EdgeClient
from coordinator import Coordinator
from coordinator.records import EventRow
from fedsync.aggregation import Strategy
from fedsync.sim.config import SimulationConfig, scaled_workload
from fedsync.sim.connectivity import DeviceSchedule
from fedsync.sim.data import load_digits_split
from fedsync.sim.devices import device_home, device_id
from fedsync.sim.dropout import LinkCutter, LinkDropped, sync_device
from fedsync.sim.runner import run_simulation
from fedsync.wire import channel_interceptors

EVENT_COLUMNS = "seq, input_hash, label, confidence, model_version, time_ns"


def coordinator_events(db: Path) -> dict[str, list[tuple]]:
    with sqlite3.connect(db) as conn:
        rows = conn.execute(f"SELECT device_id, {EVENT_COLUMNS} FROM events ORDER BY device_id, seq").fetchall()
    events: dict[str, list[tuple]] = {}
    for device, *event in rows:
        events.setdefault(device, []).append(tuple(event))
    return events


def journal_events(home: Path) -> list[tuple]:
    with sqlite3.connect(home / "journal.db") as conn:
        return [tuple(r) for r in conn.execute(f"SELECT {EVENT_COLUMNS} FROM events ORDER BY seq")]


def check_exactly_once(config: SimulationConfig) -> int:
    """The coordinator holds, for every device, exactly a prefix of its journal; then, once every
    device has synced again with no dropout (its next online period), exactly the whole journal.
    Returns the number of journaled events."""
    root = Path(config.data_dir)
    stored = coordinator_events(root / "coordinator" / "coordinator.db")
    journals = {device_id(i): journal_events(device_home(config, i)) for i in range(config.devices)}
    for device, journal in journals.items():
        mine = stored.get(device, [])
        assert mine == journal[: len(mine)], device
    assert set(stored) <= set(journals)

    coordinator = Coordinator(root / "coordinator", strategy=Strategy.fedbuff(buffer_size=10**6), auto_aggregate=False)
    coordinator.start("127.0.0.1:0")
    try:
        for i in range(config.devices):
            client = EdgeClient(
                device_home(config, i), device_id(i), durability=Durability.PROCESS, fine_tuning=config.local_training
            )
            try:
                client.sync(coordinator.address)
            finally:
                client.close()
    finally:
        coordinator.stop()
    stored = coordinator_events(root / "coordinator" / "coordinator.db")
    assert {d: e for d, e in journals.items() if e} == stored
    return sum(len(e) for e in journals.values())


def small_fleet(tmp_path: Path, **overrides: object) -> SimulationConfig:
    base: dict = {
        "devices": 6,
        "rounds": 4,
        "seed": 3,
        "data_dir": tmp_path / "sim",
        "overlap": 0.5,
        "online_probability": 1.0,
        "local_training": "head",
        "learning_rate": 0.5,
        "local_epochs": 2,
        "predictions_per_round": 4,
    }
    return SimulationConfig(**{**base, **overrides})


def test_dropouts_cut_syncs_mid_way_and_every_event_arrives_exactly_once(tmp_path: Path) -> None:
    config = small_fleet(tmp_path, dropout_prob=0.5)
    report = run_simulation(config)
    assert report.syncs_cut > 0 and report.cut_sync_bytes > 0
    assert report.syncs_cut == sum(r.syncs_cut for r in report.rounds)
    assert report.sync_attempts == sum(r.online for r in report.rounds) == config.devices * config.rounds
    # The attempts the devices' seeded schedules drew to drop; the cut ones dropped before their end.
    model = config.connectivity()
    drawn = sum(DeviceSchedule(model, config.seed, i).sync_dropped(a) for i in range(6) for a in range(4))
    assert report.sync_dropouts == drawn and 0 < report.syncs_cut <= drawn
    assert report.events_synced <= report.events_at_coordinator <= report.events_journaled
    assert report.final_version >= 2
    assert check_exactly_once(config) == report.events_journaled


@pytest.mark.parametrize(
    ("carried", "cut_calls"),
    [
        (True, {"Hello", "PullCorrections", "DownloadArtifact"}),
        (False, {"Hello", "PushEvents", "PushWholeDelta", "PullCorrections", "DownloadArtifact"}),
    ],
    ids=["pending-rides-hello", "regular-calls"],
)
def test_the_cutter_drops_the_link_in_every_kind_of_call_and_the_device_resumes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, carried: bool, cut_calls: set[str]
) -> None:
    monkeypatch.setattr(client_sync, "HELLO_CARRIES_PENDING", carried)
    train, _ = load_digits_split(seed=0)
    coordinator = Coordinator(
        tmp_path / "coordinator", strategy=Strategy.fedbuff(buffer_size=1, max_staleness=100), auto_aggregate=False
    )
    coordinator.start("127.0.0.1:0")
    client = EdgeClient(tmp_path / "device", "device-0", durability=Durability.PROCESS, fine_tuning="head")
    cut_in: set[str] = set()
    try:
        # cut_after 0: nothing reaches the coordinator, not even Hello.
        with channel_interceptors(LinkCutter(0)), pytest.raises(LinkDropped) as dropped:
            client.sync(coordinator.address, attempts=1)
        assert dropped.value.code().name == "UNAVAILABLE"
        assert coordinator.store.conn.execute("SELECT COUNT(*) FROM devices").fetchone()[0] == 0
        client.sync(coordinator.address)
        client.fine_tune(train.x[:64], train.y[:64], epochs=1, learning_rate=0.5)
        client.sync(coordinator.address)
        # Each round: events, a delta and a new version to download, so a session passes through
        # every kind of call; the link drops one message later each time, and the next sync resumes.
        for cut_after in range(20):
            assert coordinator.aggregate_now(force=True) is not None  # from the delta the last sync brought
            for x in train.x[cut_after * 3 : cut_after * 3 + 3]:
                client.predict(x)
            client.fine_tune(train.x[:64], train.y[:64], epochs=1, learning_rate=0.5, seed=cut_after)
            cutter = LinkCutter(cut_after)
            with channel_interceptors(cutter):
                try:
                    client.sync(coordinator.address, attempts=1)
                except LinkDropped as exc:
                    assert cutter.tripped and cutter.passed == cut_after
                    cut_in.add(exc.method.rsplit("/", 1)[-1])
                else:
                    assert not cutter.tripped
            client.sync(coordinator.address)
            stored = coordinator.store.conn.execute(
                f"SELECT {EVENT_COLUMNS} FROM events WHERE device_id = ? ORDER BY seq", ("device-0",)
            ).fetchall()
            assert [tuple(r) for r in stored] == journal_events(tmp_path / "device")
            deltas = coordinator.store.conn.execute("SELECT seq FROM deltas ORDER BY seq").fetchall()
            assert [seq for (seq,) in deltas] == list(range(1, cut_after + 3))
            assert client.journal.pending_delta_count() == 0
            assert client.model_version == coordinator.version
            # A surer rival prediction of the device's newest input: a correction waits for the next
            # sync (without one, a session skips PullCorrections).
            _, input_hash, label, _, version, _ = stored[-1]
            rival = EventRow(cut_after + 1, bytes(input_hash), (label + 1) % 10, 1.0, version, 0.0, cut_after + 1)
            with coordinator.store.lock:
                coordinator.store.touch_device("device-rival")
                coordinator.store.add_events("device-rival", [rival])
        assert cut_in == cut_calls
        client.sync(coordinator.address)
        assert client.cache.correction(bytes(input_hash)) is not None  # the last correction arrived
    finally:
        client.close()
        coordinator.stop()


def test_sync_device_reports_a_cut_without_raising(tmp_path: Path) -> None:
    coordinator = Coordinator(tmp_path / "coordinator", auto_aggregate=False)
    coordinator.start("127.0.0.1:0")
    client = EdgeClient(tmp_path / "device", "device-7", durability=Durability.PROCESS, fine_tuning="head")
    try:
        cut = sync_device(client, 7, coordinator.address, cut_after=3)
        assert cut.dropout and cut.cut and cut.device == 7 and cut.cut_bytes > 0 and cut.bytes_down == 0
        late = sync_device(client, 7, coordinator.address, cut_after=100)  # the session ends first
        assert late.dropout and not late.cut and late.bytes_down > 0 and client.model_version == 1
        whole = sync_device(client, 7, coordinator.address, cut_after=None)
        assert not whole.dropout and not whole.cut
    finally:
        client.close()
        coordinator.stop()


def test_device_speed_scales_predictions_and_local_epochs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    epochs: dict[str, list[int]] = {}
    original = EdgeClient.fine_tune

    def recording_fine_tune(self: EdgeClient, *args: object, **kwargs: object) -> int:
        epochs.setdefault(self.device_id, []).append(int(kwargs["epochs"]))  # type: ignore[call-overload]
        return original(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(EdgeClient, "fine_tune", recording_fine_tune)
    config = small_fleet(tmp_path, rounds=3, speed_min=0.25, speed_max=2.0, predictions_per_round=4, local_epochs=4)
    report = run_simulation(config)
    model = config.connectivity()
    speeds = [DeviceSchedule(model, config.seed, i).speed_factor for i in range(config.devices)]
    per_round = [scaled_workload(4, s) for s in speeds]
    assert len(set(per_round)) > 1  # the fleet is heterogeneous
    for i, speed in enumerate(speeds):
        # Always online: the model arrives in round 1, devices work in rounds 2 and 3.
        assert len(journal_events(device_home(config, i))) == 2 * per_round[i]
        assert set(epochs[device_id(i)]) == {scaled_workload(4, speed)}
    assert report.events_journaled == 2 * sum(per_round)


def test_scaled_workload() -> None:
    assert scaled_workload(8, 1.0) == 8
    assert scaled_workload(8, 0.5) == 4 and scaled_workload(8, 2.0) == 16
    assert scaled_workload(1, 0.1) == 1  # a slow device still does some work
    assert scaled_workload(0, 2.0) == 0


def test_a_seed_fixes_which_syncs_drop_and_where() -> None:
    from fedsync.sim.connectivity import ConnectivityModel

    model = ConnectivityModel(dropout_prob=0.3)
    a, b = DeviceSchedule(model, 5, 2), DeviceSchedule(model, 5, 2)
    points = [a.sync_cut_point(n, 16) for n in range(200)]
    assert [b.sync_cut_point(n, 16) for n in reversed(range(200))][::-1] == points  # query order is irrelevant
    assert [p is not None for p in points] == [a.sync_dropped(n) for n in range(200)]
    cuts = [p for p in points if p is not None]
    assert 30 < len(cuts) < 90 and all(0 <= p < 16 for p in cuts) and len(set(cuts)) > 8
    assert np.mean(cuts) == pytest.approx(7.5, abs=2.5)
