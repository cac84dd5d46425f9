"""The edge journal: sequence numbers, acks, deltas, durability settings, and kill -9 survival."""

from __future__ import annotations

import hashlib
import os
import random
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from client.journal import Durability, Journal, JournalEvent

REPO = Path(__file__).resolve().parents[1]


def _row(i: int, version: int = 1) -> tuple[bytes, int, float, int, float]:
    return (i.to_bytes(8, "big"), i % 10, 0.5 + (i % 7) / 100, version, float(i))


@pytest.fixture
def journal(tmp_path: Path):
    j = Journal(tmp_path / "journal.db")
    yield j
    j.close()


def _all_event_seqs(conn: sqlite3.Connection) -> list[int]:
    return [r[0] for r in conn.execute("SELECT seq FROM events ORDER BY seq")]


# -- events -------------------------------------------------------------------------------------


def test_fresh_journal_is_empty(journal: Journal) -> None:
    assert journal.last_event_seq() == 0
    assert journal.events_acked() == 0
    assert journal.pending_event_count() == 0
    assert journal.pending_delta_count() == 0
    assert list(journal.iter_event_batches(0, 10)) == []
    assert journal.event(1) is None


def test_append_events_returns_contiguous_seqs_and_stores_rows(journal: Journal) -> None:
    first = journal.append_events([_row(i) for i in range(3)], time_ns=123)
    second = journal.append_events([_row(i) for i in range(3, 8)], time_ns=456)
    assert first == [1, 2, 3]
    assert second == [4, 5, 6, 7, 8]
    assert journal.append_events([]) == []
    assert journal.last_event_seq() == 8
    assert journal.event(1) == JournalEvent(1, _row(0)[0], 0, 0.5, 1, 0.0, 123)
    event = journal.event(8)
    assert event is not None
    assert (event.input_hash, event.label, event.confidence, event.model_version, event.latency_us) == _row(7)
    assert event.time_ns == 456


def test_seqs_continue_across_close_and_reopen(tmp_path: Path) -> None:
    path = tmp_path / "journal.db"
    j = Journal(path)
    assert j.append_events([_row(i) for i in range(4)]) == [1, 2, 3, 4]
    j.ack_events(2)
    j.close()

    j = Journal(path)
    try:
        assert j.last_event_seq() == 4
        assert j.events_acked() == 2
        assert [j.event(s).input_hash for s in range(1, 5)] == [_row(i)[0] for i in range(4)]  # type: ignore[union-attr]
        assert j.append_events([_row(i) for i in range(4, 6)]) == [5, 6]
        assert _all_event_seqs(j.conn) == [1, 2, 3, 4, 5, 6]
    finally:
        j.close()


def test_append_event_commits_alone_or_joins_a_transaction(journal: Journal, tmp_path: Path) -> None:
    other = sqlite3.connect(tmp_path / "journal.db")  # another reader sees only committed rows
    try:
        assert journal.append_events([_row(0), _row(1)]) == [1, 2]
        assert journal.append_event(*_row(2)) == 3
        assert not journal.conn.in_transaction
        assert _all_event_seqs(other) == [1, 2, 3]
        with pytest.raises(RuntimeError), journal.transaction():
            assert journal.append_event(*_row(3)) == 4
            raise RuntimeError("roll back")
        assert _all_event_seqs(other) == [1, 2, 3]
        assert journal.append_event(*_row(4)) == 4  # the rolled-back seq is reused: no hole
        assert journal.append_events([_row(5)]) == [5]
        event = journal.event(4)
        assert event is not None and (event.input_hash, event.label, event.latency_us) == (_row(4)[0], 4, 4.0)
        assert _all_event_seqs(other) == [1, 2, 3, 4, 5]
    finally:
        other.close()


