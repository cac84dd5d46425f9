"""Graceful degradation and exactly-once delivery when the network fails mid-sync.

A real coordinator and a real edge client talk through tests.faultproxy.FaultProxy, which resets
connections at chosen byte offsets, refuses connections, or stalls. Whatever happens, the client's
acknowledged marks never run ahead of what the coordinator committed, and once the network is
back, one fault-free sync leaves the coordinator in exactly the state a fault-free run reaches
from the same journal (same events, deltas, resolutions and corrections: no loss, no duplicate).

Notes: gRPC may transparently retry an RPC on a new connection when a cut hits before the server
saw it, so a cut sync can still complete (then on two connections). Right after a cut, a new
channel to the same address can fail fast once ("failed to connect to all addresses"): channels
share subchannels, and their reconnect backoff, through gRPC's global subchannel pool; the
fault-free syncs below use the client's retries (attempts=3) for that reason.

The expensive part (a journal of 5,000 predictions and two fine-tuned deltas, and the reference
run) is built once per module; each scenario works on copies of those folders.
"""

from __future__ import annotations

import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from client import EdgeClient
from client import sync as client_sync
from client.journal import Durability
from client.sync import SyncReport
from coordinator import Coordinator
from coordinator.store import EventColumns
from fedsync.aggregation import Strategy
from fedsync.sim.data import load_digits_split
from tests.faultproxy import FaultProxy

DEVICE = "edge-faults"
PEER = "peer-device"
NUM_EVENTS = 5000
EVENT_BATCH = 500  # client.sync sends 8,192 a batch: smaller here, so one sync is several batches
CONFLICT_EVERY = 25  # the peer labels every 25th input differently, with full confidence
SYNC_TIMEOUT_S = 10.0
CLEAN_ATTEMPTS = 3  # the client's default
# What a failed sync may raise: the transport broke (reset, refused, stalled past the deadline).
TRANSPORT_CODES = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}


def start_coordinator(data_dir: Path) -> Coordinator:
    coordinator = Coordinator(
        data_dir,
        strategy=Strategy.fedbuff(buffer_size=100),
        auto_aggregate=False,
        publish_int8=False,
        publish_trainable_head=False,
    )
    coordinator.start("127.0.0.1:0")
    return coordinator


def open_client(home: Path) -> EdgeClient:
    return EdgeClient(home, DEVICE, durability=Durability.PROCESS)


# -- state snapshots (timestamps of arrival and cursors excluded: they depend on timing) -------


# Columns that depend on when something arrived, not on what: left out of comparisons.
TIMING_COLUMNS = {"received_ns", "created_ns", "first_seen_ns", "last_seen_ns", "cursor"}


def _table(coordinator: Coordinator, table: str, where: str = "", params: tuple = ()) -> list[tuple]:
    conn = coordinator.store.conn
    columns = [row[1] for row in conn.execute(f"PRAGMA table_info({table})") if row[1] not in TIMING_COLUMNS]
    rows = conn.execute(f"SELECT {', '.join(columns)} FROM {table} {where}", params).fetchall()
    if "payload_file" in columns:  # payloads kept in files: compare their content
        at = columns.index("payload_file")
        deltas_dir = Path(coordinator.store.deltas_dir)
        rows = [
            (*row[:at], None if row[at] is None else (deltas_dir / row[at]).read_bytes(), *row[at + 1 :])
            for row in rows
        ]
    return sorted(rows, key=repr)


def coordinator_state(coordinator: Coordinator) -> dict[str, list[tuple]]:
    return {
        "devices": _table(coordinator, "devices"),
        "events": coordinator_events(coordinator),
        "deltas": _table(coordinator, "deltas"),
        "resolutions": _table(coordinator, "resolutions"),
        "corrections": _table(coordinator, "corrections"),
        "event_count": coordinator.store.conn.execute(
            "SELECT device_id, COUNT(*) FROM events GROUP BY device_id ORDER BY device_id"
        ).fetchall(),
    }


