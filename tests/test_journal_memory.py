"""What sync reads from the journal streams in bounded batches: the memory it takes does not grow
with the journal's length (tracemalloc peaks, so only allocations made while reading count)."""

from __future__ import annotations

import tracemalloc
from collections.abc import Callable
from pathlib import Path

from client.journal import Journal

BATCH = 1_000


def _fill(journal: Journal, events: int) -> None:
    rows = [(i.to_bytes(32, "big"), i % 10, 0.5, 1, 10.0) for i in range(events)]
    for start in range(0, events, 50_000):
        journal.append_events(rows[start : start + 50_000])


def _peak_bytes(read: Callable[[], int]) -> tuple[int, int]:
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        seen = read()
        return seen, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def _read_all_event_columns(journal: Journal) -> Callable[[], int]:
    def read() -> int:
        return sum(len(columns[0]) for columns in journal.iter_event_columns(0, BATCH))

    return read


def test_streaming_events_takes_the_same_memory_for_10x_the_journal(tmp_path: Path) -> None:
    small, large = Journal(tmp_path / "small.db"), Journal(tmp_path / "large.db")
    try:
        _fill(small, 10_000)
        _fill(large, 100_000)
        seen_small, peak_small = _peak_bytes(_read_all_event_columns(small))
        seen_large, peak_large = _peak_bytes(_read_all_event_columns(large))
    finally:
        small.close()
        large.close()
    assert (seen_small, seen_large) == (10_000, 100_000)
    # Reading everything at once would take about 10x more for the large journal.
    assert peak_large < 1.5 * peak_small, (peak_small, peak_large)


def test_streaming_a_delta_payload_holds_one_chunk_at_a_time(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "journal.db")
    try:
        payload = bytes(range(256)) * (32 * 1024 * 4)  # 32 MiB
        seq = journal.append_delta(1, 10, "float32", "[]", payload, 0.1)
        del payload
        chunk = 1 << 20

        def read() -> int:
            headers = list(journal.pending_delta_headers(0))
            assert [(d.seq, size) for d, size in headers] == [(seq, 32 << 20)]
            return sum(len(c) for c in journal.read_payload(seq, 0, chunk))

        total, peak = _peak_bytes(read)
    finally:
        journal.close()
    assert total == 32 << 20
    assert peak < 4 * chunk, peak  # a few chunks in flight, never the 32 MiB payload