def test_iter_event_batches_is_bounded_ordered_and_resumes(journal: Journal) -> None:
    journal.append_events([_row(i) for i in range(10)])
    batches = list(journal.iter_event_batches(0, 3))
    assert [len(b) for b in batches] == [3, 3, 3, 1]
    assert [e.seq for b in batches for e in b] == list(range(1, 11))
    assert all(isinstance(e, JournalEvent) for b in batches for e in b)

    resumed = list(journal.iter_event_batches(7, 2))
    assert [[e.seq for e in b] for b in resumed] == [[8, 9], [10]]
    assert list(journal.iter_event_batches(10, 5)) == []
    assert [[e.seq for e in b] for b in journal.iter_event_batches(0, 100)] == [list(range(1, 11))]


def test_iter_event_batches_sees_events_appended_while_iterating(journal: Journal) -> None:
    journal.append_events([_row(i) for i in range(4)])
    seen = []
    for batch in journal.iter_event_batches(0, 2):
        seen.extend(e.seq for e in batch)
        if len(seen) == 2:
            journal.append_events([_row(99)])
    assert seen == [1, 2, 3, 4, 5]


def test_ack_events_never_moves_backwards_and_drives_pending(journal: Journal) -> None:
    journal.append_events([_row(i) for i in range(10)])
    assert journal.pending_event_count() == 10
    journal.ack_events(4)
    assert journal.events_acked() == 4
    assert journal.pending_event_count() == 6
    journal.ack_events(2)  # a stale ack (e.g. a retried response) must not re-open sent events
    assert journal.events_acked() == 4
    assert journal.pending_event_count() == 6
    journal.ack_events(4)
    assert journal.events_acked() == 4
    journal.ack_events(10)
    assert journal.events_acked() == 10
    assert journal.pending_event_count() == 0
    journal.append_events([_row(10)])
    assert journal.pending_event_count() == 1


def test_ack_survives_reopen(tmp_path: Path) -> None:
    path = tmp_path / "journal.db"
    j = Journal(path)
    j.append_events([_row(i) for i in range(5)])
    j.ack_events(3)
    j.close()
    j = Journal(path)
    try:
        j.ack_events(1)
        assert j.events_acked() == 3
        assert j.pending_event_count() == 2
    finally:
        j.close()


# -- deltas -------------------------------------------------------------------------------------


def test_append_delta_stores_payload_and_sha256(journal: Journal) -> None:
    payload = os.urandom(1000)
    seq = journal.append_delta(3, 42, "float32", '[{"name": "w"}]', payload, 0.25)
    assert seq == 1
    assert journal.append_delta(3, 1, "int8", "[]", b"x", 1.0) == 2
    (delta,) = [d for d in journal.pending_deltas(0) if d.seq == 1]
    assert delta.base_version == 3
    assert delta.num_examples == 42
    assert delta.codec == "float32"
    assert delta.tensor_specs == '[{"name": "w"}]'
    assert delta.payload == payload
    assert delta.payload_sha256 == hashlib.sha256(payload).digest()
    assert delta.train_loss == 0.25
    assert delta.created_ns > 0
    assert journal.delta_status(1) == ("pending", "")
    assert journal.pending_delta_count() == 2


def test_append_delta_runs_extra_statements_in_the_same_transaction(journal: Journal) -> None:
    seq = journal.append_delta(
        1,
        1,
        "topk:0.1",
        "[]",
        b"p",
        0.0,
        extra_statements=[("INSERT INTO meta (key, value) VALUES (?, ?)", ("residual", 7))],
    )
    assert seq == 1
    assert journal.get_meta("residual") == 7


