"""Coordinator durability: POWER fsyncs a delta's payload file and its directory before the ack and
commits with synchronous=FULL; PROCESS skips those fsyncs (WAL, synchronous=NORMAL) and still keeps
everything it acknowledged when the coordinator process is killed with SIGKILL. Also the cheaper
Hello: one statement that registers the device and reads its marks."""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from coordinator import Coordinator
from coordinator.store import CoordinatorStore, Durability
from fedsync.codecs import get_codec
from fedsync.v1 import sync_pb2 as pb
from fedsync.v1.sync_pb2_grpc import SyncStub
from fedsync.wire import DEVICE_METADATA_KEY, channel_options

REPO = Path(__file__).resolve().parents[1]
TIMEOUT_S = 20.0
DEVICE = "edge-1"
MD = ((DEVICE_METADATA_KEY, DEVICE),)


def make_coordinator(data_dir: Path, durability: Durability) -> Coordinator:
    coordinator = Coordinator(
        data_dir, auto_aggregate=False, publish_int8=False, publish_trainable_head=False, durability=durability
    )
    coordinator.start("127.0.0.1:0")
    return coordinator


def delta(stub: SyncStub, seq: int, seed: int) -> tuple[pb.DeltaHeader, bytes]:
    """A valid float32 delta of the whole model, shaped after the published manifest."""
    info = stub.GetModelInfo(pb.GetModelInfoRequest(), metadata=MD, timeout=TIMEOUT_S)
    rng = np.random.default_rng(seed)
    tensors = {
        w["name"]: rng.normal(0.0, 1e-3, w["shape"]).astype(np.float32)
        for w in json.loads(info.manifest_json)["weights"]
    }
    specs, payload = get_codec("float32").encode(tensors)
    header = pb.DeltaHeader(
        seq=seq,
        base_version=info.version,
        num_examples=16,
        codec="float32",
        tensors=[pb.TensorSpec(name=s.name, shape=list(s.shape), dtype=s.dtype) for s in specs],
        payload_size=len(payload),
        payload_sha256=hashlib.sha256(payload).digest(),
        train_loss=0.5,
    )
    return header, payload


def chunks(header: pb.DeltaHeader, payload: bytes, chunk_bytes: int) -> list[pb.DeltaChunk]:
    return [pb.DeltaChunk(header=header)] + [
        pb.DeltaChunk(data=payload[i : i + chunk_bytes]) for i in range(0, len(payload), chunk_bytes)
    ]


def push_delta(stub: SyncStub, messages: list[pb.DeltaChunk]) -> pb.DeltaAck:
    return stub.PushDelta(iter(messages), metadata=MD, timeout=TIMEOUT_S)


def stored_payload(coordinator: Coordinator, seq: int) -> bytes:
    (stored,) = coordinator.store.iter_deltas([(DEVICE, seq)])
    return bytes(stored.payload)


