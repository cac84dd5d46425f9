"""The coordinator database's tables, its durability setting, and the batched INSERT that events
go in by."""

from __future__ import annotations

import itertools
import sqlite3
from collections.abc import Sequence
from enum import Enum

#: SQLite integers are signed 64-bit; the wire's uint64 fields must fit.
INT64_MAX = 2**63 - 1


class Durability(Enum):
    """What an acknowledged write survives (the names of the client's `client.Durability`).

    POWER: also a power cut. Commits use synchronous=FULL, and a delta's payload file and the
    directory naming it are fsynced before the commit that acknowledges it.
    PROCESS: a crash or kill -9 of the coordinator process, not a power cut (WAL with
    synchronous=NORMAL, no fsync of payload files or directories): the page cache outlives the
    process. Payload renames and transactions stay atomic either way. For simulations, and for
    coordinators that may lose their last acknowledged writes to a power cut.
    """

    PROCESS = "NORMAL"
    POWER = "FULL"


SCHEMA = """
CREATE TABLE IF NOT EXISTS devices (
    device_id TEXT PRIMARY KEY,
    events_high_water INTEGER NOT NULL DEFAULT 0,
    deltas_high_water INTEGER NOT NULL DEFAULT 0,
    model_version INTEGER NOT NULL DEFAULT 0,
    first_seen_ns INTEGER NOT NULL,
    last_seen_ns INTEGER NOT NULL,
    offered_version INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS events (
    device_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    input_hash BLOB NOT NULL,
    label INTEGER NOT NULL,
    confidence REAL NOT NULL,
    model_version INTEGER NOT NULL,
    latency_us REAL NOT NULL,
    time_ns INTEGER NOT NULL,
    PRIMARY KEY (device_id, seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS deltas (
    device_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    base_version INTEGER NOT NULL,
    num_examples INTEGER NOT NULL,
    codec TEXT NOT NULL,
    tensor_specs TEXT NOT NULL,
    payload_file TEXT,             -- under deltas/ until aggregated or rejected
    payload_sha256 BLOB NOT NULL,
    train_loss REAL NOT NULL,
    received_ns INTEGER NOT NULL,
    status TEXT NOT NULL,          -- buffered | aggregated | rejected
    reason TEXT NOT NULL DEFAULT '',
    staleness INTEGER,
    aggregated_into INTEGER,
    PRIMARY KEY (device_id, seq)
);
CREATE INDEX IF NOT EXISTS deltas_buffered ON deltas (status) WHERE status = 'buffered';
CREATE TABLE IF NOT EXISTS versions (
    version INTEGER PRIMARY KEY,
    parent_version INTEGER NOT NULL,
    created_ns INTEGER NOT NULL,
    manifest_json BLOB NOT NULL,
    num_deltas INTEGER NOT NULL,
    accuracy REAL
);
CREATE TABLE IF NOT EXISTS resolutions (
    input_hash BLOB PRIMARY KEY,
    label INTEGER NOT NULL,
    confidence REAL NOT NULL,
    model_version INTEGER NOT NULL,
    device_id TEXT NOT NULL,
    observations INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS corrections (
    cursor INTEGER PRIMARY KEY AUTOINCREMENT,
    device_id TEXT NOT NULL,
    input_hash BLOB NOT NULL,
    label INTEGER NOT NULL,
    confidence REAL NOT NULL,
    model_version INTEGER NOT NULL,
    created_ns INTEGER NOT NULL,
    UNIQUE (device_id, input_hash, label)
);
CREATE INDEX IF NOT EXISTS corrections_by_device ON corrections (device_id, cursor);
"""


EVENTS_PER_INSERT = 32
_EVENT_FIELDS = 7  # after device_id: seq, input_hash, label, confidence, model_version, latency_us, time_ns
_INSERT_EVENTS = "INSERT INTO events VALUES " + ", ".join(
    "(?1, " + ", ".join(f"?{2 + _EVENT_FIELDS * row + i}" for i in range(_EVENT_FIELDS)) + ")"
    for row in range(EVENTS_PER_INSERT)
)


def insert_events(conn: sqlite3.Connection, device_id: str, columns: Sequence[list]) -> None:
    """INSERT a device's events, given as columns (seq, input_hash, label, confidence,
    model_version, latency_us, time_ns), EVENTS_PER_INSERT rows a statement. With one row a
    statement, the sqlite3 module's work for each statement (bind, step with the GIL released,
    reset) costs more than SQLite's insert itself; 32 rows a statement insert ~1.7x faster."""
    n = len(columns[0])
    whole = n - n % EVENTS_PER_INSERT
    if whole:
        values = itertools.chain.from_iterable(zip(*(c[:whole] for c in columns), strict=True))
        # ?1 is the device, bound once a statement; the same iterator repeated groups the values.
        conn.executemany(
            _INSERT_EVENTS, zip(itertools.repeat(device_id), *[values] * (_EVENT_FIELDS * EVENTS_PER_INSERT))
        )
    if whole < n:
        conn.executemany(
            "INSERT INTO events VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            zip(itertools.repeat(device_id), *(c[whole:] for c in columns)),
        )


def migrate(conn: sqlite3.Connection) -> None:
    """Bring a store written by an earlier release up to SCHEMA (CREATE IF NOT EXISTS adds no columns)."""
    columns = {row[1] for row in conn.execute("PRAGMA table_info(devices)")}
    if "offered_version" not in columns:
        conn.execute("ALTER TABLE devices ADD COLUMN offered_version INTEGER NOT NULL DEFAULT 0")