def test_failing_extra_statement_rolls_back_the_delta(journal: Journal) -> None:
    journal.append_delta(1, 1, "float32", "[]", b"first", 0.0)
    journal.set_meta("taken", 1)
    with pytest.raises(sqlite3.IntegrityError):
        journal.append_delta(
            1,
            1,
            "float32",
            "[]",
            b"second",
            0.0,
            extra_statements=[
                ("INSERT INTO meta (key, value) VALUES (?, ?)", ("residual", 5)),
                ("INSERT INTO meta (key, value) VALUES (?, ?)", ("taken", 2)),  # primary key clash
            ],
        )
    assert not journal.conn.in_transaction
    assert [d.payload for d in journal.pending_deltas(0)] == [b"first"]
    assert journal.pending_delta_count() == 1
    assert journal.get_meta("residual", default=-1) == -1  # the earlier extra statement went too
    assert journal.get_meta("taken") == 1
    # The journal is still usable, and the next delta takes the next seq.
    assert journal.append_delta(1, 1, "float32", "[]", b"third", 0.0) == 2


def test_codec_residuals_are_stored_with_the_delta(journal: Journal) -> None:
    assert journal.codec_residuals() == {}
    w = np.arange(6, dtype=np.float32).reshape(2, 3) / 7
    b = np.array([0.5, -0.25, 1e-8], dtype=np.float64)  # stored as float32
    journal.append_delta(1, 1, "int8", "[]", b"p1", 0.0, extra_statements=Journal.residual_statements({"w": w, "b": b}))
    got = journal.codec_residuals()
    assert sorted(got) == ["b", "w"]
    np.testing.assert_array_equal(got["w"], w)
    assert got["w"].dtype == np.float32 and got["w"].shape == (2, 3)
    np.testing.assert_array_equal(got["b"], b.astype(np.float32))
    got["w"][0, 0] = 99  # a writable copy, not a view of the row
    assert journal.codec_residuals()["w"][0, 0] == 0

    # The next delta's residuals replace the previous set entirely.
    journal.append_delta(1, 1, "int8", "[]", b"p2", 0.0, extra_statements=Journal.residual_statements({"w": w * 2}))
    got = journal.codec_residuals()
    assert sorted(got) == ["w"]
    np.testing.assert_array_equal(got["w"], w * 2)


def test_failed_delta_keeps_the_previous_residuals(journal: Journal) -> None:
    w = np.ones((3,), dtype=np.float32)
    journal.append_delta(1, 1, "int8", "[]", b"p1", 0.0, extra_statements=Journal.residual_statements({"w": w}))
    statements = [*Journal.residual_statements({"w": w * 5, "x": w}), ("INSERT INTO no_such_table VALUES (1)", ())]
    with pytest.raises(sqlite3.OperationalError):
        journal.append_delta(1, 1, "int8", "[]", b"p2", 0.0, extra_statements=statements)
    got = journal.codec_residuals()
    assert sorted(got) == ["w"]
    np.testing.assert_array_equal(got["w"], w)
    assert [d.payload for d in journal.pending_deltas(0)] == [b"p1"]


def test_ack_delta_updates_status_and_pending(journal: Journal) -> None:
    for i in range(3):
        journal.append_delta(1, 1, "float32", "[]", bytes([i]), 0.0)
    assert journal.pending_delta_count() == 3
    journal.ack_delta(1, "sent")
    journal.ack_delta(2, "rejected", "too stale")
    assert journal.delta_status(1)[0] == "sent"
    assert journal.delta_status(2) == ("rejected", "too stale")
    assert journal.delta_status(3)[0] == "pending"
    assert journal.deltas_acked() == 2
    assert journal.pending_delta_count() == 1
    assert [d.seq for d in journal.pending_deltas(journal.deltas_acked())] == [3]
    journal.ack_delta(1, "sent")  # re-acking an older delta does not move the mark back
    assert journal.deltas_acked() == 2


def test_pending_deltas_resume_after_seq(journal: Journal) -> None:
    for i in range(4):
        journal.append_delta(1, 1, "float32", "[]", bytes([i]), 0.0)
    assert [d.seq for d in journal.pending_deltas(2)] == [3, 4]
    assert [d.payload for d in journal.pending_deltas(0)] == [b"\x00", b"\x01", b"\x02", b"\x03"]


# -- database settings --------------------------------------------------------------------------


