"""Sync throughput: 200k journaled events from a client's SQLite into the coordinator's durable
SQLite over loopback gRPC, against the raw `executemany` SQLite ceiling measured in the same run;
resume cost after a cut at the midpoint; a 50 MB delta upload and model download, with an
interruption at the midpoint. Ends with one JSON line.

    .venv/bin/python bench/sync.py [--events 200000] [--delta-mb 50]
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fedsync._quiet import quiet_tensorflow_logs  # noqa: E402

quiet_tensorflow_logs()

import grpc  # noqa: E402
import numpy as np  # noqa: E402

from client import Durability, EdgeClient  # noqa: E402
from client.sync import DELTA_CHUNK_BYTES, EVENT_BATCH_SIZE  # noqa: E402
from coordinator import Coordinator  # noqa: E402
from fedsync.aggregation import Strategy  # noqa: E402
from fedsync.manifest import TFLITE_FLOAT32  # noqa: E402
from tests.faultproxy import FaultProxy  # noqa: E402


def event_rows(n: int, version: int = 1) -> list[tuple[bytes, int, float, int, float]]:
    rng = np.random.default_rng(0)
    confidences = rng.uniform(0.1, 1.0, n).astype(np.float32)
    return [
        (hashlib.sha256(i.to_bytes(8, "little")).digest(), i % 10, float(confidences[i]), version, 12.5)
        for i in range(n)
    ]


def sqlite_ceiling(root: Path, rows: list[tuple]) -> float:
    """Raw executemany into a durable WAL database, same rows, batch size and fsync policy as the coordinator."""
    conn = sqlite3.connect(root / "ceiling.db", isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute(
        "CREATE TABLE events (device_id TEXT, seq INTEGER, input_hash BLOB, label INTEGER, confidence REAL, "
        "model_version INTEGER, latency_us REAL, time_ns INTEGER)"
    )
    full = [("device", i + 1, *row, 0) for i, row in enumerate(rows)]
    start = time.perf_counter()
    for s in range(0, len(full), EVENT_BATCH_SIZE):
        conn.execute("BEGIN")
        conn.executemany("INSERT INTO events VALUES (?, ?, ?, ?, ?, ?, ?, ?)", full[s : s + EVENT_BATCH_SIZE])
        conn.execute("COMMIT")
    elapsed = time.perf_counter() - start
    conn.close()
    return len(rows) / elapsed


def journal_client(root: Path, name: str, coordinator: Coordinator, rows: list[tuple]) -> EdgeClient:
    client = EdgeClient(root / name, name, durability=Durability.PROCESS, fine_tuning=None)
    client.sync(coordinator.address)
    for s in range(0, len(rows), 50_000):
        client.journal.append_events(rows[s : s + 50_000])
    return client


SYNC_IN_A_CHILD = """
import json, sys, time
sys.path.insert(0, {repo!r})
from client import Durability, EdgeClient
client = EdgeClient({home!r}, {device!r}, durability=Durability.PROCESS, fine_tuning=None)
start = time.perf_counter()
report = client.sync({address!r})
elapsed = time.perf_counter() - start
print(json.dumps({{"elapsed": elapsed, "events_sent": report.events_sent, "bytes_up": report.bytes_up}}))
"""


def sync_in_child(home: Path, device: str, address: str) -> dict[str, float]:
    """The device runs in its own process, as it would on its own machine (and with its own GIL)."""
    script = SYNC_IN_A_CHILD.format(repo=str(REPO), home=str(home), device=device, address=address)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def coordinator_at(root: Path, name: str, hidden_units: int = 32) -> Coordinator:
    coordinator = Coordinator(
        root / name,
        strategy=Strategy.fedbuff(buffer_size=1000),
        auto_aggregate=False,
        publish_int8=False,
        publish_trainable_head=False,
        hidden_units=hidden_units,
    )
    coordinator.start("127.0.0.1:0")
    return coordinator


def bench_events(root: Path, n: int) -> dict[str, float]:
    rows = event_rows(n)
    ceiling = sqlite_ceiling(root, rows)
    coordinator = coordinator_at(root, "coordinator-events")
    try:
        journal_client(root, "events-device", coordinator, rows).close()
        child = sync_in_child(root / "events-device", "events-device", coordinator.address)
        assert child["events_sent"] == n, child
        stored = coordinator.store.conn.execute("SELECT COUNT(*) FROM events WHERE device_id = 'events-device'")
        assert stored.fetchone()[0] == n
        events_per_s = n / child["elapsed"]
        bytes_per_event = child["bytes_up"] / n

        # Resume: cut the link at the midpoint of the upload, then sync again.
        resumer = journal_client(root, "resume-device", coordinator, rows)
        with FaultProxy(coordinator.port) as proxy:
            proxy.cut_after(upstream_bytes=int(n * bytes_per_event / 2))
            with contextlib.suppress(grpc.RpcError):
                resumer.sync(proxy.address, attempts=1)
            delivered_before_cut = coordinator.store.high_waters("resume-device")[0]
            start = time.perf_counter()
            second = resumer.sync(proxy.address, attempts=1)
            resume_s = time.perf_counter() - start
        total = coordinator.store.conn.execute(
            "SELECT COUNT(*), COUNT(DISTINCT seq) FROM events WHERE device_id = 'resume-device'"
        ).fetchone()
        assert total == (n, n), total
        resumer.close()
    finally:
        coordinator.stop()
    return {
        "events": n,
        "events_per_s": events_per_s,
        "sqlite_ceiling_rows_per_s": ceiling,
        "ratio": events_per_s / ceiling,
        "bytes_per_event": bytes_per_event,
        "events_before_cut": delivered_before_cut,
        "events_resent_after_cut": second.events_sent + second.events_duplicates - (n - delivered_before_cut),
        "resume_s": resume_s,
    }


def bench_transfers(root: Path, delta_mb: int) -> dict[str, float]:
    # A model whose float32 weights are about delta_mb: its deltas and .tflite are that large.
    hidden = int(delta_mb * 2**20 / 4 / (64 + 1 + 10))
    coordinator = coordinator_at(root, "coordinator-transfers", hidden_units=hidden)
    client = EdgeClient(root / "transfer-device", "transfer-device", durability=Durability.PROCESS, fine_tuning=None)
    try:
        start = time.perf_counter()
        client.sync(coordinator.address)
        download_s = time.perf_counter() - start
        model_bytes = client.models.artifact_path(TFLITE_FLOAT32).stat().st_size

        rng = np.random.default_rng(1)
        delta = {
            name: rng.normal(0, 1e-3, array.shape).astype(np.float32)
            for name, array in coordinator.aggregator.weights.items()
        }
        client._journal_delta(1, delta, 100, 0.5, "float32")
        (payload_size,) = client.journal.conn.execute("SELECT LENGTH(payload) FROM deltas").fetchone()
        start = time.perf_counter()
        uploaded = client.sync(coordinator.address)  # uninterrupted and direct: the throughput figure
        upload_s = time.perf_counter() - start
        assert uploaded.deltas_sent == 1
        with FaultProxy(coordinator.port) as proxy:
            client._journal_delta(1, delta, 100, 0.5, "float32")
            proxy.cut_after(upstream_bytes=payload_size // 2)
            with contextlib.suppress(grpc.RpcError):
                client.sync(proxy.address, attempts=1)
            sent_before = proxy.bytes_up
            resumed = client.sync(proxy.address, attempts=1)
            sent_after = proxy.bytes_up - sent_before
            assert resumed.deltas_sent == 1, resumed
        received_before_cut = resumed.resumed_delta_bytes
        resent_bytes = received_before_cut + sent_after - payload_size
        resent_chunks = max(0, int(np.ceil(max(0, resent_bytes - 64 * 1024) / DELTA_CHUNK_BYTES)))
    finally:
        client.close()
        coordinator.stop()
    return {
        "delta_mb": payload_size / 2**20,
        "upload_mb_per_s": payload_size / 2**20 / upload_s,
        "download_mb_per_s": model_bytes / 2**20 / download_s,
        "chunk_mb_per_s": min(payload_size / 2**20 / upload_s, model_bytes / 2**20 / download_s),
        "resumed_at_byte": received_before_cut,
        "resent_bytes_after_cut": resent_bytes,
        "resent_chunks_after_cut": resent_chunks,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--delta-mb", type=int, default=50)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        events = bench_events(root, args.events)
        transfers = bench_transfers(root, args.delta_mb)
    print(
        f"events: {events['events_per_s']:,.0f}/s end to end vs "
        f"{events['sqlite_ceiling_rows_per_s']:,.0f}/s raw SQLite "
        f"(ratio {events['ratio']:.2f}), {events['bytes_per_event']:.1f} B/event on the wire"
    )
    print(
        f"cut at the midpoint: {events['events_before_cut']} events had landed; "
        f"{events['events_resent_after_cut']} resent; resume took {events['resume_s']:.2f} s"
    )
    print(
        f"{transfers['delta_mb']:.1f} MB delta upload {transfers['upload_mb_per_s']:.0f} MB/s, "
        f"model download {transfers['download_mb_per_s']:.0f} MB/s; after a midpoint cut the upload resumed at "
        f"byte {transfers['resumed_at_byte']:,} and resent {transfers['resent_bytes_after_cut']:,} bytes "
        f"({transfers['resent_chunks_after_cut']} chunks)"
    )
    figures = {**events, **transfers}
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in figures.items()}))


if __name__ == "__main__":
    main()