@pytest.fixture
def count_fsyncs(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Every os.fsync from now on (the store's and fedsync.manifest.fsync_path's), by fd."""
    calls: list[int] = []
    real = os.fsync

    def fsync(fd: int) -> None:
        calls.append(fd)
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return calls


# --------------------------------------------------------------------------------------------
# what each durability fsyncs
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk_bytes", [1 << 22, 1024], ids=["one-chunk", "chunked"])
def test_process_durability_skips_the_fsyncs_power_makes(
    tmp_path: Path, count_fsyncs: list[int], chunk_bytes: int
) -> None:
    fsyncs: dict[Durability, int] = {}
    for durability in Durability:
        coordinator = make_coordinator(tmp_path / durability.name, durability)
        try:
            with grpc.insecure_channel(coordinator.address, options=channel_options()) as channel:
                stub = SyncStub(channel)
                stub.Hello(pb.HelloRequest(model_version=1), metadata=MD, timeout=TIMEOUT_S)
                header, payload = delta(stub, 1, seed=1)
                count_fsyncs.clear()
                ack = push_delta(stub, chunks(header, payload, chunk_bytes))
                fsyncs[durability] = len(count_fsyncs)
                assert (ack.status, ack.deltas_high_water) == (pb.DeltaAck.ACCEPTED, 1)
            assert stored_payload(coordinator, 1) == payload
            with coordinator.store.lock:
                synchronous = coordinator.store.conn.execute("PRAGMA synchronous").fetchone()[0]
                journal_mode = coordinator.store.conn.execute("PRAGMA journal_mode").fetchone()[0]
            assert (synchronous, journal_mode) == ({Durability.POWER: 2, Durability.PROCESS: 1}[durability], "wal")
        finally:
            coordinator.stop()
    # POWER: the payload file, then the deltas directory that names it.
    assert fsyncs == {Durability.POWER: 2, Durability.PROCESS: 0}


KILLABLE_COORDINATOR = """
import sys, time
sys.path.insert(0, {repo!r})
from coordinator import Coordinator
from coordinator.store import Durability
c = Coordinator({data_dir!r}, auto_aggregate=False, publish_int8=False, publish_trainable_head=False,
                durability=Durability.{durability})
print(c.start("127.0.0.1:0"), flush=True)
time.sleep(600)
"""


@pytest.mark.parametrize("durability", list(Durability), ids=lambda d: d.name)
def test_everything_acknowledged_survives_kill_9_of_the_coordinator(tmp_path: Path, durability: Durability) -> None:
    data_dir = tmp_path / "coordinator"
    script = KILLABLE_COORDINATOR.format(repo=str(REPO), data_dir=str(data_dir), durability=durability.name)
    process = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    )
    try:
        port = int(process.stdout.readline())  # type: ignore[union-attr]
        with grpc.insecure_channel(f"127.0.0.1:{port}", options=channel_options()) as channel:
            stub = SyncStub(channel)
            stub.Hello(pb.HelloRequest(model_version=1), metadata=MD, timeout=TIMEOUT_S)
            hashes = b"".join(hashlib.sha256(f"kill-9/{i}".encode()).digest() for i in range(3))
            events = pb.EventBatch(
                seq=[1, 2, 3],
                input_hashes=hashes,
                labels=[1, 2, 3],
                confidences=[0.5, 0.6, 0.7],
                model_versions=[1, 1, 1],
                latencies_us=[10.0, 10.0, 10.0],
                times_unix_ns=[1, 2, 3],
            )
            (ack,) = stub.PushEvents(iter([events]), metadata=MD, timeout=TIMEOUT_S)
            assert ack.high_water == 3
            payloads = []
            for seq, chunk_bytes in ((1, 1 << 22), (2, 1024)):  # one chunk, then chunked
                header, payload = delta(stub, seq, seed=seq)
                assert push_delta(stub, chunks(header, payload, chunk_bytes)).status == pb.DeltaAck.ACCEPTED
                payloads.append(payload)
            # Delta 3 is cut after 2048 bytes: resumable after the restart too.
            header3, payload3 = delta(stub, 3, seed=3)
            with pytest.raises(grpc.RpcError, match="ended after 2048"):
                push_delta(stub, chunks(header3, payload3, 1024)[:3])
    finally:
        process.kill()
        process.wait(timeout=30)
    assert process.returncode == -9

    coordinator = make_coordinator(data_dir, durability)
    try:
        assert coordinator.store.integrity_ok()
        with grpc.insecure_channel(coordinator.address, options=channel_options()) as channel:
            hello = SyncStub(channel).Hello(pb.HelloRequest(model_version=1), metadata=MD, timeout=TIMEOUT_S)
        assert (hello.events_high_water, hello.deltas_high_water) == (3, 2)
        assert (hello.delta_resume_offset, hello.delta_resume_sha256) == (2048, header3.payload_sha256)
        assert [stored_payload(coordinator, seq) for seq in (1, 2)] == payloads
        with coordinator.store.lock:
            stored = coordinator.store.conn.execute(
                "SELECT seq, input_hash FROM events WHERE device_id = ? ORDER BY seq", (DEVICE,)
            ).fetchall()
        assert stored == [(i + 1, hashes[32 * i : 32 * i + 32]) for i in range(3)]
    finally:
        coordinator.stop()


# --------------------------------------------------------------------------------------------
# touch_device: one statement
# --------------------------------------------------------------------------------------------


@pytest.fixture
def store(tmp_path: Path) -> Iterator[CoordinatorStore]:
    store = CoordinatorStore(tmp_path / "c.db", num_labels=10, durability=Durability.PROCESS)
    yield store
    store.close()


def device_row(store: CoordinatorStore) -> tuple[int, int, int]:
    return store.conn.execute(
        "SELECT model_version, first_seen_ns, last_seen_ns FROM devices WHERE device_id = ?", (DEVICE,)
    ).fetchone()


def test_touch_device_registers_refreshes_and_reports_the_marks(store: CoordinatorStore, tmp_path: Path) -> None:
    assert store.touch_device(DEVICE, 3) == (0, 0, 0)
    version, first_seen, last_seen = device_row(store)
    assert version == 3 and first_seen == last_seen > 0

    # None keeps the stored model version; first_seen never moves.
    assert store.touch_device(DEVICE) == (0, 0, 0)
    version, first_again, seen_again = device_row(store)
    assert (version, first_again) == (3, first_seen) and seen_again >= last_seen
    store.touch_device(DEVICE, 0)
    assert device_row(store)[0] == 0

    payload = b"\x00" * 16
    store.add_delta(
        DEVICE, 1, 1, 8, "float32", "[]", payload, hashlib.sha256(payload).digest(), 0.25, status="buffered"
    )
    marks = store.touch_device(DEVICE, 4)
    assert (marks.events_high_water, marks.deltas_high_water, marks.corrections_cursor) == (0, 1, 0)
    assert store.devices_seen_since(0) == 1 and store.versions_in_use() == {1, 4}

    # Committed and unlocked when it returns: another connection can write at once.
    other = sqlite3.connect(tmp_path / "c.db", timeout=0, isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")
        other.execute("ROLLBACK")
    finally:
        other.close()
    assert not store.conn.in_transaction
