"""CoordinatorStore on its own (no gRPC, no model): exactly-once event batches, replay detection,
conflict resolution and corrections, durability across reopen, delta sequencing and version
commits."""

from __future__ import annotations

import contextlib
import hashlib
import math
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

import coordinator.store as store_module
from coordinator.store import CoordinatorStore, EventRow, StoreError

# The service hands the store whole columns (the wire's EventBatch); older stores took rows.
EventColumns = getattr(store_module, "EventColumns", None)

DEVICE = "dev-a"


def digest(*parts: object) -> bytes:
    return hashlib.sha256("/".join(map(str, parts)).encode()).digest()


H = digest("input", 0)


def ev(
    seq: int,
    input_hash: bytes | None = None,
    label: int = 1,
    confidence: float = 0.5,
    model_version: int = 1,
    latency_us: float = 100.0,
) -> EventRow:
    return EventRow(
        seq,
        digest("own", seq) if input_hash is None else input_hash,
        label,
        confidence,
        model_version,
        latency_us,
        1_700_000_000_000_000_000 + seq,
    )


def add(store: CoordinatorStore, device: str, events: list[EventRow]) -> store_module.BatchResult:
    """store.add_events, in the form the service uses."""
    if EventColumns is None:
        return store.add_events(device, events)
    return store.add_events(
        device,
        EventColumns(
            [e.seq for e in events],
            [e.input_hash for e in events],
            [e.label for e in events],
            [e.confidence for e in events],
            [e.model_version for e in events],
            [e.latency_us for e in events],
            [e.time_ns for e in events],
        ),
    )


@pytest.fixture
def store(tmp_path: Path) -> Iterator[CoordinatorStore]:
    store = CoordinatorStore(tmp_path / "c.db", num_labels=10)
    yield store
    with contextlib.suppress(sqlite3.ProgrammingError):  # already closed by the test
        store.close()


def events_of(store: CoordinatorStore, device: str) -> list[tuple]:
    return store.conn.execute(
        "SELECT seq, input_hash, label, confidence, model_version FROM events WHERE device_id = ? ORDER BY seq",
        (device,),
    ).fetchall()


def rows(events: list[EventRow]) -> list[tuple]:
    return [(e.seq, e.input_hash, e.label, e.confidence, e.model_version) for e in events]


def corrections(store: CoordinatorStore, device: str) -> list[tuple[bytes, int]]:
    return [(c.input_hash, c.label) for c in store.corrections_after(device, 0, 1000)]


def resolution(store: CoordinatorStore, input_hash: bytes) -> tuple[int, str] | None:
    row = store.conn.execute("SELECT label, device_id FROM resolutions WHERE input_hash = ?", (input_hash,)).fetchone()
    return None if row is None else (row[0], row[1])


def add_delta(
    store: CoordinatorStore, device: str, seq: int, payload: bytes | None = b"\x00" * 16, **kw: object
) -> int:
    fields = dict(
        base_version=1,
        num_examples=8,
        codec="float32",
        tensor_specs='[{"name": "w", "shape": [4], "dtype": "float32"}]',
        payload=payload,
        payload_sha256=hashlib.sha256(payload or b"").digest(),
        train_loss=0.25,
        status="buffered",
    )
    fields.update(kw)
    return store.add_delta(device, seq, **fields)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------
# events: exactly once
# --------------------------------------------------------------------------------------------


