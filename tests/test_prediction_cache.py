"""The prediction cache and the coordinator's corrections, in the journal's database."""

from __future__ import annotations

from pathlib import Path

import pytest

from client.journal import Journal
from client.predictions import CachedPrediction, PredictionCache, StoredCorrection, create_prediction_tables

A, B, C = b"\x0a" * 32, b"\x0b" * 32, b"\x0c" * 32


@pytest.fixture
def journal(tmp_path: Path):
    j = Journal(tmp_path / "journal.db")
    with j.transaction():
        create_prediction_tables(j.db)
    yield j
    j.close()


@pytest.fixture
def cache(journal: Journal) -> PredictionCache:
    return PredictionCache(journal.conn)


def test_create_tables_is_idempotent(journal: Journal) -> None:
    create_prediction_tables(journal.db)
    assert {"prediction_cache", "corrections"} <= set(journal.db.table_names())


def test_put_get_by_hash_and_version(cache: PredictionCache) -> None:
    assert cache.get(A, 1) is None
    cache.put(A, 1, 3, 0.9, False)
    cache.put(A, 2, 4, 0.8, False)
    cache.put(B, 1, 5, 0.7, True)
    assert cache.get(A, 1) == CachedPrediction(3, 0.9, False)
    assert cache.get(A, 2) == CachedPrediction(4, 0.8, False)
    assert cache.get(B, 1) == CachedPrediction(5, 0.7, True)
    assert cache.get(B, 2) is None
    assert cache.get(C, 1) is None
    got = cache.get(B, 1)
    assert got is not None and isinstance(got.corrected, bool) and isinstance(got.label, int)


def test_write_behind_rows_reach_the_table_on_flush(journal: Journal) -> None:
    cache = PredictionCache(journal.conn, write_behind=True)
    for i in range(cache.FLUSH_EVERY - 1):
        cache.put(i.to_bytes(32, "big"), 1, i % 10, 0.5, False)
    assert not cache.flush_due()
    cache.put(A, 1, 3, 0.9, False)
    assert cache.flush_due()
    assert cache.get(A, 1) == CachedPrediction(3, 0.9, False)  # served from memory
    assert journal.conn.execute("SELECT COUNT(*) FROM prediction_cache").fetchone()[0] == 0
    with journal.transaction():
        cache.flush()
    assert not cache.flush_due()
    assert journal.conn.execute("SELECT COUNT(*) FROM prediction_cache").fetchone()[0] == cache.FLUSH_EVERY
    assert cache.get(A, 1) == CachedPrediction(3, 0.9, False)  # now from the table


def test_put_replaces_the_same_key(cache: PredictionCache) -> None:
    cache.put(A, 1, 3, 0.9, False)
    cache.put(A, 1, 6, 0.4, True)
    assert cache.get(A, 1) == CachedPrediction(6, 0.4, True)


def test_apply_correction_overwrites_every_version_of_that_input(cache: PredictionCache) -> None:
    cache.put(A, 1, 3, 0.9, False)
    cache.put(A, 2, 4, 0.8, False)
    cache.put(A, 5, 3, 0.6, False)
    cache.put(B, 1, 3, 0.9, False)
    correction = StoredCorrection(A, 7, 0.99, 4, 11)
    cache.apply_correction(correction)

    for version, confidence in ((1, 0.9), (2, 0.8), (5, 0.6)):
        assert cache.get(A, version) == CachedPrediction(7, confidence, True)
    assert cache.get(B, 1) == CachedPrediction(3, 0.9, False)  # other inputs untouched
    assert cache.correction(A) == correction
    assert cache.correction(B) is None


def test_correction_for_an_uncached_input_is_still_recorded(cache: PredictionCache) -> None:
    cache.apply_correction(StoredCorrection(C, 2, 0.5, 1, 1))
    assert cache.get(C, 1) is None
    assert cache.correction(C) == StoredCorrection(C, 2, 0.5, 1, 1)


def test_a_newer_correction_replaces_the_older(cache: PredictionCache) -> None:
    cache.put(A, 1, 3, 0.9, False)
    cache.apply_correction(StoredCorrection(A, 7, 0.9, 1, 1))
    cache.apply_correction(StoredCorrection(A, 8, 0.95, 2, 5))
    assert cache.get(A, 1) == CachedPrediction(8, 0.9, True)
    assert cache.corrections() == [StoredCorrection(A, 8, 0.95, 2, 5)]


def test_corrections_are_ordered_by_cursor(cache: PredictionCache) -> None:
    applied = [
        StoredCorrection(B, 1, 0.5, 1, 30),
        StoredCorrection(A, 2, 0.6, 1, 10),
        StoredCorrection(C, 3, 0.7, 2, 20),
    ]
    for c in applied:
        cache.apply_correction(c)
    assert [c.cursor for c in cache.corrections()] == [10, 20, 30]
    assert cache.corrections() == sorted(applied, key=lambda c: c.cursor)


def test_corrections_and_cache_survive_reopen(tmp_path: Path) -> None:
    path = tmp_path / "journal.db"
    j = Journal(path)
    with j.transaction():
        create_prediction_tables(j.db)
        cache = PredictionCache(j.conn)
        cache.put(A, 1, 3, 0.9, False)
        cache.apply_correction(StoredCorrection(A, 7, 0.99, 1, 1))
    j.close()

    j = Journal(path)
    try:
        create_prediction_tables(j.db)
        cache = PredictionCache(j.conn)
        assert cache.get(A, 1) == CachedPrediction(7, 0.9, True)
        assert cache.corrections() == [StoredCorrection(A, 7, 0.99, 1, 1)]
    finally:
        j.close()


def test_corrections_in_a_rolled_back_transaction_are_not_applied(journal: Journal, cache: PredictionCache) -> None:
    cache.put(A, 1, 3, 0.9, False)
    with pytest.raises(RuntimeError), journal.transaction():
        cache.apply_correction(StoredCorrection(A, 7, 0.99, 1, 1))
        raise RuntimeError("connection lost mid-batch")
    assert cache.get(A, 1) == CachedPrediction(3, 0.9, False)
    assert cache.corrections() == []
