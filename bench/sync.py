"""Sync throughput: 200k journaled events from a client's SQLite into the coordinator's durable
SQLite over loopback gRPC, against the raw `executemany` SQLite ceiling measured in the same run;
resume cost after a cut at the midpoint; a 50 MB delta upload and model download, with an
interruption at the midpoint. Ends with one JSON line.

    .venv/bin/python bench/sync.py [--events 200000] [--delta-mb 50] [--trials 3]

Clients and coordinator run as configured by default (durable SQLite on both sides); each client
syncs from a process of its own for the events, as a device would. Throughput figures are medians
of --trials trials, each with the ceiling measured right before its end-to-end run.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import sqlite3
import statistics
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

from client import EdgeClient  # noqa: E402
from client.sync import DELTA_CHUNK_BYTES, EVENT_BATCH_SIZE  # noqa: E402
from coordinator import Coordinator  # noqa: E402
from coordinator.service import DEFAULT_CHUNK_BYTES as DOWNLOAD_CHUNK_BYTES  # noqa: E402
from coordinator.store import EVENTS_PER_INSERT, insert_events  # noqa: E402
from fedsync.aggregation import Strategy  # noqa: E402
from fedsync.manifest import TFLITE_FLOAT32  # noqa: E402
from tests.faultproxy import FaultProxy  # noqa: E402


def event_rows(n: int, version: int = 1, first: int = 0) -> list[tuple[bytes, int, float, int, float]]:
    """n events on inputs first, first + 1, ...: a device of its own sees inputs no other device saw."""
    rng = np.random.default_rng(first)
    confidences = rng.uniform(0.1, 1.0, n).astype(np.float32)
    return [
        (
            hashlib.sha256((first + i).to_bytes(8, "little")).digest(),
            (first + i) % 10,
            float(confidences[i]),
            version,
            12.5,
        )
        for i in range(n)
    ]


def sqlite_ceiling(path: Path, rows: list[tuple], *, multirow: bool = False) -> float:
    """Raw executemany into a durable WAL database, same rows, batch size and fsync policy as the
    coordinator, one row a statement. multirow: EVENTS_PER_INSERT rows a statement, as the
    coordinator inserts (reported beside the ceiling, not instead of it)."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute(
        "CREATE TABLE events (device_id TEXT, seq INTEGER, input_hash BLOB, label INTEGER, confidence REAL, "
        "model_version INTEGER, latency_us REAL, time_ns INTEGER)"
    )
    full = [("device", i + 1, *row, 0) for i, row in enumerate(rows)]
    batches = [full[s : s + EVENT_BATCH_SIZE] for s in range(0, len(full), EVENT_BATCH_SIZE)]
    columns = [[list(c) for c in zip(*batch, strict=True)][1:] for batch in batches]
    start = time.perf_counter()
    for batch, batch_columns in zip(batches, columns, strict=True):
        conn.execute("BEGIN")
        if multirow:
            insert_events(conn, "device", batch_columns)
        else:
            conn.executemany("INSERT INTO events VALUES (?, ?, ?, ?, ?, ?, ?, ?)", batch)
        conn.execute("COMMIT")
    elapsed = time.perf_counter() - start
    assert conn.execute("SELECT COUNT(*) FROM events").fetchone()[0] == len(rows)
    conn.close()
    return len(rows) / elapsed


def edge_client(root: Path, name: str) -> EdgeClient:
    """A client as configured by default (journal durable against a power cut), inference only: it
    downloads the .tflite and nothing for training."""
    return EdgeClient(root / name, name, fine_tuning=None)


def journal_client(root: Path, name: str, coordinator: Coordinator, rows: list[tuple]) -> EdgeClient:
    client = edge_client(root, name)
    client.sync(coordinator.address)
    for s in range(0, len(rows), 50_000):
        client.journal.append_events(rows[s : s + 50_000])
    return client