def test_add_events_is_exactly_once(store: CoordinatorStore) -> None:
    first = [ev(1), ev(2), ev(3)]
    result = add(store, DEVICE, first)
    assert (result.high_water, result.accepted, result.duplicates) == (3, 3, 0)

    # The same batch again (its ack was lost), then a batch overlapping the mark.
    result = add(store, DEVICE, first)
    assert (result.high_water, result.accepted, result.duplicates) == (3, 0, 3)
    result = add(store, DEVICE, [ev(2), ev(3), ev(4)])
    assert (result.high_water, result.accepted, result.duplicates) == (4, 1, 2)
    result = add(store, DEVICE, [])
    assert (result.high_water, result.accepted, result.duplicates) == (4, 0, 0)

    assert events_of(store, DEVICE) == rows([*first, ev(4)])
    assert store.high_waters(DEVICE) == (4, 0)
    assert store.counts()["events"] == 4
    # Sequences are per device.
    assert add(store, "dev-b", [ev(1)]).high_water == 1
    assert store.high_waters(DEVICE) == (4, 0)


@pytest.mark.parametrize(
    "change",
    [dict(label=7), dict(confidence=0.75), dict(model_version=2), dict(input_hash=digest("other"))],
    ids=["label", "confidence", "model_version", "input_hash"],
)
def test_replay_with_different_content_is_refused(store: CoordinatorStore, change: dict) -> None:
    accepted = [ev(1), ev(2)]
    add(store, DEVICE, accepted)
    forged = ev(2, **change)
    for batch in ([forged], [ev(1), forged, ev(3)]):
        with pytest.raises(StoreError, match="event 2 was already stored with different content") as info:
            add(store, DEVICE, batch)
        assert info.value.kind == "precondition"
    # Nothing of either batch was committed (not even event 3).
    assert events_of(store, DEVICE) == rows(accepted)
    assert store.high_waters(DEVICE) == (2, 0)


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        (ev(3, label=10), "label 10"),
        (ev(3, confidence=math.nan), "confidence"),
        (ev(3, confidence=1.0000001), "confidence"),
        (ev(3, confidence=-0.0001), "confidence"),
    ],
    ids=["label-10", "confidence-nan", "confidence-above-1", "confidence-negative"],
)
def test_malformed_events_are_invalid_and_nothing_is_committed(
    store: CoordinatorStore, bad: EventRow, match: str
) -> None:
    add(store, DEVICE, [ev(1), ev(2)])
    with pytest.raises(StoreError, match=match) as info:
        add(store, DEVICE, [bad])
    assert info.value.kind == "invalid"
    # In the middle of a batch: the valid events around it are not committed either.
    with pytest.raises(StoreError, match=match):
        add(store, DEVICE, [ev(3), _with_seq(bad, 4), ev(5)])
    assert store.high_waters(DEVICE) == (2, 0)
    assert store.counts()["events"] == 2


def _with_seq(e: EventRow, seq: int) -> EventRow:
    return EventRow(seq, e.input_hash, e.label, e.confidence, e.model_version, e.latency_us, e.time_ns)


@pytest.mark.parametrize("seqs", [[3, 3], [4, 3], [0], [3, 5, 4]], ids=["repeated", "decreasing", "zero", "unordered"])
def test_non_increasing_seqs_are_invalid(store: CoordinatorStore, seqs: list[int]) -> None:
    add(store, DEVICE, [ev(1), ev(2)])
    with pytest.raises(StoreError, match="strictly increasing") as info:
        add(store, DEVICE, [ev(s) for s in seqs])
    assert info.value.kind == "invalid"
    assert store.high_waters(DEVICE) == (2, 0)


def test_sequence_gap_is_a_precondition_error(store: CoordinatorStore) -> None:
    with pytest.raises(StoreError, match="expected event 1") as info:
        add(store, DEVICE, [ev(2)])
    assert info.value.kind == "precondition"
    add(store, DEVICE, [ev(1), ev(2)])
    for batch, expected in (([ev(4)], 3), ([ev(3), ev(5)], 4), ([ev(2), ev(4)], 3)):
        with pytest.raises(StoreError, match=f"sequence gap: expected event {expected}") as info:
            add(store, DEVICE, batch)
        assert info.value.kind == "precondition"
    assert store.high_waters(DEVICE) == (2, 0)
    assert store.counts()["events"] == 2