def coordinator_events(coordinator: Coordinator) -> list[tuple]:
    return coordinator.store.conn.execute(
        "SELECT seq, input_hash, label, confidence, model_version, latency_us, time_ns FROM events "
        "WHERE device_id = ? ORDER BY seq",
        (DEVICE,),
    ).fetchall()


def client_state(client: EdgeClient) -> dict[str, object]:
    sql = client.journal.conn.execute
    return {
        "events_acked": client.journal.events_acked(),
        "deltas_acked": client.journal.deltas_acked(),
        "pending": (client.journal.pending_event_count(), client.journal.pending_delta_count()),
        "corrections": sorted(
            (c.input_hash, c.label, c.confidence, c.model_version) for c in client.cache.corrections()
        ),
        "corrected_cache": sql(
            "SELECT input_hash, model_version, label, corrected FROM prediction_cache "
            "ORDER BY input_hash, model_version"
        ).fetchall(),
        "model_version": client.model_version,
        "delta_status": [
            client.journal.delta_status(seq) for (seq,) in sql("SELECT seq FROM deltas ORDER BY seq").fetchall()
        ],
    }


def journal_events(client: EdgeClient, up_to: int | None = None) -> list[tuple]:
    """The journal's events as the coordinator stores them (latency travels as a float32)."""
    rows = client.journal.conn.execute(
        "SELECT seq, input_hash, label, confidence, model_version, latency_us, time_ns FROM events "
        "WHERE seq <= ? ORDER BY seq",
        (up_to if up_to is not None else 2**62,),
    ).fetchall()
    return [(*row[:5], float(np.float32(row[5] or 0.0)), row[6]) for row in rows]


def check_marks(client: EdgeClient, coordinator: Coordinator) -> None:
    """The client's acknowledged marks never exceed what the coordinator committed, and what the
    coordinator committed is exactly the journal's prefix up to its mark."""
    # The server may still be ingesting a batch that arrived before a cut, on the connection these
    # reads share: hold the store's lock so they see committed transactions only, all at one moment.
    with coordinator.store.lock:
        events_hw, deltas_hw = coordinator.store.high_waters(DEVICE)
        stored = coordinator_events(coordinator)
        stored_deltas = coordinator.store.conn.execute(
            "SELECT seq, payload_sha256 FROM deltas WHERE device_id = ? ORDER BY seq", (DEVICE,)
        ).fetchall()
    assert client.journal.events_acked() <= events_hw
    assert client.journal.deltas_acked() <= deltas_hw
    assert len(stored) == events_hw
    assert stored == journal_events(client, events_hw)
    assert [seq for seq, _ in stored_deltas] == list(range(1, deltas_hw + 1))
    journal_deltas = client.journal.conn.execute(
        "SELECT seq, payload_sha256 FROM deltas WHERE seq <= ? ORDER BY seq", (deltas_hw,)
    ).fetchall()
    assert stored_deltas == journal_deltas


# -- the module's template: a journal built offline, and the fault-free reference run ---------


@dataclass
class Template:
    coordinator_dir: Path
    home: Path
    reference_coordinator: dict[str, list[tuple]]
    reference_client: dict[str, object]
    full_up: int  # bytes a fault-free sync sends through the proxy
    full_down: int
    test_x: np.ndarray


