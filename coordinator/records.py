"""What the coordinator store takes and gives: event batches (validated before they are stored),
stored deltas, corrections, and the errors it refuses requests with."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from coordinator.schema import INT64_MAX
from fedsync.wire import INPUT_HASH_BYTES


class StoreError(Exception):
    """A request the store refuses; `kind` maps to a gRPC status code in the service."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind  # invalid | precondition


@dataclass(frozen=True, slots=True)
class EventRow:
    seq: int
    input_hash: bytes
    label: int
    confidence: float
    model_version: int
    latency_us: float
    time_ns: int


@dataclass(frozen=True, slots=True)
class EventColumns:
    """A batch of events as parallel columns (the wire's EventBatch)."""

    seqs: list[int]
    hashes: list[bytes]
    labels: list[int]
    confidences: list[float]
    versions: list[int]
    latencies: list[float]
    times: list[int]
    # The numeric columns (seqs, labels, confidences, versions, latencies) as numpy arrays, when
    # the batch came as arrays: validate() checks these instead of converting the lists back.
    arrays: tuple[np.ndarray, ...] | None = dataclasses.field(default=None, compare=False, repr=False)

    @classmethod
    def from_arrays(
        cls,
        seqs: np.ndarray,
        hashes: list[bytes],
        labels: np.ndarray,
        confidences: np.ndarray,
        versions: np.ndarray,
        latencies: np.ndarray,
        times: np.ndarray,
    ) -> EventColumns:
        """From the wire's packed columns as arrays (uint64 seqs and versions, int64 labels and
        times, float64 confidences and latencies)."""
        return cls(
            seqs.tolist(),
            hashes,
            labels.tolist(),
            confidences.tolist(),
            versions.tolist(),
            latencies.tolist(),
            times.tolist(),
            arrays=(seqs, labels, confidences, versions, latencies),
        )

    @classmethod
    def from_rows(cls, rows: Sequence[EventRow]) -> EventColumns:
        if not all(len(row.input_hash) == INPUT_HASH_BYTES for row in rows):
            raise StoreError("invalid", f"every input hash must be {INPUT_HASH_BYTES} bytes")
        columns = list(zip(*(dataclasses.astuple(row) for row in rows), strict=True)) if rows else [()] * 7
        return cls(*(list(c) for c in columns))

    def slice(self, start: int) -> tuple[list, ...]:
        return (
            self.seqs[start:],
            self.hashes[start:],
            self.labels[start:],
            self.confidences[start:],
            self.versions[start:],
            self.latencies[start:],
            self.times[start:],
        )

    def validate(self, num_labels: int) -> None:
        n = len(self.seqs)
        columns = (self.hashes, self.labels, self.confidences, self.versions, self.latencies, self.times)
        if any(len(c) != n for c in columns):
            raise StoreError("invalid", "event batch columns have different lengths")
        if n == 0:
            return
        if set(map(len, self.hashes)) != {INPUT_HASH_BYTES}:
            raise StoreError("invalid", f"every input_hash must be {INPUT_HASH_BYTES} bytes")
        if self.arrays is not None:
            seqs, labels, confidences, versions, latencies = self.arrays
            highest_version = int(versions.max())
        else:
            seqs = np.asarray(self.seqs, dtype=np.uint64)
            labels = np.asarray(self.labels, dtype=np.int64)
            confidences = np.asarray(self.confidences, dtype=np.float64)
            highest_version = max(self.versions)
            latencies = np.asarray(self.latencies, dtype=np.float64)
        if seqs[0] == 0 or (n > 1 and not bool(np.all(seqs[1:] > seqs[:-1]))):
            raise StoreError("invalid", "event seqs must be positive and strictly increasing")
        if int(seqs[-1]) > INT64_MAX:
            raise StoreError("invalid", f"event seq {int(seqs[-1])} is out of range")
        if highest_version > INT64_MAX:
            raise StoreError("invalid", f"event model_version {highest_version} is out of range")
        if np.isnan(latencies).any():  # NaN would be stored as NULL
            raise StoreError("invalid", "event latency_us must not be NaN")
        bad = np.flatnonzero((labels < 0) | (labels >= num_labels))
        if len(bad):
            raise StoreError(
                "invalid", f"event {self.seqs[bad[0]]}: label {labels[bad[0]]} outside 0..{num_labels - 1}"
            )
        bad = np.flatnonzero(~((confidences >= 0.0) & (confidences <= 1.0)))  # NaN fails both
        if len(bad):
            raise StoreError("invalid", f"event {self.seqs[bad[0]]}: confidence {confidences[bad[0]]} outside [0, 1]")


@dataclass(frozen=True, slots=True)
class BatchResult:
    high_water: int
    accepted: int
    duplicates: int
    conflicts_touched: int
    corrections_cursor: int = 0  # the device's newest correction, read when conflicts were touched


@dataclass(frozen=True, slots=True)
class StoredDelta:
    device_id: str
    seq: int
    base_version: int
    num_examples: int
    codec: str
    tensor_specs: str
    payload: bytes
    received_ns: int


@dataclass(frozen=True, slots=True)
class CorrectionRow:
    cursor: int
    input_hash: bytes
    label: int
    confidence: float
    model_version: int
