"""Partial delta uploads on the coordinator: appends land in order, and a cut stream whose last
chunks are still being written cannot append after the device's next stream began."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from coordinator.uploads import PartialUploads, UploadSuperseded

DEVICE = "edge-1"
PAYLOAD = os.urandom(5 * 1000)
SHA = hashlib.sha256(PAYLOAD).digest()


def chunks(data: bytes, size: int = 1000) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


def test_appender_writes_and_hashes_every_chunk_in_order(tmp_path: Path) -> None:
    uploads = PartialUploads(tmp_path)
    upload = uploads.begin(DEVICE, 1, SHA, len(PAYLOAD), 0)
    digest = hashlib.sha256()
    with uploads.appender(DEVICE, upload, digest) as append:
        for chunk in chunks(PAYLOAD):
            append(chunk)
    assert digest.digest() == SHA
    assert bytes(uploads.payload(DEVICE)) == PAYLOAD
    assert uploads.status(DEVICE).received == len(PAYLOAD)


def test_resume_continues_the_prefix_hash(tmp_path: Path) -> None:
    uploads = PartialUploads(tmp_path)
    first = uploads.begin(DEVICE, 1, SHA, len(PAYLOAD), 0)
    with uploads.appender(DEVICE, first, hashlib.sha256()) as append:
        append(PAYLOAD[:2000])
    resumed = uploads.begin(DEVICE, 1, SHA, len(PAYLOAD), 2000)
    digest = uploads.prefix_hash(DEVICE)
    with uploads.appender(DEVICE, resumed, digest) as append:
        append(PAYLOAD[2000:])
    assert digest.digest() == SHA
    assert bytes(uploads.payload(DEVICE)) == PAYLOAD


def test_a_superseded_stream_cannot_append_after_the_next_one_began(tmp_path: Path) -> None:
    uploads = PartialUploads(tmp_path)
    old = uploads.begin(DEVICE, 1, SHA, len(PAYLOAD), 0)
    with pytest.raises(UploadSuperseded), uploads.appender(DEVICE, old, hashlib.sha256()) as stale:
        stale(PAYLOAD[:1000])  # written before the next stream begins, or refused: either way
        stale(PAYLOAD[1000:2000])
        new = uploads.begin(DEVICE, 1, SHA, len(PAYLOAD), 0)  # the device reconnected
        stale(b"x" * 1000)  # the old stream's next chunk: refused, the part file is the new stream's
    digest = hashlib.sha256()
    with uploads.appender(DEVICE, new, digest) as append:
        for chunk in chunks(PAYLOAD):
            append(chunk)
    assert bytes(uploads.payload(DEVICE)) == PAYLOAD
    assert digest.digest() == SHA


def test_a_discarded_upload_refuses_further_appends(tmp_path: Path) -> None:
    uploads = PartialUploads(tmp_path)
    upload = uploads.begin(DEVICE, 1, SHA, len(PAYLOAD), 0)
    with pytest.raises(UploadSuperseded), uploads.appender(DEVICE, upload, hashlib.sha256()) as append:
        append(PAYLOAD[:1000])
        uploads.discard(DEVICE)
        append(PAYLOAD[1000:2000])
    assert uploads.status(DEVICE) is None


def test_status_and_discard_know_the_files_a_restarted_coordinator_left(tmp_path: Path) -> None:
    uploads = PartialUploads(tmp_path)
    assert uploads.status(DEVICE) is None
    uploads.discard(DEVICE)  # nothing to remove
    upload = uploads.begin("dotted.device-2", 4, SHA, len(PAYLOAD), 0)
    with uploads.appender("dotted.device-2", upload, hashlib.sha256()) as append:
        append(PAYLOAD[:1500])
    restarted = PartialUploads(tmp_path)
    status = restarted.status("dotted.device-2")
    assert status is not None and (status.seq, status.sha256, status.received) == (4, SHA, 1500)
    assert restarted.status(DEVICE) is None
    restarted.discard("dotted.device-2")
    assert restarted.status("dotted.device-2") is None and list(tmp_path.iterdir()) == []