SYNC_IN_A_CHILD = """
import json, sys, time
sys.path.insert(0, {repo!r})
from client import EdgeClient
client = EdgeClient({home!r}, {device!r}, fine_tuning=None)
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


def bench_events(root: Path, n: int, trials: int) -> dict[str, object]:
    """Each trial measures the ceiling, then one device's end-to-end sync right after it: on a
    shared machine the two drift together, and the medians keep one slow moment from deciding."""
    coordinator = coordinator_at(root, "coordinator-events")
    ceilings: list[float] = []
    multirow: list[float] = []
    rates: list[float] = []
    try:
        for trial in range(trials):
            rows = event_rows(n, first=trial * n)
            ceilings.append(sqlite_ceiling(root / f"ceiling-{trial}.db", rows))
            multirow.append(sqlite_ceiling(root / f"multirow-{trial}.db", rows, multirow=True))
            device = f"events-device-{trial}"
            journal_client(root, device, coordinator, rows).close()
            child = sync_in_child(root / device, device, coordinator.address)
            assert child["events_sent"] == n, child
            stored = coordinator.store.conn.execute("SELECT COUNT(*) FROM events WHERE device_id = ?", (device,))
            assert stored.fetchone()[0] == n
            rates.append(n / child["elapsed"])
            bytes_per_event = child["bytes_up"] / n

        # Resume: cut the link at the midpoint of the upload, then sync again (the inputs of trial 0:
        # a second device seeing the same inputs, as a fleet does).
        resumer = journal_client(root, "resume-device", coordinator, event_rows(n))
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
    events_per_s, ceiling = statistics.median(rates), statistics.median(ceilings)
    return {
        "events": n,
        "events_per_s": events_per_s,
        "sqlite_ceiling_rows_per_s": ceiling,
        "ratio": events_per_s / ceiling,
        "events_per_s_trials": rates,
        "sqlite_ceiling_trials": ceilings,
        "sqlite_multirow_rows_per_s": statistics.median(multirow),
        "bytes_per_event": bytes_per_event,
        "events_before_cut": delivered_before_cut,
        "events_resent_after_cut": second.events_sent + second.events_duplicates - (n - delivered_before_cut),
        "resume_s": resume_s,
    }


def resent_chunks(resent_bytes: int, chunk_bytes: int) -> int:
    """Whole chunks in what was sent twice, beyond 64 KiB for the headers and the other calls of a sync."""
    return max(0, int(np.ceil(max(0, resent_bytes - 64 * 1024) / chunk_bytes)))


def bench_transfers(root: Path, delta_mb: int, trials: int) -> dict[str, object]:
    # A model whose float32 weights are about delta_mb: its deltas and .tflite are that large.
    hidden = int(delta_mb * 2**20 / 4 / (64 + 1 + 10))
    coordinator = coordinator_at(root, "coordinator-transfers", hidden_units=hidden)
    rng = np.random.default_rng(1)
    delta = {
        name: rng.normal(0, 1e-3, array.shape).astype(np.float32)
        for name, array in coordinator.aggregator.weights.items()
    }
    downloads: list[float] = []
    uploads: list[float] = []
    try:
        # Uninterrupted and direct: the throughput figures. Each trial is a new device, which
        # downloads the model on its first sync, then uploads one delta on its second.
        for trial in range(trials):
            client = edge_client(root, f"transfer-device-{trial}")
            start = time.perf_counter()
            client.sync(coordinator.address)
            downloads.append(time.perf_counter() - start)
            model_bytes = client.models.artifact_path(TFLITE_FLOAT32).stat().st_size
            client._journal_delta(1, delta, 100, 0.5, "float32")
            (payload_size,) = client.journal.conn.execute("SELECT LENGTH(payload) FROM deltas").fetchone()
            start = time.perf_counter()
            uploaded = client.sync(coordinator.address)
            uploads.append(time.perf_counter() - start)
            assert uploaded.deltas_sent == 1
            client.close()

        # Upload cut at its midpoint, then resumed.
        client = edge_client(root, "upload-resume-device")
        client.sync(coordinator.address)
        client._journal_delta(1, delta, 100, 0.5, "float32")
        with FaultProxy(coordinator.port) as proxy:
            proxy.cut_after(upstream_bytes=payload_size // 2)
            with contextlib.suppress(grpc.RpcError):
                client.sync(proxy.address, attempts=1)
            sent_before = proxy.bytes_up
            resumed = client.sync(proxy.address, attempts=1)
            sent_after = proxy.bytes_up - sent_before
            assert resumed.deltas_sent == 1, resumed
        client.close()
        upload_resumed_at = resumed.resumed_delta_bytes
        upload_resent = upload_resumed_at + sent_after - payload_size

        # Download cut at its midpoint, then resumed from the part the device kept.
        client = edge_client(root, "download-resume-device")
        with FaultProxy(coordinator.port) as proxy:
            proxy.cut_after(downstream_bytes=model_bytes // 2)
            with contextlib.suppress(grpc.RpcError):
                client.sync(proxy.address, attempts=1)
            (partial,) = (root / "download-resume-device" / "models").glob(".staging-v*/*.tflite")
            download_resumed_at = partial.stat().st_size
            received_before = proxy.bytes_down
            resumed = client.sync(proxy.address, attempts=1)
            received_after = proxy.bytes_down - received_before
            assert resumed.installed_version == coordinator.version, resumed
        client.close()
        download_resent = download_resumed_at + received_after - model_bytes
    finally:
        coordinator.stop()
    upload_mb_per_s = payload_size / 2**20 / statistics.median(uploads)
    download_mb_per_s = model_bytes / 2**20 / statistics.median(downloads)
    return {
        "delta_mb": payload_size / 2**20,
        "model_mb": model_bytes / 2**20,
        "upload_mb_per_s": upload_mb_per_s,
        "download_mb_per_s": download_mb_per_s,
        "chunk_mb_per_s": min(upload_mb_per_s, download_mb_per_s),
        "upload_mb_per_s_trials": [payload_size / 2**20 / s for s in uploads],
        "download_mb_per_s_trials": [model_bytes / 2**20 / s for s in downloads],
        "resumed_at_byte": upload_resumed_at,
        "resent_bytes_after_cut": upload_resent,
        "download_resumed_at_byte": download_resumed_at,
        "download_resent_bytes_after_cut": download_resent,
        "resent_chunks_after_cut": max(
            resent_chunks(upload_resent, DELTA_CHUNK_BYTES), resent_chunks(download_resent, DOWNLOAD_CHUNK_BYTES)
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--delta-mb", type=int, default=50)
    parser.add_argument("--trials", type=int, default=3, help="throughput figures are medians of this many")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        events = bench_events(root, args.events, args.trials)
        transfers = bench_transfers(root, args.delta_mb, args.trials)
    print(
        f"events: {events['events_per_s']:,.0f}/s end to end vs "
        f"{events['sqlite_ceiling_rows_per_s']:,.0f}/s raw SQLite executemany "
        f"(ratio {events['ratio']:.2f}; medians of {args.trials}), {events['bytes_per_event']:.1f} B/event on the "
        f"wire; raw SQLite with the coordinator's {EVENTS_PER_INSERT}-row INSERTs: "
        f"{events['sqlite_multirow_rows_per_s']:,.0f}/s"
    )
    print(
        f"cut at the midpoint: {events['events_before_cut']} events had landed; "
        f"{events['events_resent_after_cut']} resent; resume took {events['resume_s']:.2f} s"
    )
    print(
        f"{transfers['delta_mb']:.1f} MB delta upload {transfers['upload_mb_per_s']:.0f} MB/s, "
        f"{transfers['model_mb']:.1f} MB model download {transfers['download_mb_per_s']:.0f} MB/s (medians of "
        f"{args.trials}); after a midpoint cut the upload resumed at byte {transfers['resumed_at_byte']:,} and "
        f"resent {transfers['resent_bytes_after_cut']:,} bytes, the download resumed at byte "
        f"{transfers['download_resumed_at_byte']:,} and resent {transfers['download_resent_bytes_after_cut']:,} "
        f"bytes ({transfers['resent_chunks_after_cut']} chunks at most)"
    )
    figures = {**events, **transfers}
    print(json.dumps({k: _rounded(v) for k, v in figures.items()}))


def _rounded(value: object) -> object:
    if isinstance(value, float):
        return round(value, 4)
    if isinstance(value, list):
        return [_rounded(v) for v in value]
    return value


if __name__ == "__main__":
    main()