def test_integrity_check_ok_and_wal_mode(journal: Journal) -> None:
    journal.append_events([_row(i) for i in range(50)])
    assert journal.integrity_ok()
    assert journal.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


@pytest.mark.parametrize(("durability", "expected"), [(Durability.POWER, 2), (Durability.PROCESS, 1)])
def test_durability_sets_synchronous(tmp_path: Path, durability: Durability, expected: int) -> None:
    j = Journal(tmp_path / "journal.db", durability)
    try:
        assert j.conn.execute("PRAGMA synchronous").fetchone()[0] == expected
    finally:
        j.close()


def test_default_durability_is_power(journal: Journal) -> None:
    assert journal.conn.execute("PRAGMA synchronous").fetchone()[0] == 2


# -- kill -9 ------------------------------------------------------------------------------------

_WRITER = textwrap.dedent(
    """
    import random, sys
    sys.path.insert(0, {repo!r})
    from pathlib import Path
    from client.journal import Durability, Journal

    journal = Journal(Path({db!r}), Durability[{durability!r}])
    rng = random.Random({seed})
    n = 0
    print("ready", flush=True)
    while True:
        k = rng.randint(1, 5)
        rows = [((n + i).to_bytes(8, "big"), (n + i) % 10, 0.5, 1, float(n + i)) for i in range(k)]
        seqs = journal.append_events(rows)
        n += k
        print(" ".join(map(str, seqs)), flush=True)
    """
)