# --------------------------------------------------------------------------------------------
# conflicts and corrections
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("strong_first", [True, False], ids=["strong-first", "weak-first"])
def test_highest_confidence_wins_whatever_the_arrival_order(store: CoordinatorStore, strong_first: bool) -> None:
    pushes = [("strong", ev(1, H, label=3, confidence=0.9)), ("weak", ev(1, H, label=5, confidence=0.6))]
    for device, event in pushes if strong_first else pushes[::-1]:
        add(store, device, [event])
    assert resolution(store, H) == (3, "strong")
    assert corrections(store, "weak") == [(H, 3)]
    assert corrections(store, "strong") == []
    (row,) = store.corrections_after("weak", 0, 10)
    assert (row.confidence, row.model_version) == (pytest.approx(0.9), 1)


@pytest.mark.parametrize("newer_first", [True, False], ids=["newer-first", "older-first"])
def test_confidence_tie_goes_to_the_higher_model_version(store: CoordinatorStore, newer_first: bool) -> None:
    # "a-old" would win the device-id tie-break: the version must decide first.
    pushes = [
        ("z-new", ev(1, H, label=2, confidence=0.7, model_version=5)),
        ("a-old", ev(1, H, label=4, confidence=0.7, model_version=4)),
    ]
    for device, event in pushes if newer_first else pushes[::-1]:
        add(store, device, [event])
    assert resolution(store, H) == (2, "z-new")
    assert corrections(store, "a-old") == [(H, 2)]
    assert corrections(store, "z-new") == []


@pytest.mark.parametrize("smaller_first", [True, False], ids=["smaller-first", "larger-first"])
def test_full_tie_goes_to_the_lexicographically_smaller_device(store: CoordinatorStore, smaller_first: bool) -> None:
    pushes = [("dev-B", ev(1, H, label=8, confidence=0.7)), ("dev-a", ev(1, H, label=6, confidence=0.7))]
    for device, event in pushes if smaller_first else pushes[::-1]:
        add(store, device, [event])
    # "dev-B" < "dev-a" (code points), so dev-B wins.
    assert resolution(store, H) == (8, "dev-B")
    assert corrections(store, "dev-a") == [(H, 8)]
    assert corrections(store, "dev-B") == []


def test_corrections_are_queued_exactly_once(store: CoordinatorStore) -> None:
    add(store, "strong", [ev(1, H, label=3, confidence=0.9)])
    add(store, "weak", [ev(1, H, label=5, confidence=0.6)])
    assert corrections(store, "weak") == [(H, 3)]

    # Retransmissions, a new observation of the same losing label, another loser, and a new
    # observation by the winner: the weak device still has exactly one correction.
    for _ in range(3):
        add(store, "weak", [ev(1, H, label=5, confidence=0.6)])
        add(store, "strong", [ev(1, H, label=3, confidence=0.9)])
    add(store, "weak", [ev(2, H, label=5, confidence=0.65)])
    add(store, "other", [ev(1, H, label=1, confidence=0.1)])
    add(store, "strong", [ev(2, H, label=3, confidence=0.8)])

    assert corrections(store, "weak") == [(H, 3)]
    assert corrections(store, "other") == [(H, 3)]
    assert corrections(store, "strong") == []
    assert store.counts()["corrections"] == 2
    assert store.counts()["conflicts_resolved"] == 1
    # Cursors increase, and paging after the last one is empty.
    (last,) = store.corrections_after("weak", 0, 10)
    assert store.corrections_after("weak", last.cursor, 10) == []