@pytest.fixture(scope="module", autouse=True)
def small_event_batches() -> Iterator[None]:
    """Ten batches instead of one, so a cut can fall between acknowledged batches of one stream."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(client_sync, "EVENT_BATCH_SIZE", EVENT_BATCH)
        yield


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory, small_event_batches: None) -> Template:
    root = tmp_path_factory.mktemp("sync-faults")
    train, test = load_digits_split(seed=0)
    coordinator = start_coordinator(root / "coordinator")
    client = open_client(root / "home")
    try:
        assert client.sync(coordinator.address).installed_version == 1  # directly, not via the proxy
        rng = np.random.default_rng(7)
        for i in range(NUM_EVENTS):
            x = test.x[i % len(test.x)]
            client.predict(x + rng.normal(0.0, 0.01, size=x.shape).astype(np.float32))
        client.fine_tune(train.x[:200], train.y[:200], epochs=2, seed=1)
        client.fine_tune(train.x[200:400], train.y[200:400], epochs=2, seed=2)
        # Another device saw some of the same inputs and labelled them differently, with full
        # confidence: when this device's events arrive, they lose and corrections are queued.
        events = journal_events(client)[::CONFLICT_EVERY]
        coordinator.store.add_events(
            PEER,
            EventColumns(
                list(range(1, len(events) + 1)),
                [row[1] for row in events],
                [(row[2] + 1) % 10 for row in events],
                [1.0] * len(events),
                [1] * len(events),
                [1.0] * len(events),
                [row[6] for row in events],
            ),
        )
        assert client.journal.pending_event_count() == NUM_EVENTS
        assert client.journal.pending_delta_count() == 2
    finally:
        client.close()
        coordinator.stop()

    # The reference: the same folders synced once without faults, through the proxy (to measure it).
    shutil.copytree(root / "coordinator", root / "ref-coordinator")
    shutil.copytree(root / "home", root / "ref-home")
    coordinator = start_coordinator(root / "ref-coordinator")
    client = open_client(root / "ref-home")
    proxy = FaultProxy(coordinator.port)
    try:
        report = client.sync(proxy.address, attempts=1)
        assert (report.events_sent, report.events_duplicates, report.deltas_sent) == (NUM_EVENTS, 0, 2)
        assert report.corrections_applied == len(range(0, NUM_EVENTS, CONFLICT_EVERY)) > 0
        full_up, full_down = proxy.bytes_up, proxy.bytes_down
        again = client.sync(proxy.address, attempts=1)
        assert (again.events_sent, again.events_duplicates, again.deltas_sent, again.corrections_applied) == (
            0,
            0,
            0,
            0,
        )
        reference_coordinator = coordinator_state(coordinator)
        reference_client = client_state(client)
        assert reference_client["pending"] == (0, 0)
        assert reference_coordinator["events"] == journal_events(client)
    finally:
        proxy.close()
        client.close()
        coordinator.stop()
    return Template(
        root / "coordinator",
        root / "home",
        reference_coordinator,
        reference_client,
        full_up,
        full_down,
        test.x,
    )


class Rig:
    """Copies of the template's folders, a coordinator on one, the client on the other, a proxy between."""

    def __init__(self, template: Template, workdir: Path) -> None:
        self.template = template
        self.data_dir = workdir / "coordinator"
        shutil.copytree(template.coordinator_dir, self.data_dir)
        shutil.copytree(template.home, workdir / "home")
        self.coordinator = start_coordinator(self.data_dir)
        self.proxy = FaultProxy(self.coordinator.port)
        self.client = open_client(workdir / "home")
        self.errors: list[grpc.RpcError] = []

    def attempt(self, timeout_s: float = SYNC_TIMEOUT_S) -> SyncReport | None:
        """One sync through the proxy; None when it failed on the transport."""
        try:
            return self.client.sync(self.proxy.address, attempts=1, timeout_s=timeout_s)
        except grpc.RpcError as exc:
            assert exc.code() in TRANSPORT_CODES, f"unexpected {exc.code()}: {exc.details()}"
            self.errors.append(exc)
            return None

    def clean_sync(self) -> SyncReport:
        """A sync once the network is back, with the client's own retries: gRPC may still fail the
        first connection attempt fast right after a cut (see the module's notes)."""
        return self.client.sync(self.proxy.address, attempts=CLEAN_ATTEMPTS, timeout_s=SYNC_TIMEOUT_S)

    def restart(self) -> None:
        """A new coordinator process on the same folder, on a new port."""
        self.coordinator.stop(grace_s=0)
        self.coordinator = start_coordinator(self.data_dir)
        self.proxy.retarget(self.coordinator.port)

    def check_marks(self) -> None:
        check_marks(self.client, self.coordinator)

    def finish_and_compare(self) -> None:
        """One fault-free sync delivers everything: the state equals the reference run's."""
        self.proxy.disarm()
        self.proxy.set_down(False)
        self.proxy.set_stalled(False)
        report = self.clean_sync()
        self.check_marks()
        assert report.install_error is None
        assert coordinator_state(self.coordinator) == self.template.reference_coordinator
        assert client_state(self.client) == self.template.reference_client
        again = self.clean_sync()
        assert (again.events_sent, again.events_duplicates, again.deltas_sent) == (0, 0, 0)

    def close(self) -> None:
        self.client.close()
        self.proxy.close()
        self.coordinator.stop(grace_s=0)


