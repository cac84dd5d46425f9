"""The coordinator's durable state in SQLite: devices and their high-water marks, events, deltas,
published versions, conflict resolutions and corrections.

Every write that a client will be told about happens inside one transaction committed before
the acknowledgement is sent; how much a commit survives (a power cut, or only a crash of the
process) is the store's `Durability`.
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import NamedTuple, ParamSpec, TypeVar

from coordinator.conflict_index import ConflictIndex, Resolution
from coordinator.payload_files import PayloadFiles, payload_name
from coordinator.records import BatchResult, CorrectionRow, EventColumns, EventRow, StoredDelta, StoreError
from coordinator.schema import EVENTS_PER_INSERT, INT64_MAX, SCHEMA, Durability, insert_events, migrate
from fedsync.conflicts import ConflictPolicy, highest_confidence

__all__ = [
    "EVENTS_PER_INSERT",
    "BatchResult",
    "CoordinatorStore",
    "CorrectionRow",
    "DeviceMarks",
    "Durability",
    "EventColumns",
    "EventRow",
    "StoreError",
    "StoredDelta",
    "insert_events",
]


P = ParamSpec("P")
R = TypeVar("R")

# One statement, so one implicit transaction: register or refresh the device (model_version NULL:
# keep the stored one) and read its marks and newest correction cursor (corrections_by_device).
_TOUCH_DEVICE = (
    "INSERT INTO devices (device_id, first_seen_ns, last_seen_ns, model_version, offered_version) "
    "VALUES (?1, ?2, ?2, coalesce(?3, 0), ?4) "
    "ON CONFLICT(device_id) DO UPDATE SET last_seen_ns = excluded.last_seen_ns, "
    "model_version = coalesce(?3, model_version), offered_version = ?4 "
    "RETURNING events_high_water, deltas_high_water, "
    "(SELECT coalesce(max(cursor), 0) FROM corrections WHERE device_id = ?1)"
)


# Advance a device's delta mark by one (and refresh it): no row when the mark is not seq - 1.
_ADVANCE_DELTAS = (
    "UPDATE devices SET deltas_high_water = ?2, last_seen_ns = ?3 "
    "WHERE device_id = ?1 AND deltas_high_water = ?2 - 1 RETURNING 1"
)
_STORED_DELTA = "device_id, seq, base_version, num_examples, codec, tensor_specs, payload_file, received_ns"


class DeviceMarks(NamedTuple):
    events_high_water: int
    deltas_high_water: int
    corrections_cursor: int  # of the newest correction queued for the device, 0 when none


def _locked(method: Callable[P, R]) -> Callable[P, R]:
    """One connection is shared by the gRPC worker threads and the aggregator: serialize its use."""

    @functools.wraps(method)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        with args[0]._lock:  # type: ignore[attr-defined]
            return method(*args, **kwargs)

    return wrapper


class CoordinatorStore:
    def __init__(
        self,
        path: Path,
        num_labels: int,
        policy: ConflictPolicy | None = None,
        durability: Durability = Durability.POWER,
    ) -> None:
        self.path = Path(path)
        self.num_labels = num_labels
        self.policy = policy or highest_confidence()
        self.durability = durability
        self._lock = threading.RLock()
        self.lock = self._lock  # shared with the credential store, which uses the same connection
        self.conn = sqlite3.connect(self.path, timeout=60.0, isolation_level=None, check_same_thread=False)
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute(f"PRAGMA synchronous={durability.value}")
        self.conn.executescript(SCHEMA)
        migrate(self.conn)
        self.payloads = PayloadFiles(self.path.parent / "deltas", durable=durability is Durability.POWER)
        self.deltas_dir = self.payloads.folder
        self.payloads.remove_orphans(
            {row[0] for row in self.conn.execute("SELECT payload_file FROM deltas WHERE payload_file IS NOT NULL")}
        )
        self.conflicts = ConflictIndex(self.policy)
        self._reload_conflicts()

    @_locked
    def close(self) -> None:
        self.conn.close()

    def _begin(self) -> None:
        self.conn.execute("BEGIN IMMEDIATE")

    def _rollback(self) -> None:
        if self.conn.in_transaction:  # some errors (SQLITE_FULL) have rolled back already
            self.conn.execute("ROLLBACK")

    # -- devices --------------------------------------------------------------------------

    @_locked
    def touch_device(self, device_id: str, model_version: int | None = None, offered_version: int = 0) -> DeviceMarks:
        """Register or refresh a device (the model version it runs, and one it was just offered and
        may run from now on: 0 for none); returns its marks."""
        # fetchall: the statement, hence its transaction, ends only once every row was read.
        ((events, deltas, cursor),) = self.conn.execute(
            _TOUCH_DEVICE, (device_id, time.time_ns(), model_version, offered_version)
        ).fetchall()
        return DeviceMarks(int(events), int(deltas), int(cursor))

    @_locked
    def high_waters(self, device_id: str) -> tuple[int, int]:
        row = self.conn.execute(
            "SELECT events_high_water, deltas_high_water FROM devices WHERE device_id = ?", (device_id,)
        ).fetchone()
        return (0, 0) if row is None else (int(row[0]), int(row[1]))

    # -- events ---------------------------------------------------------------------------

    @_locked
    def add_events(self, device_id: str, events: EventColumns | Sequence[EventRow]) -> BatchResult:
        """Commit a batch exactly once: retransmitted seqs are checked and skipped, new ones stored,
        and conflicts on their inputs re-resolved, all in one transaction."""
        columns = events if isinstance(events, EventColumns) else EventColumns.from_rows(events)
        columns.validate(self.num_labels)
        self._begin()
        try:
            result = self._add_events_locked(device_id, columns)
            self.conn.execute("COMMIT")
        except BaseException:
            self._rollback()
            self._reload_conflicts()  # the index may hold this batch's observations
            raise
        if result.conflicts_touched:
            (cursor,) = self.conn.execute(
                "SELECT COALESCE(MAX(cursor), 0) FROM corrections WHERE device_id = ?", (device_id,)
            ).fetchone()
            result = dataclasses.replace(result, corrections_cursor=int(cursor))
        return result

    def _reload_conflicts(self) -> None:
        self.conflicts.clear()
        self.conflicts.load(
            self.conn.execute("SELECT input_hash, device_id, label, confidence, model_version, time_ns FROM events")
        )

    def _add_events_locked(self, device_id: str, columns: EventColumns) -> tuple[BatchResult, tuple[list, ...] | None]:
        now = time.time_ns()
        self.conn.execute(
            "INSERT INTO devices (device_id, first_seen_ns, last_seen_ns) VALUES (?, ?, ?) "
            "ON CONFLICT(device_id) DO UPDATE SET last_seen_ns = excluded.last_seen_ns",
            (device_id, now, now),
        )
        (high_water,) = self.conn.execute(
            "SELECT events_high_water FROM devices WHERE device_id = ?", (device_id,)
        ).fetchone()
        seqs = columns.seqs
        n_replayed = bisect.bisect_right(seqs, high_water)
        if n_replayed:
            self._check_replay(device_id, columns, n_replayed)
        n_fresh = len(seqs) - n_replayed
        if n_fresh == 0:
            return BatchResult(high_water, 0, n_replayed, 0)
        first, last = seqs[n_replayed], seqs[-1]
        if first != high_water + 1 or last - first + 1 != n_fresh:  # seqs are strictly increasing
            expected = (
                high_water + 1
                if first != high_water + 1
                else first + next(i for i in range(n_fresh) if seqs[n_replayed + i] != first + i)
            )
            raise StoreError("precondition", f"sequence gap: expected event {expected}")
        fresh = columns.slice(n_replayed)
        insert_events(self.conn, device_id, fresh)
        self.conn.execute("UPDATE devices SET events_high_water = ? WHERE device_id = ?", (last, device_id))
        _, hashes, labels, confidences, versions, _, times = fresh
        resolutions = self.conflicts.ingest(device_id, hashes, labels, confidences, versions, times)
        self._store_resolutions(resolutions, now)
        return BatchResult(last, n_fresh, n_replayed, len(resolutions))

    def _check_replay(self, device_id: str, columns: EventColumns, count: int) -> None:
        stored = {
            row[0]: row[1:]
            for row in self.conn.execute(
                "SELECT seq, input_hash, label, confidence, model_version FROM events "
                "WHERE device_id = ? AND seq BETWEEN ? AND ?",
                (device_id, columns.seqs[0], columns.seqs[count - 1]),
            )
        }
        for i in range(count):
            sent = (columns.hashes[i], columns.labels[i], columns.confidences[i], columns.versions[i])
            if stored.get(columns.seqs[i]) != sent:
                raise StoreError(
                    "precondition",
                    f"event {columns.seqs[i]} was already stored with different content: refusing the replay",
                )

    def _store_resolutions(self, resolutions: Sequence[Resolution], now: int) -> None:
        """Persist winners and queue one correction per disagreeing device (at most once per label)."""
        for r in resolutions:
            w = r.winner
            self.conn.execute(
                "INSERT OR REPLACE INTO resolutions VALUES (?, ?, ?, ?, ?, ?)",
                (r.input_hash, w.label, w.confidence, w.model_version, w.device_id, r.observations),
            )
            # Tell every device whose current view differs from the winner: its latest correction
            # if it got one, else its own observations (a winner change can make an earlier
            # correction wrong, even for a device that predicted the new winner itself).
            latest = dict(
                self.conn.execute(
                    "SELECT device_id, label FROM corrections WHERE input_hash = ? AND cursor IN "
                    "(SELECT MAX(cursor) FROM corrections WHERE input_hash = ? GROUP BY device_id)",
                    (r.input_hash, r.input_hash),
                ).fetchall()
            )
            to_tell = {d for d in r.losing_devices if d not in latest}
            to_tell |= {d for d, label in latest.items() if label != w.label}
            for d in sorted(to_tell):
                # A fresh cursor even if this label was sent before, so the device pulls it again.
                self.conn.execute(
                    "DELETE FROM corrections WHERE device_id = ? AND input_hash = ? AND label = ?",
                    (d, r.input_hash, w.label),
                )
                self.conn.execute(
                    "INSERT INTO corrections (device_id, input_hash, label, confidence, model_version, created_ns) "
                    "VALUES (?, ?, ?, ?, ?, ?)",
                    (d, r.input_hash, w.label, w.confidence, w.model_version, now),
                )

    @_locked
    def corrections_after(self, device_id: str, cursor: int, limit: int) -> list[CorrectionRow]:
        rows = self.conn.execute(
            "SELECT cursor, input_hash, label, confidence, model_version FROM corrections "
            "WHERE device_id = ? AND cursor > ? ORDER BY cursor LIMIT ?",
            (device_id, min(cursor, INT64_MAX), limit),
        ).fetchall()
        return [CorrectionRow(*row) for row in rows]

    # -- deltas ---------------------------------------------------------------------------

    @_locked
    def delta_status(self, device_id: str, seq: int) -> tuple[str, str, bytes] | None:
        row = self.conn.execute(
            "SELECT status, reason, payload_sha256 FROM deltas WHERE device_id = ? AND seq = ?",
            (device_id, seq),
        ).fetchone()
        return None if row is None else (row[0], row[1], row[2])

    @_locked
    def add_delta(
        self,
        device_id: str,
        seq: int,
        base_version: int,
        num_examples: int,
        codec: str,
        tensor_specs: str,
        payload: bytes | None,
        payload_sha256: bytes,
        train_loss: float,
        status: str,
        reason: str = "",
        staleness: int | None = None,
        payload_file: Path | None = None,
    ) -> int:
        """Store a delta (buffered or rejected) and advance the device's mark; returns the new mark.

        The payload goes to a file of its own (see coordinator.payload_files); `payload_file`
        moves an already written file there.
        """
        now = time.time_ns()
        name = payload_name(device_id, seq) if (payload is not None or payload_file is not None) else None
        wrote = False
        self._begin()
        try:
            # Advance the mark only from seq - 1, so that a missing row means a gap or a new device.
            if not self.conn.execute(_ADVANCE_DELTAS, (device_id, seq, now)).fetchall():
                (high_water,) = self.conn.execute(
                    "SELECT deltas_high_water FROM devices WHERE device_id = ?", (device_id,)
                ).fetchone() or (None,)
                if seq != (high_water or 0) + 1:
                    # Before touching any file: <device>.<seq>.delta may belong to a committed delta.
                    raise StoreError("precondition", f"sequence gap: expected delta {(high_water or 0) + 1}, got {seq}")
                if high_water is None:
                    self.conn.execute(
                        "INSERT INTO devices (device_id, first_seen_ns, last_seen_ns, deltas_high_water) "
                        "VALUES (?, ?, ?, ?)",
                        (device_id, now, now, seq),
                    )
            if name is not None:
                wrote = True
                self.payloads.place(name, payload, payload_file)
            self.conn.execute(
                "INSERT INTO deltas (device_id, seq, base_version, num_examples, codec, tensor_specs, payload_file, "
                "payload_sha256, train_loss, received_ns, status, reason, staleness) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    device_id,
                    seq,
                    base_version,
                    num_examples,
                    codec,
                    tensor_specs,
                    name,
                    payload_sha256,
                    train_loss,
                    now,
                    status,
                    reason,
                    staleness,
                ),
            )
            self.conn.execute("COMMIT")
        except BaseException:
            self._rollback()
            if wrote:
                self.payloads.remove([name])  # type: ignore[list-item]
            raise
        return seq

    @_locked
    def buffered_count(self) -> tuple[int, int | None]:
        """(number of buffered deltas, arrival time of the oldest in ns)."""
        count, oldest = self.conn.execute(
            "SELECT COUNT(*), MIN(received_ns) FROM deltas WHERE status = 'buffered'"
        ).fetchone()
        return int(count), oldest

    @_locked
    def buffered_keys(self) -> list[tuple[str, int]]:
        return [
            (row[0], row[1])
            for row in self.conn.execute(
                "SELECT device_id, seq FROM deltas WHERE status = 'buffered' ORDER BY received_ns, device_id, seq"
            )
        ]

    def iter_deltas(self, keys: Sequence[tuple[str, int]]) -> Iterator[StoredDelta]:
        """Deltas one at a time, so aggregation never holds every payload at once."""
        for device_id, seq in keys:
            with self._lock:
                row = self.conn.execute(
                    f"SELECT {_STORED_DELTA} FROM deltas WHERE device_id = ? AND seq = ?", (device_id, seq)
                ).fetchone()
            if row is not None and row[6] is not None:
                yield StoredDelta(*row[:6], self.payloads.read(row[6]), row[7])

    def iter_buffered(self) -> Iterator[StoredDelta]:
        """The buffered deltas in the order of buffered_keys, as iter_deltas yields them (the rows
        read at once, the payloads one at a time)."""
        with self._lock:
            rows = self.conn.execute(
                f"SELECT {_STORED_DELTA} FROM deltas WHERE status = 'buffered' ORDER BY received_ns, device_id, seq"
            ).fetchall()
        for row in rows:
            if row[6] is not None:
                yield StoredDelta(*row[:6], self.payloads.read(row[6]), row[7])

    # -- versions -------------------------------------------------------------------------

    def commit_version(
        self,
        version: int,
        parent_version: int,
        manifest_json: bytes,
        accuracy: float | None,
        aggregated: Sequence[tuple[str, int, int]],
        rejected: Sequence[tuple[str, int, str]] = (),
    ) -> None:
        """Publish a version and mark the deltas it consumed (device, seq, staleness), atomically."""
        with self._lock:
            self._begin()
            try:
                self.conn.execute(
                    "INSERT INTO versions VALUES (?, ?, ?, ?, ?, ?)",
                    (version, parent_version, time.time_ns(), manifest_json, len(aggregated), accuracy),
                )
                self.conn.executemany(
                    "UPDATE deltas SET status = 'aggregated', aggregated_into = ?, staleness = ?, payload_file = NULL "
                    "WHERE device_id = ? AND seq = ? AND status = 'buffered'",
                    [(version, staleness, device, seq) for device, seq, staleness in aggregated],
                )
                self._mark_rejected(rejected)
                self.conn.execute("COMMIT")
            except BaseException:
                self._rollback()
                raise
        # Outside the lock (the uploads' handlers wait for it): no row names these files any more,
        # and no other delta can take their names.
        self._remove_payloads([(d, s) for d, s, _ in aggregated] + [(d, s) for d, s, _ in rejected])

    def _mark_rejected(self, rejected: Sequence[tuple[str, int, str]]) -> None:
        self.conn.executemany(
            "UPDATE deltas SET status = 'rejected', reason = ?, payload_file = NULL "
            "WHERE device_id = ? AND seq = ? AND status = 'buffered'",
            [(reason, device, seq) for device, seq, reason in rejected],
        )

    def _remove_payloads(self, keys: Sequence[tuple[str, int]]) -> None:
        self.payloads.remove(payload_name(device_id, seq) for device_id, seq in keys)

    def commit_version_rejections(self, rejected: Sequence[tuple[str, int, str]]) -> None:
        with self._lock:
            self._begin()
            try:
                self._mark_rejected(rejected)
                self.conn.execute("COMMIT")
            except BaseException:
                self._rollback()
                raise
        self._remove_payloads([(d, s) for d, s, _ in rejected])

    @_locked
    def latest_version(self) -> tuple[int, bytes] | None:
        row = self.conn.execute("SELECT version, manifest_json FROM versions ORDER BY version DESC LIMIT 1").fetchone()
        return None if row is None else (int(row[0]), bytes(row[1]))

    @_locked
    def version_history(self) -> list[tuple[int, int, float | None]]:
        return [
            (int(v), int(n), acc)
            for v, n, acc in self.conn.execute("SELECT version, num_deltas, accuracy FROM versions ORDER BY version")
        ]

    @_locked
    def versions_in_use(self) -> set[int]:
        """Versions a device reports as installed or was offered at its last Hello, or that a buffered
        delta is based on."""
        installed = {
            v for row in self.conn.execute("SELECT DISTINCT model_version, offered_version FROM devices") for v in row
        }
        bases = {
            row[0] for row in self.conn.execute("SELECT DISTINCT base_version FROM deltas WHERE status = 'buffered'")
        }
        return {int(v) for v in installed | bases if v}

    @_locked
    def devices_seen_since(self, unix_s: float) -> int:
        return int(
            self.conn.execute("SELECT COUNT(*) FROM devices WHERE last_seen_ns >= ?", (int(unix_s * 1e9),)).fetchone()[
                0
            ]
        )

    # -- figures --------------------------------------------------------------------------

    @_locked
    def counts(self) -> dict[str, int]:
        one = self.conn.execute
        return {
            "devices": one("SELECT COUNT(*) FROM devices").fetchone()[0],
            "events": one("SELECT COUNT(*) FROM events").fetchone()[0],
            "deltas_buffered": one("SELECT COUNT(*) FROM deltas WHERE status = 'buffered'").fetchone()[0],
            "deltas_aggregated": one("SELECT COUNT(*) FROM deltas WHERE status = 'aggregated'").fetchone()[0],
            "deltas_rejected": one("SELECT COUNT(*) FROM deltas WHERE status = 'rejected'").fetchone()[0],
            "conflicts_resolved": one("SELECT COUNT(*) FROM resolutions").fetchone()[0],
            "corrections": one("SELECT COUNT(*) FROM corrections").fetchone()[0],
            "versions": one("SELECT COUNT(*) FROM versions").fetchone()[0],
        }

    @_locked
    def integrity_ok(self) -> bool:
        return self.conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
