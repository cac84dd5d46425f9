"""Bad input at the edge: each case is a clear error or a rollback, and nothing journaled is lost."""

from __future__ import annotations

import errno
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from client import EdgeClient, JournalFullError
from client.litert_runtime import InputError
from client.sync import _Session
from coordinator import Coordinator
from fedsync.aggregation import Strategy
from fedsync.manifest import TFLITE_FLOAT32, Manifest, TensorInfo
from fedsync.sim.data import load_digits_split

TRAIN, TEST = load_digits_split(seed=0)


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[Coordinator, EdgeClient]]:
    coordinator = Coordinator(
        tmp_path / "coordinator",
        strategy=Strategy.fedbuff(buffer_size=1),
        auto_aggregate=False,
        publish_int8=False,
        publish_trainable_head=False,
    )
    coordinator.start("127.0.0.1:0")
    client = EdgeClient(tmp_path / "device", "device")
    client.sync(coordinator.address)
    for x in TEST.x[:5]:
        client.predict(x)
    yield coordinator, client
    client.close()
    coordinator.stop()


def publish_version_2(coordinator: Coordinator, client: EdgeClient) -> None:
    client.fine_tune(TRAIN.x[:100], TRAIN.y[:100], epochs=2)
    client.sync(coordinator.address)
    assert coordinator.aggregate_now() is not None and coordinator.version == 2


def journal_rows(client: EdgeClient) -> list[tuple]:
    return client.journal.conn.execute("SELECT * FROM events ORDER BY seq").fetchall()


@pytest.mark.parametrize(
    ("bad", "mentions"),
    [
        (np.zeros(63, np.float32), "shape"),
        (np.zeros((2, 64), np.float32), "one sample"),
        (np.array(["a"] * 64), "dtype"),
        (np.full(64, np.nan, np.float32), "NaN"),
        (np.full(64, np.inf, np.float32), "Inf"),
    ],
)
def test_bad_samples_are_refused_and_journal_nothing(
    served: tuple[Coordinator, EdgeClient], bad: np.ndarray, mentions: str
) -> None:
    _, client = served
    before = journal_rows(client)
    with pytest.raises(InputError, match=mentions):
        client.predict(bad)
    assert journal_rows(client) == before
    assert client.predict(TEST.x[9]).seq == len(before) + 1


def test_corrupt_model_download_keeps_the_current_version(served: tuple[Coordinator, EdgeClient]) -> None:
    coordinator, client = served
    publish_version_2(coordinator, client)
    model = coordinator.data_dir / "models" / "v2" / "model.tflite"
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0xFF  # a flipped byte in transit or on disk
    model.write_bytes(bytes(data))
    report = client.sync(coordinator.address)
    assert report.install_error is not None and "sha256" in report.install_error
    assert client.model_version == 1
    assert client.predict(TEST.x[20]).model_version == 1


def test_truncated_model_download_keeps_the_current_version(served: tuple[Coordinator, EdgeClient]) -> None:
    coordinator, client = served
    publish_version_2(coordinator, client)
    model = coordinator.data_dir / "models" / "v2" / "model.tflite"
    model.write_bytes(model.read_bytes()[:1000])
    report = client.sync(coordinator.address)
    assert report.install_error is not None
    assert client.model_version == 1


def test_manifest_that_does_not_fit_its_model_is_rolled_back(served: tuple[Coordinator, EdgeClient]) -> None:
    coordinator, client = served
    publish_version_2(coordinator, client)
    manifest = Manifest.from_json(coordinator.aggregator.manifest_json)
    # Self-consistent on paper (11 labels, 11 outputs) but the model has 10 outputs.
    lying = Manifest(
        **{
            **manifest.__dict__,
            "labels": [*manifest.labels, "ghost"],
            "outputs": [TensorInfo("probs", [-1, 11], "float32")],
        }
    )
    coordinator.aggregator.published = (manifest.version, lying.to_json())  # what Hello and GetModelInfo hand out
    report = client.sync(coordinator.address)
    assert report.install_error is not None and "smoke test" in report.install_error
    assert client.model_version == 1
    assert not client.models.version_dir(2).exists()
    assert client.predict(TEST.x[21]).model_version == 1


def test_full_disk_during_model_download_is_an_install_error(
    served: tuple[Coordinator, EdgeClient], monkeypatch: pytest.MonkeyPatch
) -> None:
    coordinator, client = served
    publish_version_2(coordinator, client)

    def disk_full(self: _Session, version: int, artifact: object, path: Path) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(_Session, "_download", disk_full)
    report = client.sync(coordinator.address)
    assert report.install_error is not None and "No space left" in report.install_error
    assert client.model_version == 1
    monkeypatch.undo()
    assert client.sync(coordinator.address).installed_version == 2


def test_full_journal_refuses_new_events_and_keeps_old_ones(served: tuple[Coordinator, EdgeClient]) -> None:
    coordinator, client = served
    before = journal_rows(client)
    pages = client.journal.conn.execute("PRAGMA page_count").fetchone()[0]
    client.journal.conn.execute(f"PRAGMA max_page_count = {pages}")  # the storage is now full
    with pytest.raises(JournalFullError) as info:
        for i in range(10_000):
            client.predict(TEST.x[i % len(TEST.x)] + np.float32(i) * 1e-3)
    assert info.value.errno == errno.ENOSPC
    journaled = journal_rows(client)
    assert journaled[: len(before)] == before
    assert [row[0] for row in journaled] == list(range(1, len(journaled) + 1))
    assert client.journal.integrity_ok()
    client.journal.conn.execute("PRAGMA max_page_count = 1073741823")  # space freed
    assert client.predict(TEST.x[30]).seq == len(journaled) + 1
    report = client.sync(coordinator.address)
    assert report.events_sent == len(journaled) + 1  # the fixture synced before its predictions


def test_coordinator_manifest_json_is_served_as_published(served: tuple[Coordinator, EdgeClient]) -> None:
    coordinator, client = served
    manifest = client.models.manifest()
    assert manifest is not None
    published = json.loads((coordinator.data_dir / "models" / "v1" / "manifest.json").read_text())
    assert manifest.artifact(TFLITE_FLOAT32).sha256 == next(
        a["sha256"] for a in published["artifacts"] if a["kind"] == TFLITE_FLOAT32
    )