@pytest.fixture
def rig(template: Template, tmp_path: Path) -> Iterator[Rig]:
    rig = Rig(template, tmp_path)
    yield rig
    rig.close()


# -- the proxy itself ---------------------------------------------------------------------------


@pytest.fixture
def echo_port() -> Iterator[int]:
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.2)
    stopping = threading.Event()
    handlers: list[threading.Thread] = []

    def handle(conn: socket.socket) -> None:
        with conn:
            while True:
                try:
                    data = conn.recv(65536)
                except OSError:
                    return
                if not data:
                    return
                try:
                    conn.sendall(data)
                except OSError:
                    return

    def serve() -> None:
        while not stopping.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            thread = threading.Thread(target=handle, args=(conn,), daemon=True)
            thread.start()
            handlers.append(thread)

    acceptor = threading.Thread(target=serve, daemon=True)
    acceptor.start()
    yield server.getsockname()[1]
    stopping.set()
    acceptor.join(timeout=5)
    server.close()
    for thread in handlers:
        thread.join(timeout=5)


def _connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=5)


def _dropped(port: int) -> bool:
    """True when a connection to the port is reset or closed before anything comes back."""
    try:
        with _connect(port) as sock:
            sock.sendall(b"hello")
            return sock.recv(10) == b""
    except (ConnectionResetError, BrokenPipeError, ConnectionRefusedError):
        return True


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    data = bytearray()
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            break
        data += chunk
    return bytes(data)


def test_proxy_forwards_both_ways_and_counts(echo_port: int) -> None:
    with FaultProxy(echo_port) as proxy, _connect(proxy.port) as sock:
        payload = bytes(range(256)) * 1000
        sock.sendall(payload)
        assert _recv_exactly(sock, len(payload)) == payload
        assert proxy.bytes_up == len(payload) and proxy.bytes_down == len(payload)
        assert proxy.connections_accepted == 1 and proxy.live_connections == 1


def test_proxy_cut_after_upstream_bytes_resets_at_that_offset(echo_port: int) -> None:
    with FaultProxy(echo_port) as proxy, _connect(proxy.port) as sock:
        sock.sendall(b"x" * 100)
        assert _recv_exactly(sock, 100) == b"x" * 100
        proxy.cut_after(upstream_bytes=1000)
        assert proxy.armed
        sock.sendall(b"y" * 900)
        assert _recv_exactly(sock, 900) == b"y" * 900
        sock.sendall(b"z" * 5000)
        assert proxy.wait_triggered(timeout=5)
        received = bytearray()
        with pytest.raises(ConnectionResetError):
            while chunk := sock.recv(65536):
                received += chunk
        assert bytes(received) in (b"", b"z" * 100)  # the 100 bytes up to the cut, if echoed in time
        assert proxy.bytes_up == 100 + 1000 and proxy.cuts == 1 and not proxy.armed
        # One-shot: the next connection works.
        with _connect(proxy.port) as again:
            again.sendall(b"ok")
            assert _recv_exactly(again, 2) == b"ok"


