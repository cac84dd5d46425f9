"""The prediction cache and the coordinator's corrections, in the journal's database."""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import sqlite_utils

    from client.journal import TableSpec

PREDICTION_SCHEMA: dict[str, TableSpec] = {  # created in the journal's database (client.journal.create_tables)
    "prediction_cache": (
        {"input_hash": bytes, "model_version": int, "label": int, "confidence": float, "corrected": int},
        ("input_hash", "model_version"),
        frozenset({"label", "confidence", "corrected"}),
    ),
    "corrections": (
        {"input_hash": bytes, "label": int, "confidence": float, "model_version": int, "cursor": int},
        "input_hash",
        frozenset(),
    ),
}
PREDICTION_TABLES = frozenset(PREDICTION_SCHEMA)


@dataclass(frozen=True, slots=True)
class CachedPrediction:
    label: int
    confidence: float
    corrected: bool


@dataclass(frozen=True, slots=True)
class StoredCorrection:
    input_hash: bytes
    label: int
    confidence: float
    model_version: int
    cursor: int


def create_prediction_tables(db: sqlite_utils.Database) -> None:
    for name, (columns, pk, not_null) in PREDICTION_SCHEMA.items():
        if name not in db.table_names():
            db[name].create(columns, pk=pk, not_null=not_null)


class PredictionCache:
    """Cache rows are derived data (the events are the record), so new ones are written behind:
    kept in memory and flushed into the table inside a later event transaction, which saves a
    B-tree write per prediction. A crash loses only cache rows, never events.

    With write_behind, put() only touches memory; the owner calls flush() inside one of its
    transactions once flush_due() (a flush outside a transaction would commit row by row)."""

    FLUSH_EVERY = 256

    def __init__(self, conn: sqlite3.Connection, write_behind: bool = False) -> None:
        self.conn = conn
        self.write_behind = write_behind
        self._pending: dict[tuple[bytes, int], CachedPrediction] = {}
        self._corrected: dict[bytes, int] = {}
        self.reload_corrections()

    def reload_corrections(self) -> None:
        """Re-read corrections (another connection may have applied some) and fix pending rows."""
        self._corrected = dict(self.conn.execute("SELECT input_hash, label FROM corrections").fetchall())
        for (input_hash, version), cached in list(self._pending.items()):
            label = self._corrected.get(input_hash)
            if label is not None:
                self._pending[(input_hash, version)] = CachedPrediction(label, cached.confidence, True)

    def flush(self) -> None:
        """Write pending rows; call inside a transaction (or let sqlite3 autocommit)."""
        if self._pending:
            self.conn.executemany(
                "INSERT OR REPLACE INTO prediction_cache VALUES (?, ?, ?, ?, ?)",
                [(h, v, c.label, c.confidence, int(c.corrected)) for (h, v), c in self._pending.items()],
            )
            self._pending.clear()

    def flush_due(self) -> bool:
        return len(self._pending) >= self.FLUSH_EVERY

    def has_pending(self) -> bool:
        return bool(self._pending)

    def get(self, input_hash: bytes, model_version: int) -> CachedPrediction | None:
        pending = self._pending.get((input_hash, model_version))
        if pending is not None:
            return pending
        row = self.conn.execute(
            "SELECT label, confidence, corrected FROM prediction_cache WHERE input_hash = ? AND model_version = ?",
            (input_hash, model_version),
        ).fetchone()
        return None if row is None else CachedPrediction(int(row[0]), float(row[1]), bool(row[2]))

    def put(self, input_hash: bytes, model_version: int, label: int, confidence: float, corrected: bool) -> None:
        if self.write_behind:
            self._pending[(input_hash, model_version)] = CachedPrediction(label, confidence, corrected)
            return
        self.conn.execute(
            "INSERT OR REPLACE INTO prediction_cache VALUES (?, ?, ?, ?, ?)",
            (input_hash, model_version, label, confidence, int(corrected)),
        )

    def correction(self, input_hash: bytes) -> StoredCorrection | None:
        if input_hash not in self._corrected:
            return None
        row = self.conn.execute(
            "SELECT input_hash, label, confidence, model_version, cursor FROM corrections WHERE input_hash = ?",
            (input_hash,),
        ).fetchone()
        return None if row is None else StoredCorrection(*row)

    def apply_correction(self, correction: StoredCorrection) -> None:
        """Record a correction and overwrite the cached label of that input, for every model version."""
        self.conn.execute(
            "INSERT OR REPLACE INTO corrections VALUES (?, ?, ?, ?, ?)",
            (
                correction.input_hash,
                correction.label,
                correction.confidence,
                correction.model_version,
                correction.cursor,
            ),
        )
        self.conn.execute(
            "UPDATE prediction_cache SET label = ?, corrected = 1 WHERE input_hash = ?",
            (correction.label, correction.input_hash),
        )
        self._corrected[correction.input_hash] = correction.label

    def corrections(self) -> list[StoredCorrection]:
        rows = self.conn.execute(
            "SELECT input_hash, label, confidence, model_version, cursor FROM corrections ORDER BY cursor"
        ).fetchall()
        return [StoredCorrection(*row) for row in rows]