def test_an_input_seen_by_many_devices_resolves_as_one_seen_by_few(tmp_path: Path) -> None:
    """The in-memory index keeps one, a few, and many observations of an input differently; the
    resolution, its observation count and the corrections are the same, also after a reopen."""

    def observations(store: CoordinatorStore) -> int:
        return store.conn.execute("SELECT observations FROM resolutions WHERE input_hash = ?", (H,)).fetchone()[0]

    store = CoordinatorStore(tmp_path / "c.db", num_labels=10)
    for i in range(20):
        add(store, f"dev-{i:02}", [ev(1, H, label=1, confidence=0.5)])
    add(store, "strong", [ev(1, H, label=2, confidence=0.99)])
    # The same input twice in one batch, among inputs never seen.
    add(store, "twice", [ev(1), ev(2, H, label=1, confidence=0.6), ev(3), ev(4, H, label=1, confidence=0.7)])
    assert resolution(store, H) == (2, "strong")
    assert observations(store) == 23
    assert corrections(store, "dev-07") == [(H, 2)] and corrections(store, "twice") == [(H, 2)]
    assert corrections(store, "strong") == []
    store.close()

    reopened = CoordinatorStore(tmp_path / "c.db", num_labels=10)
    add(reopened, "late", [ev(1, H, label=3, confidence=0.1)])
    assert resolution(reopened, H) == (2, "strong")
    assert observations(reopened) == 24
    assert corrections(reopened, "late") == [(H, 2)]
    reopened.close()


def test_a_new_winner_corrects_the_previous_winner(store: CoordinatorStore) -> None:
    add(store, "a", [ev(1, H, label=1, confidence=0.8)])
    add(store, "b", [ev(1, H, label=2, confidence=0.5)])
    assert corrections(store, "b") == [(H, 1)] and corrections(store, "a") == []

    add(store, "c", [ev(1, H, label=2, confidence=0.95)])
    assert resolution(store, H) == (2, "c")
    # "a" was right until now: it is told the new label.
    assert corrections(store, "a") == [(H, 2)]
    assert corrections(store, "c") == []
    (row,) = store.corrections_after("a", 0, 10)
    assert row.confidence == pytest.approx(0.95)


def test_every_corrected_device_converges_on_the_current_winner(store: CoordinatorStore) -> None:
    add(store, "a", [ev(1, H, label=1, confidence=0.8)])
    add(store, "b", [ev(1, H, label=2, confidence=0.5)])  # b is told 1
    add(store, "c", [ev(1, H, label=2, confidence=0.95)])  # the winner is now 2
    add(store, "d", [ev(1, H, label=1, confidence=0.99)])  # and 1 again

    def latest(device: str) -> int | None:
        found = store.corrections_after(device, 0, 1000)
        return found[-1].label if found else None

    def held(device: str, own_label: int) -> int:
        """What a device shows after applying its latest correction (its own label if none)."""
        label = latest(device)
        return own_label if label is None else label

    assert resolution(store, H) == (1, "d")
    assert {d: held(d, own) for d, own in (("a", 1), ("b", 2), ("c", 2), ("d", 1))} == dict.fromkeys("abcd", 1)
    # In particular, with the winner at 2 in between, "b" must have been told 2 then 1 again.
    add(store, "e", [ev(1, H, label=2, confidence=0.999)])
    assert latest("b") == 2 and latest("a") == 2 and latest("d") == 2


def test_state_survives_close_and_reopen(tmp_path: Path) -> None:
    path = tmp_path / "c.db"
    store = CoordinatorStore(path, num_labels=10)
    add(store, "strong", [ev(1, H, label=3, confidence=0.9), ev(2)])
    add(store, "weak", [ev(1, H, label=5, confidence=0.6)])
    add_delta(store, "strong", 1, payload=b"delta-one")
    add_delta(store, "strong", 2, payload=None, status="rejected", reason="shape_mismatch")
    counts = store.counts()
    weak_corrections = store.corrections_after("weak", 0, 10)
    store.close()

    store = CoordinatorStore(path, num_labels=10)
    try:
        assert store.counts() == counts
        assert store.high_waters("strong") == (2, 2)
        assert store.high_waters("weak") == (1, 0)
        assert store.corrections_after("weak", 0, 10) == weak_corrections
        assert [bytes(d.payload) for d in store.iter_deltas([("strong", 1)])] == [b"delta-one"]
        assert store.delta_status("strong", 2)[:2] == ("rejected", "shape_mismatch")
        assert store.integrity_ok()
        # Exactly-once holds across the restart...
        result = add(store, "strong", [ev(1, H, label=3, confidence=0.9), ev(2), ev(3)])
        assert (result.high_water, result.accepted, result.duplicates) == (3, 1, 2)
        with pytest.raises(StoreError, match="different content"):
            add(store, "weak", [ev(1, H, label=6, confidence=0.6)])
        with pytest.raises(StoreError, match="expected delta 3"):
            add_delta(store, "strong", 4)
        # ...and so does conflict resolution over observations from before it.
        add(store, "late", [ev(1, H, label=7, confidence=0.2)])
        assert corrections(store, "late") == [(H, 3)]
        assert corrections(store, "weak") == [(H, 3)]
    finally:
        store.close()