def test_proxy_cut_after_downstream_bytes(echo_port: int) -> None:
    with FaultProxy(echo_port) as proxy, _connect(proxy.port) as sock:
        proxy.cut_after(downstream_bytes=10)
        sock.sendall(b"a" * 50)
        data = bytearray()
        with pytest.raises(ConnectionResetError):
            while chunk := sock.recv(65536):
                data += chunk
        assert bytes(data) == b"a" * 10
        assert proxy.bytes_down == 10 and proxy.cuts == 1


def test_proxy_cut_all_set_down_stall_and_retarget(echo_port: int) -> None:
    with FaultProxy(echo_port) as proxy:
        first, second = _connect(proxy.port), _connect(proxy.port)
        for sock in (first, second):
            sock.sendall(b"hi")
            assert _recv_exactly(sock, 2) == b"hi"
        assert proxy.cut_all() == 2 and proxy.cuts == 2
        for sock in (first, second):
            with pytest.raises(ConnectionResetError):
                sock.recv(10)
            sock.close()

        proxy.set_down(True)
        assert _dropped(proxy.port)
        assert proxy.connections_refused >= 1
        proxy.set_down(False)

        with _connect(proxy.port) as sock:
            proxy.set_stalled(True)
            sock.sendall(b"held")
            sock.settimeout(0.3)
            with pytest.raises(TimeoutError):
                sock.recv(10)
            proxy.set_stalled(False)
            sock.settimeout(5)
            assert _recv_exactly(sock, 4) == b"held"

        with _connect(proxy.port) as sock:
            proxy.stall_after(upstream_bytes=3)
            sock.sendall(b"abcdef")
            assert proxy.wait_triggered(timeout=5) and proxy.stalled
            sock.settimeout(0.3)
            with pytest.raises(TimeoutError):  # everything stalls, the echo of "abc" included
                sock.recv(10)
            proxy.set_stalled(False)
            sock.settimeout(5)
            assert _recv_exactly(sock, 6) == b"abcdef"

        # Nothing listens on the old target any more: connections are reset until retargeted.
        with socket.create_server(("127.0.0.1", 0)) as placeholder:
            dead_port = placeholder.getsockname()[1]
        proxy.retarget(dead_port)
        assert _dropped(proxy.port)
        proxy.retarget(echo_port)
        with _connect(proxy.port) as sock:
            sock.sendall(b"back")
            assert _recv_exactly(sock, 4) == b"back"
    assert not proxy._thread.is_alive()


# -- sync under faults --------------------------------------------------------------------------


def assert_cut_sync_failed(rig: Rig, report: SyncReport | None) -> None:
    """A sync cut before its end fails, unless gRPC retried an RPC transparently on a new
    connection (it does so for an RPC the server never saw, e.g. when the very first bytes are cut)."""
    if report is not None:
        assert rig.proxy.connections_accepted >= 2, f"a cut sync completed on one connection: {report}"


UPSTREAM_FRACTIONS = (0.0, 0.001, 0.02, 0.1, 0.3, 0.5, 0.7, 0.9, 0.99)
DOWNSTREAM_FRACTIONS = (0.0, 0.05, 0.2, 0.5, 0.8, 0.95)


@pytest.mark.parametrize("fraction", UPSTREAM_FRACTIONS)
def test_upstream_cut_then_clean_sync_delivers_exactly_once(rig: Rig, fraction: float) -> None:
    offset = int(rig.template.full_up * fraction)
    rig.proxy.cut_after(upstream_bytes=offset)
    report = rig.attempt()
    assert rig.proxy.cuts == 1  # less than a whole sync's upload always triggers
    if fraction <= 0.9:
        assert_cut_sync_failed(rig, report)
    rig.check_marks()
    rig.finish_and_compare()


