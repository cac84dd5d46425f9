"""The edge journal: every inference event and weight delta, durably in SQLite (WAL).

Events and deltas are numbered 1, 2, 3, ... in two independent sequences. What the coordinator
has confirmed is kept as two acknowledged high-water marks, so "pending" is simply "above the
mark" and marking a batch sent is one row update, whatever its size.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import sqlite_utils


class Durability(Enum):
    """How much a committed journal write survives.

    PROCESS: survives a crash or kill -9 of the process (WAL, synchronous=NORMAL); a power cut
    may lose the last few commits. POWER: also survives a power cut (synchronous=FULL, one fsync
    a commit).

    Every journal write (event, delta, ack) has committed when it returns: there is no group
    commit, so an event whose seq was returned is in the WAL (PROCESS) or on disk (POWER) then.
    """

    PROCESS = "NORMAL"
    POWER = "FULL"


@dataclass(frozen=True, slots=True)
class JournalEvent:
    seq: int
    input_hash: bytes
    label: int
    confidence: float
    model_version: int
    latency_us: float
    time_ns: int


@dataclass(frozen=True, slots=True)
class JournalDelta:
    seq: int
    base_version: int
    num_examples: int
    codec: str
    tensor_specs: str  # JSON list of {"name", "shape", "dtype"}
    payload: bytes
    payload_sha256: bytes
    train_loss: float
    created_ns: int


_EVENT_COLUMNS = "seq, input_hash, label, confidence, model_version, latency_us, time_ns"
_INSERT_EVENT = f"INSERT INTO events ({_EVENT_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?)"
_DELTA_COLUMNS = "seq, base_version, num_examples, codec, tensor_specs, payload, payload_sha256, train_loss, created_ns"


def open_connection(path: Path, durability: Durability = Durability.POWER) -> sqlite3.Connection:
    """Autocommit connection (isolation_level=None: transactions are explicit) in WAL mode."""
    conn = sqlite3.connect(path, timeout=30.0, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=wal")
    conn.execute(f"PRAGMA synchronous={durability.value}")
    return conn


def table_names(conn: sqlite3.Connection) -> set[str]:
    return {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}


# A table as sqlite-utils' Table.create takes it: columns (name -> Python type), primary key, NOT NULL columns.
TableSpec = tuple[dict[str, type], str | tuple[str, ...], frozenset[str]]

JOURNAL_SCHEMA: dict[str, TableSpec] = {
    "events": (
        {
            "seq": int,
            "input_hash": bytes,
            "label": int,
            "confidence": float,
            "model_version": int,
            "latency_us": float,
            "time_ns": int,
        },
        "seq",
        frozenset({"input_hash", "label", "confidence", "model_version", "time_ns"}),
    ),
    "deltas": (
        {
            "seq": int,
            "base_version": int,
            "num_examples": int,
            "codec": str,
            "tensor_specs": str,
            "payload": bytes,
            "payload_sha256": bytes,
            "train_loss": float,
            "created_ns": int,
        },
        "seq",
        frozenset({"base_version", "num_examples", "codec", "tensor_specs", "payload"}),
    ),
    "meta": ({"key": str, "value": int}, "key", frozenset()),
    "inference_stats": (
        {"seq": int, "kind": str, "latency_us": float, "rss_mb": float, "cold_start_s": float},
        "seq",
        frozenset(),
    ),
    # Kept apart from the deltas rows: updating a row rewrites its (possibly large) payload.
    "delta_acks": ({"seq": int, "status": str, "reason": str}, "seq", frozenset()),
    # Error feedback for lossy codecs: what quantization left out, sent with the next delta.
    "codec_residuals": ({"name": str, "shape": str, "residual": bytes}, "name", frozenset({"shape", "residual"})),
}
JOURNAL_TABLES = frozenset(JOURNAL_SCHEMA)
_SQL_TYPES = {int: "INTEGER", float: "REAL", str: "TEXT", bytes: "BLOB"}


def create_table_sql(name: str, spec: TableSpec) -> str:
    """The statement sqlite-utils' Table.create runs for `spec` (tests/test_journal.py checks it
    still is), without importing sqlite-utils (~60 ms a process) or its introspection (~4 ms a journal)."""
    columns, pk, not_null = spec
    lines = [
        f'"{column}" {_SQL_TYPES[kind]}' + " PRIMARY KEY" * (column == pk) + " NOT NULL" * (column in not_null)
        for column, kind in columns.items()
    ]
    if isinstance(pk, tuple):
        lines.append("PRIMARY KEY (" + ", ".join(f'"{column}"' for column in pk) + ")")
    return f'CREATE TABLE "{name}" (\n   ' + ",\n   ".join(lines) + "\n)"


def create_tables(journal: Journal, schema: Mapping[str, TableSpec]) -> None:
    """Create the tables of `schema` the journal lacks (an older journal gains the newer ones), in
    one transaction."""
    if schema.keys() <= journal.table_names():
        return
    with journal.transaction():
        have = journal.table_names()  # again: another process may have created them meanwhile
        for name, spec in schema.items():
            if name not in have:
                journal.conn.execute(create_table_sql(name, spec))


# Per process: the open create=True journal of each file. It keeps one idle connection that a
# closed create=False journal of the file (a sync session's, say) hands back for the next one to
# use: opening a connection costs ~0.1 ms, more than a sync's queries on it.
_owners: dict[str, Journal] = {}
_owners_lock = threading.Lock()
_CLOSED = sqlite3.connect(":memory:", check_same_thread=False)
_CLOSED.close()  # what a journal that handed its connection back holds: any use raises, as after close()


def _reusable(conn: sqlite3.Connection) -> bool:
    """Idle, and as open_connection left it (a sync may turn on memory mapping)."""
    try:
        return not conn.in_transaction and conn.execute("PRAGMA mmap_size").fetchone()[0] == 0
    except sqlite3.Error:
        return False


class Journal:
    def __init__(self, path: Path, durability: Durability = Durability.POWER, *, create: bool = True) -> None:
        """create=False opens an existing journal without touching its schema (a second connection,
        e.g. for a sync running beside inference: SQLite connections must not be shared by threads
        that each run transactions)."""
        self.path = Path(path)
        self.durability = durability
        self._key = os.fspath(self.path)
        self._spare: sqlite3.Connection | None = None
        conn = None if create else self._take_spare()
        self.conn = conn if conn is not None else open_connection(self.path, durability)
        self._db: sqlite_utils.Database | None = None
        self._last_seq: int | None = None
        if create:
            self._create_schema()
            with _owners_lock:
                _owners.setdefault(self._key, self)

    def _take_spare(self) -> sqlite3.Connection | None:
        with _owners_lock:
            owner = _owners.get(self._key)
            if owner is None or owner.durability is not self.durability:
                return None
            spare, owner._spare = owner._spare, None
            return spare

    @property
    def db(self) -> sqlite_utils.Database:
        """A sqlite_utils view of the connection, for schema work. Imported on first use: it adds
        ~60 ms to a process start, and the journal's own tables never need it (see create_tables)."""
        if self._db is None:
            import sqlite_utils

            self._db = sqlite_utils.Database(self.conn)
        return self._db

    def table_names(self) -> set[str]:
        return table_names(self.conn)

    def _create_schema(self) -> None:
        create_tables(self, JOURNAL_SCHEMA)

    # -- transactions -------------------------------------------------------------------------

    def transaction(self) -> _Transaction:
        return _Transaction(self.conn, on_rollback=self._forget_last_seq)

    def _forget_last_seq(self) -> None:
        self._last_seq = None

    # -- meta -----------------------------------------------------------------------------------

    def get_meta(self, key: str, default: int = 0) -> int:
        row = self.conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return default if row is None else int(row[0])

    def set_meta(self, key: str, value: int) -> None:
        self.conn.execute(
            "INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            (key, value),
        )

    def _raise_meta(self, key: str, value: int) -> None:
        """set_meta for a mark that never moves backwards: one statement, whatever another
        connection wrote since this one read it."""
        self.conn.execute(
            "INSERT INTO meta (key, value) VALUES (?, ?) "
            "ON CONFLICT(key) DO UPDATE SET value = excluded.value WHERE excluded.value > meta.value",
            (key, value),
        )

    # -- events ---------------------------------------------------------------------------------

    def append_event(
        self, input_hash: bytes, label: int, confidence: float, model_version: int, latency_us: float
    ) -> int:
        """Journal one event; returns its seq. Outside a transaction this is a single INSERT that
        commits on its own (SQLite autocommit): as durable as BEGIN/INSERT/COMMIT under the
        connection's synchronous setting, at about half the cost. Inside a transaction it joins it."""
        last = self._last_seq
        if last is None:
            last = self.last_event_seq()
        seq = last + 1
        try:
            row = (seq, input_hash, label, confidence, model_version, latency_us, time.time_ns())
            self.conn.execute(_INSERT_EVENT, row)
        except BaseException:
            self._last_seq = None
            raise
        self._last_seq = seq
        return seq

    def append_events(
        self, rows: Sequence[tuple[bytes, int, float, int, float]], time_ns: int | None = None
    ) -> list[int]:
        """Journal (input_hash, label, confidence, model_version, latency_us) rows; returns their seqs."""
        if not rows:
            return []
        now = time.time_ns() if time_ns is None else time_ns
        # This connection is the only writer of events, so the last seq can be remembered; a
        # rollback of the enclosing transaction forgets it.
        try:
            with self.transaction():
                last = self._last_seq
                if last is None:
                    last = self.conn.execute("SELECT COALESCE(MAX(seq), 0) FROM events").fetchone()[0]
                seqs = list(range(last + 1, last + 1 + len(rows)))
                if len(rows) == 1:
                    self.conn.execute(_INSERT_EVENT, (seqs[0], *rows[0], now))
                else:
                    self.conn.executemany(_INSERT_EVENT, [(s, *row, now) for s, row in zip(seqs, rows, strict=True)])
        except BaseException:
            self._last_seq = None
            raise
        self._last_seq = seqs[-1]
        return seqs

    def last_event_seq(self) -> int:
        return int(self.conn.execute("SELECT COALESCE(MAX(seq), 0) FROM events").fetchone()[0])

    def events_acked(self) -> int:
        return self.get_meta("events_acked")

    def ack_events(self, high_water: int) -> None:
        """Record the coordinator's durable mark; it never moves backwards."""
        # Most acks repeat the mark: then a read, and no write transaction.
        if high_water > self.events_acked():
            self._raise_meta("events_acked", high_water)

    def pending_event_count(self) -> int:
        acked = self.events_acked()
        return int(self.conn.execute("SELECT COUNT(*) FROM events WHERE seq > ?", (acked,)).fetchone()[0])

    def iter_event_batches(self, after_seq: int, batch_size: int) -> Iterator[list[JournalEvent]]:
        """Pending events in seq order, batch_size at a time: memory stays bounded by one batch."""
        cursor = after_seq
        while True:
            rows = self.conn.execute(
                f"SELECT {_EVENT_COLUMNS} FROM events WHERE seq > ? ORDER BY seq LIMIT ?",
                (cursor, batch_size),
            ).fetchall()
            if not rows:
                return
            yield [JournalEvent(*row) for row in rows]
            cursor = rows[-1][0]

    def iter_event_columns(self, after_seq: int, batch_size: int) -> Iterator[list[list]]:
        """Like iter_event_batches, as column lists (seq, hash, label, confidence, version, latency, time)."""
        cursor = after_seq
        while True:
            rows = self.conn.execute(
                f"SELECT {_EVENT_COLUMNS} FROM events WHERE seq > ? ORDER BY seq LIMIT ?", (cursor, batch_size)
            )
            columns: list[list] = [[] for _ in range(7)]
            # A few hundred rows at a time: holding a whole batch of row tuples at once sets off
            # ~20 garbage collections a batch, a quarter of the read's time.
            while some := rows.fetchmany(512):
                for column, values in zip(columns, zip(*some, strict=True), strict=True):
                    column.extend(values)
            if not columns[0]:
                return
            yield columns
            cursor = columns[0][-1]

    def event(self, seq: int) -> JournalEvent | None:
        row = self.conn.execute(f"SELECT {_EVENT_COLUMNS} FROM events WHERE seq = ?", (seq,)).fetchone()
        return None if row is None else JournalEvent(*row)

    # -- deltas ---------------------------------------------------------------------------------

    def append_delta(
        self,
        base_version: int,
        num_examples: int,
        codec: str,
        tensor_specs: str,
        payload: bytes,
        train_loss: float,
        extra_statements: Sequence[tuple[str, tuple[object, ...]]] = (),
    ) -> int:
        """Journal a delta; extra_statements run in the same transaction (e.g. codec residuals)."""
        with self.transaction():
            # seq is the rowid: NULL makes it MAX(seq) + 1 (1 in an empty table).
            seq = self.conn.execute(
                f"INSERT INTO deltas ({_DELTA_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    None,
                    base_version,
                    num_examples,
                    codec,
                    tensor_specs,
                    payload,
                    hashlib.sha256(payload).digest(),
                    train_loss,
                    time.time_ns(),
                ),
            ).lastrowid
            for sql, params in extra_statements:
                self.conn.execute(sql, params)
        return int(seq)

    def record_inference_stats(
        self, seq: int, kind: str, latency_us: float, rss_mb: float, cold_start_s: float | None
    ) -> None:
        self.conn.execute(
            "INSERT OR REPLACE INTO inference_stats VALUES (?, ?, ?, ?, ?)",
            (seq, kind, latency_us, rss_mb, cold_start_s),
        )

    def codec_residuals(self) -> dict[str, np.ndarray]:
        rows = self.conn.execute("SELECT name, shape, residual FROM codec_residuals").fetchall()
        return {
            name: np.frombuffer(blob, dtype=np.float32).reshape(json.loads(shape)).copy() for name, shape, blob in rows
        }

    @staticmethod
    def residual_statements(residuals: dict[str, np.ndarray]) -> list[tuple[str, tuple[object, ...]]]:
        """SQL that replaces the stored residuals, to run in the delta's own transaction."""
        statements: list[tuple[str, tuple[object, ...]]] = [("DELETE FROM codec_residuals", ())]
        for name, residual in residuals.items():
            array = np.ascontiguousarray(residual, dtype=np.float32)
            statements.append(
                (
                    "INSERT INTO codec_residuals (name, shape, residual) VALUES (?, ?, ?)",
                    (name, json.dumps(list(array.shape)), array.tobytes()),
                )
            )
        return statements

    def deltas_acked(self) -> int:
        return self.get_meta("deltas_acked")

    def ack_delta(self, seq: int, status: str, reason: str = "") -> None:
        with self.transaction():
            self.conn.execute("INSERT OR REPLACE INTO delta_acks VALUES (?, ?, ?)", (seq, status, reason))
            self._raise_meta("deltas_acked", seq)

    def delta_status(self, seq: int) -> tuple[str, str]:
        """(status, reason): "pending" until acknowledged, then "sent" or "rejected"."""
        row = self.conn.execute("SELECT status, reason FROM delta_acks WHERE seq = ?", (seq,)).fetchone()
        return ("pending", "") if row is None else (row[0], row[1] or "")

    def pending_deltas(self, after_seq: int) -> Iterator[JournalDelta]:
        """Pending deltas one at a time (each may be large)."""
        cursor = after_seq
        while True:
            row = self.conn.execute(
                f"SELECT {_DELTA_COLUMNS} FROM deltas WHERE seq > ? ORDER BY seq LIMIT 1", (cursor,)
            ).fetchone()
            if row is None:
                return
            yield JournalDelta(*row)
            cursor = row[0]

    def pending_delta_headers(self, after_seq: int) -> Iterator[tuple[JournalDelta, int]]:
        """Pending deltas without their payload (empty) and with its size: stream it with read_payload."""
        cursor = after_seq
        columns = _DELTA_COLUMNS.replace("payload,", "X'' AS payload,", 1)
        while True:
            row = self.conn.execute(
                f"SELECT {columns}, LENGTH(payload) FROM deltas WHERE seq > ? ORDER BY seq LIMIT 1", (cursor,)
            ).fetchone()
            if row is None:
                return
            yield JournalDelta(*row[:-1]), int(row[-1])
            cursor = row[0]

    def read_payload(self, seq: int, offset: int, chunk_size: int) -> Iterator[bytes]:
        """A delta's payload from offset, chunk by chunk, without loading it whole."""
        with self.conn.blobopen("deltas", "payload", seq, readonly=True) as blob:
            blob.seek(offset)
            while chunk := blob.read(chunk_size):
                yield chunk

    def pending_delta_count(self) -> int:
        acked = self.deltas_acked()
        return int(self.conn.execute("SELECT COUNT(*) FROM deltas WHERE seq > ?", (acked,)).fetchone()[0])

    def integrity_ok(self) -> bool:
        return self.conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"

    def close(self) -> None:
        conn, spare = self.conn, None
        with _owners_lock:
            owner = _owners.get(self._key)
            if owner is self:
                del _owners[self._key]
                spare, self._spare = self._spare, None
            elif owner is not None and owner._spare is None and owner.durability is self.durability and _reusable(conn):
                owner._spare, self.conn = conn, _CLOSED
                return
        if spare is not None:
            spare.close()
        conn.close()


class _Transaction:
    """BEGIN IMMEDIATE ... COMMIT, re-entrant: nested uses join the outer transaction."""

    def __init__(self, conn: sqlite3.Connection, on_rollback: Callable[[], None] = lambda: None) -> None:
        self.conn = conn
        self.on_rollback = on_rollback
        self.outer = False

    def __enter__(self) -> sqlite3.Connection:
        if not self.conn.in_transaction:
            self.conn.execute("BEGIN IMMEDIATE")
            self.outer = True
        return self.conn

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if not self.outer:
            return
        if exc_type is None:
            try:
                self.conn.execute("COMMIT")
            except BaseException:
                self.on_rollback()
                raise
            return
        self.on_rollback()
        if self.conn.in_transaction:  # some errors (SQLITE_FULL) have rolled back already
            self.conn.execute("ROLLBACK")
