"""The whole loop with real parts: a coordinator on an ephemeral loopback port, three clients in
temporary folders, work done while the coordinator is down, a coordinator restart, then sync."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from client import EdgeClient, NoModelError
from client.litert_runtime import LiteRTClassifier
from coordinator import Coordinator
from fedsync.aggregation import Strategy
from fedsync.manifest import TFLITE_FLOAT32
from fedsync.sim.data import load_digits_split


def start_coordinator(data_dir: Path) -> Coordinator:
    coordinator = Coordinator(
        data_dir,
        strategy=Strategy.fedbuff(buffer_size=2, max_staleness=8),
        auto_aggregate=False,
        publish_int8=False,
        publish_trainable_head=False,
    )
    coordinator.start("127.0.0.1:0")
    return coordinator


def coordinator_events(coordinator: Coordinator, device_id: str) -> list[tuple]:
    return coordinator.store.conn.execute(
        "SELECT seq, input_hash, label, confidence, model_version FROM events WHERE device_id = ? ORDER BY seq",
        (device_id,),
    ).fetchall()


def journal_events(client: EdgeClient) -> list[tuple]:
    return client.journal.conn.execute(
        "SELECT seq, input_hash, label, confidence, model_version FROM events ORDER BY seq"
    ).fetchall()


def test_offline_work_syncs_exactly_once_and_resolves_conflicts(tmp_path: Path) -> None:
    train, test = load_digits_split(seed=0)
    coordinator = start_coordinator(tmp_path / "coordinator")
    a, b, c = (EdgeClient(tmp_path / name, name) for name in ("device-a", "device-b", "device-c"))
    try:
        for client in (a, b, c):
            with pytest.raises(NoModelError):
                client.predict(test.x[0])
            assert client.sync(coordinator.address).installed_version == 1

        # A and B train online; their deltas make version 2, which only C downloads.
        a.fine_tune(train.x[:300], train.y[:300], epochs=10, learning_rate=0.1)
        b.fine_tune(train.x[300:600], train.y[300:600], epochs=10, learning_rate=0.1)
        assert a.sync(coordinator.address).deltas_sent == 1
        assert b.sync(coordinator.address).deltas_sent == 1
        assert coordinator.aggregate_now() is not None and coordinator.version == 2
        assert c.sync(coordinator.address).installed_version == 2
        assert (a.model_version, b.model_version, c.model_version) == (1, 1, 2)
        coordinator.stop()

        # Coordinator down: inference and fine-tuning go on and are journaled.
        v1 = LiteRTClassifier(a.models.artifact_path(TFLITE_FLOAT32))
        v2 = LiteRTClassifier(c.models.artifact_path(TFLITE_FLOAT32))
        p1, p2 = v1.predict_proba(test.x), v2.predict_proba(test.x)
        disagree = np.flatnonzero(p1.argmax(axis=1) != p2.argmax(axis=1))
        assert len(disagree) > 0
        planted = test.x[disagree[0]]
        pa, pc = a.predict(planted), c.predict(planted)
        assert pa.model_label != pc.model_label
        winner, loser = (a, c) if pa.confidence > pc.confidence else (c, a)
        winning_label = max(pa, pc, key=lambda p: p.confidence).model_label
        for i, client in enumerate((a, b, c)):
            for x in test.x[10 * i : 10 * i + 10]:
                client.predict(x)
        a.fine_tune(train.x[600:800], train.y[600:800], epochs=5)
        c.fine_tune(train.x[800:1000], train.y[800:1000], epochs=5)
        assert a.journal.pending_event_count() == 11 and c.journal.pending_delta_count() == 1

        # A new coordinator process on the same folder: nothing accepted before is lost.
        coordinator = start_coordinator(tmp_path / "coordinator")
        assert coordinator.version == 2
        for client in (a, b, c):
            report = client.sync(coordinator.address)
            assert report.events_sent == len(journal_events(client))
        for client in (a, b, c):
            assert coordinator_events(coordinator, client.device_id) == journal_events(client)
            assert client.journal.pending_event_count() == 0
            assert client.journal.pending_delta_count() == 0
        # A second sync sends nothing again.
        assert all(client.sync(coordinator.address).events_sent == 0 for client in (a, b, c))

        # A's delta is based on version 1 (stale by one), C's on version 2: both are aggregated.
        published = coordinator.aggregate_now()
        assert published is not None and published.version == 3 and published.num_deltas == 2
        for client in (a, b, c):
            client.sync(coordinator.address)
            assert client.model_version == 3

        # The planted conflict resolved to the most confident label; only the loser was corrected.
        planted_hash = hashlib.sha256(np.asarray(planted, dtype=np.float32).tobytes()).digest()
        resolved = coordinator.store.conn.execute(
            "SELECT label, device_id FROM resolutions WHERE input_hash = ?", (planted_hash,)
        ).fetchone()
        assert resolved == (winning_label, winner.device_id)
        assert [c.label for c in loser.cache.corrections() if c.input_hash == planted_hash] == [winning_label]
        assert all(c.input_hash != planted_hash for c in winner.cache.corrections())
        cached = loser.journal.conn.execute(
            "SELECT label, corrected FROM prediction_cache WHERE input_hash = ?", (planted_hash,)
        ).fetchall()
        assert cached and all(row == (winning_label, 1) for row in cached)
        assert loser.predict(planted).label == winning_label
        # Corrections double as pseudo-labels for local fine-tuning.
        assert loser.corrected_labels(np.stack([planted, test.x[449]])).tolist() == [winning_label, -1]
        for client in (a, b, c):
            assert client.journal.integrity_ok()
        assert coordinator.store.integrity_ok()
    finally:
        for client in (a, b, c):
            client.close()
        coordinator.stop()