@pytest.mark.parametrize("trial", range(3))
def test_committed_events_survive_kill_9(tmp_path: Path, trial: int) -> None:
    db = tmp_path / "journal.db"
    durability = "POWER" if trial == 1 else "PROCESS"
    seed = random.randrange(1 << 30)
    delay = random.Random(seed).uniform(0.05, 0.4)
    code = _WRITER.format(repo=str(REPO), db=str(db), durability=durability, seed=seed)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    lines: list[bytes] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)  # type: ignore[arg-type]
    try:
        reader.start()
        deadline = time.monotonic() + 30
        while not lines and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.01)
        assert lines and lines[0] == b"ready\n", proc.stderr.read().decode() if proc.poll() is not None else lines
        time.sleep(delay)
        assert proc.poll() is None, f"writer died on its own: {proc.stderr.read().decode()}"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        reader.join(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()  # type: ignore[union-attr]
    assert proc.returncode == -signal.SIGKILL

    # Only complete lines were surely printed after their commit.
    printed = [int(s) for line in lines[1:] if line.endswith(b"\n") for s in line.split()]
    context = f"seed={seed} delay={delay:.3f} durability={durability}"
    assert printed, f"the writer committed nothing before the kill ({context})"
    assert printed == list(range(1, len(printed) + 1)), context

    j = Journal(db)
    try:
        assert j.integrity_ok(), context
        stored = _all_event_seqs(j.conn)
        last = j.last_event_seq()
        assert stored == list(range(1, last + 1)), context  # contiguous 1..N, no holes
        assert set(printed) <= set(stored), context  # every acknowledged commit is there
        assert last - printed[-1] <= 5, context  # at most the one batch committed but not yet printed
        for seq in stored:
            event = j.event(seq)
            assert event is not None
            assert event.input_hash == (seq - 1).to_bytes(8, "big"), context  # rows are whole, in order
            assert event.label == (seq - 1) % 10
        # And the journal keeps going from where the killed writer stopped.
        assert j.append_events([_row(0)]) == [last + 1]
    finally:
        j.close()


def _schema(path: Path) -> list[tuple[str, str]]:
    conn = sqlite3.connect(path)
    try:
        return conn.execute("SELECT name, sql FROM sqlite_master WHERE sql IS NOT NULL ORDER BY name").fetchall()
    finally:
        conn.close()


def test_new_journals_get_the_tables_sqlite_utils_builds_and_old_ones_gain_missing_tables(tmp_path: Path) -> None:
    import sqlite_utils

    from client import EdgeClient
    from client.journal import JOURNAL_SCHEMA
    from client.predictions import PREDICTION_SCHEMA

    conn = sqlite3.connect(tmp_path / "built.db")
    db = sqlite_utils.Database(conn)
    for name, (columns, pk, not_null) in {**JOURNAL_SCHEMA, **PREDICTION_SCHEMA}.items():
        db[name].create(columns, pk=pk, not_null=not_null)
    conn.close()
    EdgeClient(tmp_path / "client", "client", fine_tuning=None).close()
    path = tmp_path / "client" / "journal.db"
    assert _schema(path) == _schema(tmp_path / "built.db")

    # A journal from before a table existed gets just that table.
    conn = sqlite3.connect(path)
    conn.execute("DROP TABLE codec_residuals")
    conn.close()
    Journal(path).close()
    assert _schema(path) == _schema(tmp_path / "built.db")


def test_creating_a_client_does_not_import_sqlite_utils(tmp_path: Path) -> None:
    code = f"from client import EdgeClient; EdgeClient({str(tmp_path / 'c')!r}, 'c', fine_tuning=None).close(); "
    code += "import sys; assert 'sqlite_utils' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=60)


def test_marks_raised_by_another_connection_are_kept(tmp_path: Path) -> None:
    path = tmp_path / "journal.db"
    mine, other = Journal(path), Journal(path, create=False)
    try:
        for i in range(3):
            mine.append_delta(1, 1, "float32", "[]", bytes([i]), 0.0)
        other.ack_events(8)
        other.ack_delta(3, "sent")
        mine.ack_events(5)
        mine.ack_delta(2, "sent")
        assert (mine.events_acked(), mine.deltas_acked()) == (8, 3)
        assert mine.delta_status(2) == ("sent", "")
        mine._raise_meta("events_acked", 6)  # what an ack read before the other's write does
        assert other.events_acked() == 8
    finally:
        mine.close()
        other.close()


def test_a_closed_second_connection_is_kept_for_the_next_one_while_the_journal_is_open(tmp_path: Path) -> None:
    path = tmp_path / "journal.db"
    owner = Journal(path, Durability.PROCESS)
    first = Journal(path, Durability.PROCESS, create=False)
    conn = first.conn
    first.append_events([_row(1)])
    first.close()
    with pytest.raises(sqlite3.ProgrammingError):  # closed for this journal, as before
        first.last_event_seq()
    second = Journal(path, Durability.PROCESS, create=False)
    assert second.conn is conn and second.last_event_seq() == 1
    third = Journal(path, Durability.PROCESS, create=False)  # the spare is taken: a connection of its own
    assert third.conn is not conn
    third.conn.execute("PRAGMA mmap_size = 4096")  # not as open_connection left it: not kept
    third.close()
    third.close()
    other = Journal(path, Durability.POWER, create=False)  # other settings: never the spare
    assert other.conn is not conn
    other.close()
    second.close()
    owner.close()  # closes the spare too
    with pytest.raises(sqlite3.ProgrammingError):
        conn.execute("SELECT 1")
    alone = Journal(path, Durability.PROCESS, create=False)  # no open owner: closes for real
    kept = alone.conn
    alone.close()
    with pytest.raises(sqlite3.ProgrammingError):
        kept.execute("SELECT 1")


def test_a_connection_closed_inside_a_transaction_is_not_kept(tmp_path: Path) -> None:
    path = tmp_path / "journal.db"
    owner = Journal(path)
    try:
        second = Journal(path, create=False)
        conn = second.conn
        conn.execute("BEGIN IMMEDIATE")
        second.close()  # rolls the transaction back, as closing always did
        with pytest.raises(sqlite3.ProgrammingError):
            conn.execute("SELECT 1")
        owner.append_events([_row(1)])  # the write lock is free
    finally:
        owner.close()
