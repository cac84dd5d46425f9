"""Partial delta uploads, kept on disk so a cut transfer resumes where it stopped.

One file per device for its next delta: `<device>.part` (payload bytes received so far) and
`<device>.json` (seq, sha256, size). The payload is checked against its sha256 only when
complete, so a part file that lost its tail (power cut) just means more bytes are resent.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import mmap
import os
import threading
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

WRITES_AHEAD = 2  # chunks received but not yet written, at most


@dataclass(frozen=True)
class PartialUpload:
    seq: int
    sha256: bytes
    size: int
    received: int
    stream: int = 0  # from begin(): the stream that may now append (see appender)


class UploadSuperseded(Exception):
    """A newer stream began the same device's upload: an older one must not append any more."""


class PartialUploads:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        # A cut stream's last chunks may still be written when the device's next stream begins
        # (and truncates the part file to its resume offset): appends are checked against the
        # stream that began last, under a lock of the device's.
        self._guard = threading.Lock()
        self._locks: dict[str, threading.Lock] = {}
        self._writers: dict[str, int] = {}
        self._streams = itertools.count(1)
        # Devices that may have files here (this object writes every one of them): most never
        # have, and for them status() and discard() need not ask the file system.
        self._on_disk = {path.name[:-5] for path in self.root.iterdir() if path.name.endswith((".part", ".json"))}

    def _lock(self, device_id: str) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault(device_id, threading.Lock())

    def _paths(self, device_id: str) -> tuple[Path, Path]:
        return self.root / f"{device_id}.part", self.root / f"{device_id}.json"

    def part_file(self, device_id: str) -> Path:
        return self._paths(device_id)[0]

    def status(self, device_id: str) -> PartialUpload | None:
        if device_id not in self._on_disk:
            return None
        part, meta = self._paths(device_id)
        try:
            header = json.loads(meta.read_text())
            received = part.stat().st_size
        except (OSError, ValueError):
            return None
        return PartialUpload(int(header["seq"]), bytes.fromhex(header["sha256"]), int(header["size"]), received)

    def begin(self, device_id: str, seq: int, sha256: bytes, size: int, offset: int) -> PartialUpload:
        """Start (offset 0) or continue (offset > 0) the upload; raises ValueError when it can't resume."""
        part, meta = self._paths(device_id)
        with self._lock(device_id):
            stream = next(self._streams)
            self._writers[device_id] = stream
            self._on_disk.add(device_id)
            if offset == 0:
                part.write_bytes(b"")
                meta.write_text(json.dumps({"seq": seq, "sha256": sha256.hex(), "size": size}))
                return PartialUpload(seq, sha256, size, 0, stream)
            current = self.status(device_id)
            if current is None or (current.seq, current.sha256, current.size) != (seq, sha256, size):
                raise ValueError(f"no partial upload of delta {seq} with this content to resume")
            if current.received < offset:
                raise ValueError(f"cannot resume at byte {offset}: only {current.received} bytes arrived")
            if current.received > offset:
                os.truncate(part, offset)
            return PartialUpload(seq, sha256, size, offset, stream)

    @contextlib.contextmanager
    def appender(
        self, device_id: str, upload: PartialUpload, digest: hashlib._Hash
    ) -> Iterator[Callable[[bytes], None]]:
        """A function that appends bytes to the part file and to digest, in order, in a thread of
        its own while the next chunks arrive: writing to new pages of the page cache can take as
        long as receiving. Leaving the block waits for the writes; it raises UploadSuperseded once
        a newer stream of the device began. No fsync: the payload is fsynced once, when it is
        stored; a tail lost before that is just resent."""
        part, _ = self._paths(device_id)
        lock = self._lock(device_id)
        fd = os.open(part, os.O_WRONLY | os.O_APPEND)
        pending: deque[Future[None]] = deque()

        def write(data: bytes) -> None:
            with lock:
                if self._writers.get(device_id) != upload.stream:
                    raise UploadSuperseded(f"a newer upload stream of {device_id} began")
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
            digest.update(data)

        try:
            with ThreadPoolExecutor(1, "fedsync-upload") as writer:

                def append(data: bytes) -> None:
                    pending.append(writer.submit(write, data))
                    if len(pending) > WRITES_AHEAD:
                        pending.popleft().result()

                yield append
                for done in pending:
                    done.result()
        finally:
            os.close(fd)

    def prefix_hash(self, device_id: str) -> hashlib._Hash:
        """sha256 over the bytes already received, to continue with the rest as it arrives."""
        digest = hashlib.sha256()
        part, _ = self._paths(device_id)
        with open(part, "rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
        return digest

    def payload(self, device_id: str) -> memoryview:
        """The received payload, memory-mapped (read-only, no copy)."""
        part, _ = self._paths(device_id)
        with open(part, "rb") as f:
            if os.fstat(f.fileno()).st_size == 0:
                return memoryview(b"")
            return memoryview(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ))

    def discard(self, device_id: str) -> None:
        with self._lock(device_id):
            self._writers.pop(device_id, None)
            if device_id in self._on_disk:
                for path in self._paths(device_id):
                    path.unlink(missing_ok=True)
                self._on_disk.discard(device_id)