# --------------------------------------------------------------------------------------------
# deltas and versions
# --------------------------------------------------------------------------------------------


def test_add_delta_enforces_the_sequence(store: CoordinatorStore) -> None:
    with pytest.raises(StoreError, match="sequence gap: expected delta 1, got 2") as info:
        add_delta(store, DEVICE, 2)
    assert info.value.kind == "precondition"
    assert add_delta(store, DEVICE, 1) == 1
    assert add_delta(store, DEVICE, 2, payload=None, status="rejected", reason="stale") == 2
    for seq, expected in ((2, 3), (1, 3), (5, 3)):
        with pytest.raises(StoreError, match=f"expected delta {expected}, got {seq}") as info:
            add_delta(store, DEVICE, seq, payload=b"other")
        assert info.value.kind == "precondition"
    assert store.high_waters(DEVICE) == (0, 2)
    assert store.delta_status(DEVICE, 1) == ("buffered", "", hashlib.sha256(b"\x00" * 16).digest())
    assert store.delta_status(DEVICE, 2)[:2] == ("rejected", "stale")
    assert store.delta_status(DEVICE, 3) is None
    assert store.counts()["deltas_buffered"] == 1 and store.counts()["deltas_rejected"] == 1


def test_commit_version_marks_deltas_aggregated_and_drops_their_payloads(store: CoordinatorStore) -> None:
    add_delta(store, "a", 1, payload=b"a1")
    add_delta(store, "a", 2, payload=b"a2")
    add_delta(store, "b", 1, payload=b"b1")
    add_delta(store, "c", 1, payload=b"c1")
    assert store.buffered_count()[0] == 4
    assert sorted(store.buffered_keys()) == [("a", 1), ("a", 2), ("b", 1), ("c", 1)]

    store.commit_version(2, 1, b'{"v": 2}', 0.5, aggregated=[("a", 1, 0), ("b", 1, 1)], rejected=[("a", 2, "stale")])

    status = dict(
        ((d, s), (st, into, staleness))
        for d, s, st, into, staleness in store.conn.execute(
            "SELECT device_id, seq, status, aggregated_into, staleness FROM deltas"
        )
    )
    assert status == {
        ("a", 1): ("aggregated", 2, 0),
        ("b", 1): ("aggregated", 2, 1),
        ("a", 2): ("rejected", None, None),
        ("c", 1): ("buffered", None, None),
    }
    assert store.delta_status("a", 2)[:2] == ("rejected", "stale")
    # Only the still-buffered delta keeps its payload.
    kept = store.iter_deltas([("a", 1), ("a", 2), ("b", 1), ("c", 1)])
    assert [(d.device_id, d.seq, bytes(d.payload)) for d in kept] == [("c", 1, b"c1")]
    if hasattr(store, "deltas_dir"):
        assert sorted(p.name for p in store.deltas_dir.iterdir()) == ["c.1.delta"]
    assert store.buffered_count()[0] == 1
    assert store.latest_version() == (2, b'{"v": 2}')
    assert store.version_history() == [(2, 2, 0.5)]

    # A second commit does not touch deltas that are no longer buffered.
    store.commit_version(3, 2, b"{}", None, aggregated=[("a", 1, 5), ("c", 1, 0)], rejected=[("b", 1, "late")])
    assert store.conn.execute(
        "SELECT aggregated_into, staleness FROM deltas WHERE device_id = 'a' AND seq = 1"
    ).fetchone() == (2, 0)
    assert store.delta_status("b", 1)[0] == "aggregated"
    assert store.counts()["deltas_aggregated"] == 3 and store.counts()["deltas_buffered"] == 0