@pytest.mark.parametrize("fraction", DOWNSTREAM_FRACTIONS)
def test_downstream_cut_loses_acks_but_not_events(rig: Rig, fraction: float) -> None:
    """Acks lost after the coordinator's commit: the client resends, the coordinator recognizes
    the retransmissions, and the marks come from the next Hello."""
    offset = int(rig.template.full_down * fraction)
    rig.proxy.cut_after(downstream_bytes=offset)
    report = rig.attempt()
    assert rig.proxy.cuts == 1
    if fraction <= 0.8:
        assert_cut_sync_failed(rig, report)
    rig.check_marks()
    rig.finish_and_compare()


def test_no_network_fails_fast_and_changes_nothing(rig: Rig) -> None:
    rig.proxy.set_down(True)
    started = time.monotonic()
    assert rig.attempt() is None
    assert time.monotonic() - started < SYNC_TIMEOUT_S / 2
    assert rig.errors[-1].code() == grpc.StatusCode.UNAVAILABLE
    assert rig.proxy.connections_refused >= 1 and rig.proxy.bytes_up == 0
    assert rig.coordinator.store.high_waters(DEVICE) == (0, 0)
    assert rig.client.journal.pending_event_count() == NUM_EVENTS
    rig.finish_and_compare()


def test_coordinator_killed_mid_stream_and_restarted(rig: Rig) -> None:
    """The coordinator stops while a PushEvents stream is half-way: whatever it committed stays,
    the rest comes with the next sync to the restarted coordinator."""
    rig.proxy.stall_after(upstream_bytes=rig.template.full_up // 3)
    outcome: list[SyncReport | None] = []
    syncing = threading.Thread(target=lambda: outcome.append(rig.attempt()), daemon=True)
    syncing.start()
    assert rig.proxy.wait_triggered(timeout=SYNC_TIMEOUT_S)
    time.sleep(0.2)  # let the coordinator commit what reached it
    events_before, _ = rig.coordinator.store.high_waters(DEVICE)
    assert 0 < events_before < NUM_EVENTS
    rig.restart()
    rig.proxy.cut_all()
    rig.proxy.set_stalled(False)
    syncing.join(timeout=SYNC_TIMEOUT_S * 2)
    assert not syncing.is_alive() and outcome == [None]
    rig.check_marks()
    assert rig.coordinator.store.high_waters(DEVICE)[0] >= events_before  # nothing committed was lost
    rig.finish_and_compare()


def test_cut_model_download_keeps_serving_and_installs_later(rig: Rig) -> None:
    """A cut download leaves the installed version serving; the next sync installs the new one."""
    rig.clean_sync()
    published = rig.coordinator.aggregate_now()
    assert published is not None and published.version == 2
    failed_on_v1 = 0
    for offset in (150, 1_000, 5_000, 20_000):
        rig.proxy.cut_after(downstream_bytes=offset)
        report = rig.attempt()
        rig.proxy.disarm()
        failed_on_v1 += report is None and rig.client.model_version == 1
        assert rig.client.predict(rig.template.test_x[0]).model_version == rig.client.model_version
        assert not list((rig.client.home / "models").glob("v2/*.partial"))
    assert failed_on_v1 >= 1
    rig.clean_sync()
    assert rig.client.model_version == 2
    assert rig.client.predict(rig.template.test_x[1]).model_version == 2
    rig.check_marks()


@pytest.mark.parametrize("stall", ["refused", "stalled_hello", "stalled_mid_stream"])
def test_predict_is_not_blocked_by_a_stalled_sync(rig: Rig, stall: str) -> None:
    timeout_s = 4.0
    if stall == "refused":
        rig.proxy.set_down(True)
        timeout_s = 1.0
    elif stall == "stalled_hello":
        rig.proxy.set_stalled(True)
    else:
        rig.proxy.stall_after(upstream_bytes=rig.template.full_up // 2)
    errors: list[BaseException] = []

    def sync() -> None:
        try:
            rig.client.sync(rig.proxy.address, attempts=2 if stall == "refused" else 1, timeout_s=timeout_s)
        except BaseException as exc:  # checked below
            errors.append(exc)

    syncing = threading.Thread(target=sync, daemon=True)
    syncing.start()
    if stall == "stalled_mid_stream":
        assert rig.proxy.wait_triggered(timeout=SYNC_TIMEOUT_S)
    else:
        time.sleep(0.1)
    predictions = [rig.client.predict(x) for x in rig.template.test_x[:50]]
    # The predictions finished while the sync was still stuck: predict never waited for it.
    assert syncing.is_alive(), "the sync should still be stalled while predicting"
    assert [p.seq for p in predictions] == list(range(NUM_EVENTS + 1, NUM_EVENTS + 51))
    # End the stall with a cut (a stalled PushEvents would otherwise wait for its deadline, 10 x timeout_s).
    rig.proxy.cut_all()
    rig.proxy.set_stalled(False)
    syncing.join(timeout=timeout_s * 3 + 5)
    assert not syncing.is_alive()
    assert len(errors) == 1 and isinstance(errors[0], grpc.RpcError), errors
    assert errors[0].code() in TRANSPORT_CODES
    rig.check_marks()

    rig.proxy.set_down(False)
    rig.proxy.set_stalled(False)
    rig.clean_sync()
    rig.check_marks()
    assert coordinator_events(rig.coordinator) == journal_events(rig.client)
    assert rig.client.journal.pending_event_count() == 0


def test_predicting_throughout_cut_syncs_loses_nothing(rig: Rig) -> None:
    """Inference keeps journaling while syncs are cut at several points; in the end the coordinator
    holds exactly the journal, the events predicted during the syncs included."""
    stop = threading.Event()
    failures: list[BaseException] = []
    predicted: list[int] = []

    def predict_loop() -> None:
        rng = np.random.default_rng(11)
        x = rig.template.test_x
        try:
            while not stop.is_set():
                sample = x[len(predicted) % len(x)] + rng.normal(0.0, 0.01, size=x.shape[1:]).astype(np.float32)
                predicted.append(rig.client.predict(sample).seq)
        except BaseException as exc:  # checked below
            failures.append(exc)

    predicting = threading.Thread(target=predict_loop, daemon=True)
    predicting.start()
    try:
        for fraction in (0.15, 0.5, 0.85):
            rig.proxy.cut_after(upstream_bytes=int(rig.template.full_up * fraction))
            rig.attempt()
            rig.proxy.disarm()
            rig.check_marks()
        rig.clean_sync()
    finally:
        stop.set()
        predicting.join(timeout=10)
    assert not failures, failures
    assert len(predicted) > 0 and predicted == list(range(NUM_EVENTS + 1, NUM_EVENTS + 1 + len(predicted)))
    rig.clean_sync()
    rig.check_marks()
    assert coordinator_events(rig.coordinator) == journal_events(rig.client)
    assert rig.client.journal.pending_event_count() == 0


# -- property: any schedule of faults converges to the fault-free state -------------------------

PER_MILLE = st.integers(min_value=0, max_value=1000)
STEP = st.one_of(
    st.tuples(st.just("cut_up"), PER_MILLE),
    st.tuples(st.just("cut_down"), PER_MILLE),
    st.tuples(st.just("cut_either"), PER_MILLE, PER_MILLE),
    st.tuples(st.just("offline"), st.just(0)),
    st.tuples(st.just("restart"), st.just(0)),
    st.tuples(st.just("restart_mid_stream"), PER_MILLE),
)


def _attempt_into(rig: Rig, failures: list[BaseException]) -> None:
    try:
        rig.attempt()
    except BaseException as exc:  # re-raised by the test's thread
        failures.append(exc)


@settings(
    max_examples=15,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(schedule=st.lists(STEP, min_size=1, max_size=5))
def test_any_fault_schedule_converges_to_the_fault_free_state(template: Template, schedule: list[tuple]) -> None:
    with tempfile.TemporaryDirectory(prefix="fedsync-faults-") as workdir:
        rig = Rig(template, Path(workdir))
        try:
            for step in schedule:
                kind = step[0]
                if kind == "cut_up":
                    rig.proxy.cut_after(upstream_bytes=template.full_up * step[1] // 1000)
                elif kind == "cut_down":
                    rig.proxy.cut_after(downstream_bytes=template.full_down * step[1] // 1000)
                elif kind == "cut_either":
                    rig.proxy.cut_after(
                        upstream_bytes=template.full_up * step[1] // 1000,
                        downstream_bytes=template.full_down * step[2] // 1000,
                    )
                elif kind == "offline":
                    rig.proxy.set_down(True)
                elif kind == "restart":
                    rig.restart()
                    continue
                if kind == "restart_mid_stream":
                    rig.proxy.stall_after(upstream_bytes=template.full_up * step[1] // 1000)
                    failures: list[BaseException] = []
                    syncing = threading.Thread(target=_attempt_into, args=(rig, failures), daemon=True)
                    syncing.start()
                    triggered = rig.proxy.wait_triggered(timeout=2.0)
                    syncing.join(timeout=0.0 if triggered else SYNC_TIMEOUT_S)
                    rig.restart()
                    rig.proxy.cut_all()
                    rig.proxy.set_stalled(False)
                    syncing.join(timeout=SYNC_TIMEOUT_S * 2)
                    assert not syncing.is_alive()
                    assert not failures, failures
                else:
                    rig.attempt()
                rig.proxy.disarm()
                rig.proxy.set_down(False)
                rig.check_marks()
            event(f"connections cut: {min(rig.proxy.cuts, 3)}{'+' if rig.proxy.cuts > 3 else ''}")
            event(f"failed syncs: {min(len(rig.errors), 3)}{'+' if len(rig.errors) > 3 else ''}")
            event(f"events committed before the last sync: {_bucket(rig.coordinator.store.high_waters(DEVICE)[0])}")
            rig.finish_and_compare()
        finally:
            rig.close()


def _bucket(events: int) -> str:
    return "none" if events == 0 else "all" if events == NUM_EVENTS else "some"


def test_a_stalled_event_stream_is_cancelled_after_the_call_timeout(tmp_path: Path) -> None:
    """A link that stops moving bytes mid-stream must not hold the sync for minutes."""
    from client.sync import StalledError

    coordinator = Coordinator(
        tmp_path / "coordinator",
        strategy=Strategy.fedbuff(buffer_size=100),
        auto_aggregate=False,
        publish_int8=False,
        publish_trainable_head=False,
    )
    coordinator.start("127.0.0.1:0")
    client = EdgeClient(tmp_path / "device", "device", durability=Durability.PROCESS, fine_tuning=None)
    try:
        client.sync(coordinator.address)
        client.journal.append_events([(bytes([i % 256]) * 32, i % 10, 0.5, 1, 1.0) for i in range(40_000)])
        with FaultProxy(coordinator.port) as proxy:
            proxy.stall_after(upstream_bytes=200_000)
            started = time.monotonic()
            with pytest.raises(grpc.RpcError) as info:
                client.sync(proxy.address, attempts=1, timeout_s=2.0)
            assert time.monotonic() - started < 30
            assert isinstance(info.value, StalledError) or info.value.code() in (
                grpc.StatusCode.DEADLINE_EXCEEDED,
                grpc.StatusCode.UNAVAILABLE,
            )
        assert client.sync(coordinator.address).events_duplicates >= 0
        assert client.journal.pending_event_count() == 0
    finally:
        client.close()
        coordinator.stop()