def test_add_delta_registers_a_new_device_and_refreshes_a_known_one(store: CoordinatorStore) -> None:
    store.touch_device("known", model_version=1)
    (seen_before,) = store.conn.execute("SELECT last_seen_ns FROM devices WHERE device_id = 'known'").fetchone()
    assert add_delta(store, "known", 1) == 1
    assert add_delta(store, "new", 1) == 1
    rows = dict(
        (d, (hw, first <= last, version))
        for d, hw, first, last, version in store.conn.execute(
            "SELECT device_id, deltas_high_water, first_seen_ns, last_seen_ns, model_version FROM devices"
        )
    )
    assert rows == {"known": (1, True, 1), "new": (1, True, 0)}
    (seen_after,) = store.conn.execute("SELECT last_seen_ns FROM devices WHERE device_id = 'known'").fetchone()
    assert seen_after >= seen_before
    with pytest.raises(StoreError, match="sequence gap: expected delta 1, got 3"):
        add_delta(store, "newer", 3)
    assert store.high_waters("newer") == (0, 0) and store.counts()["devices"] == 2


def test_iter_buffered_yields_what_iter_deltas_of_the_buffered_keys_does(store: CoordinatorStore) -> None:
    for device, seq in (("b", 1), ("a", 1), ("a", 2), ("c", 1)):
        add_delta(store, device, seq, payload=f"{device}{seq}".encode())
    add_delta(store, "c", 2, payload=None, status="rejected", reason="stale")
    store.commit_version(2, 1, b"{}", None, aggregated=[("a", 1, 0)])
    expected = list(store.iter_deltas(store.buffered_keys()))
    assert sorted((d.device_id, d.seq, bytes(d.payload)) for d in expected) == [
        ("a", 2, b"a2"),
        ("b", 1, b"b1"),
        ("c", 1, b"c1"),
    ]
    assert list(store.iter_buffered()) == expected


def test_commit_version_is_atomic(store: CoordinatorStore) -> None:
    add_delta(store, "a", 1, payload=b"a1")
    store.commit_version(2, 1, b"{}", None, aggregated=[])
    with pytest.raises(sqlite3.IntegrityError):
        store.commit_version(2, 1, b"{}", None, aggregated=[("a", 1, 0)])  # version 2 exists already
    assert store.delta_status("a", 1)[0] == "buffered"
    assert [bytes(d.payload) for d in store.iter_deltas([("a", 1)])] == [b"a1"]
    assert store.version_history() == [(2, 0, None)]


# --------------------------------------------------------------------------------------------
# known bugs
# --------------------------------------------------------------------------------------------


def test_refused_duplicate_delta_keeps_the_committed_payload(store: CoordinatorStore) -> None:
    add_delta(store, DEVICE, 1, payload=b"committed")
    # E.g. a client retry racing the first upload: both passed the service's high-water check.
    with pytest.raises(StoreError, match="expected delta 2, got 1"):
        add_delta(store, DEVICE, 1, payload=b"committed")
    assert [bytes(d.payload) for d in store.iter_deltas([(DEVICE, 1)])] == [b"committed"]


@pytest.mark.parametrize("writer", ["add_delta", "commit_version"])
def test_delta_writers_wait_for_the_store_lock(store: CoordinatorStore, writer: str) -> None:
    add_delta(store, "a", 1, payload=b"a1")
    errors: list[BaseException] = []

    def write() -> None:
        try:
            if writer == "add_delta":
                add_delta(store, "b", 1, payload=b"b1")
            else:
                store.commit_version(2, 1, b"{}", None, aggregated=[("a", 1, 0)])
        except BaseException as exc:
            errors.append(exc)

    # Another worker is in the middle of a locked transaction (as add_events or touch_device would be).
    with store._lock:  # the lock every @_locked method holds
        store.conn.execute("BEGIN IMMEDIATE")
        store.conn.execute("INSERT INTO devices (device_id, first_seen_ns, last_seen_ns) VALUES ('other', 1, 1)")
        thread = threading.Thread(target=write)
        thread.start()
        thread.join(0.5)
        other_committed = store.conn.in_transaction
        if store.conn.in_transaction:
            store.conn.execute("COMMIT")
    thread.join(10)
    assert errors == []
    assert other_committed, "the other worker's transaction was rolled back under it"
    assert store.high_waters("other") == (0, 0) and store.conn.execute(
        "SELECT COUNT(*) FROM devices WHERE device_id = 'other'"
    ).fetchone() == (1,)


@pytest.mark.parametrize(
    "bad", [ev(1, latency_us=math.nan), ev(1, model_version=2**63)], ids=["latency-nan", "model-version-2**63"]
)
def test_unstorable_numbers_are_invalid(store: CoordinatorStore, bad: EventRow) -> None:
    with pytest.raises(StoreError) as info:
        add(store, DEVICE, [bad])
    assert info.value.kind == "invalid"
    assert store.high_waters(DEVICE) == (0, 0)


def test_add_events_accepts_event_rows(store: CoordinatorStore) -> None:
    # The row form add_events also takes (it once failed with a TypeError: rows were zipped directly).
    result = store.add_events(DEVICE, [ev(1), ev(2)])
    assert (result.high_water, result.accepted) == (2, 2)
    assert store.add_events(DEVICE, [ev(2), ev(3)]).duplicates == 1
    with pytest.raises(StoreError, match="32 bytes") as info:
        store.add_events(DEVICE, [ev(4, input_hash=b"\x00" * 31)])
    assert info.value.kind == "invalid"
    assert events_of(store, DEVICE) == rows([ev(1), ev(2), ev(3)])


@pytest.mark.parametrize("length", [0, 31, 33])
def test_input_hashes_of_the_wrong_length_are_invalid(store: CoordinatorStore, length: int) -> None:
    with pytest.raises(StoreError, match="32 bytes") as info:
        add(store, DEVICE, [ev(1), ev(2, input_hash=b"\x01" * length)])
    assert info.value.kind == "invalid"
    assert store.high_waters(DEVICE) == (0, 0)


def test_a_store_from_before_offered_versions_is_migrated_and_keeps_its_devices(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    conn = sqlite3.connect(path)
    conn.executescript(
        "CREATE TABLE devices (device_id TEXT PRIMARY KEY, events_high_water INTEGER NOT NULL DEFAULT 0, "
        "deltas_high_water INTEGER NOT NULL DEFAULT 0, model_version INTEGER NOT NULL DEFAULT 0, "
        "first_seen_ns INTEGER NOT NULL, last_seen_ns INTEGER NOT NULL);"
        "INSERT INTO devices VALUES ('old-device', 7, 2, 3, 1, 1);"
    )
    conn.commit()
    conn.close()
    store = CoordinatorStore(path, num_labels=10)
    try:
        assert store.high_waters("old-device") == (7, 2)
        assert store.versions_in_use() == {3}
        marks = store.touch_device("old-device", 3, offered_version=5)
        assert (marks.events_high_water, marks.deltas_high_water) == (7, 2)
        assert store.versions_in_use() == {3, 5}
    finally:
        store.close()
