"""Partial delta uploads, kept on disk so a cut transfer resumes where it stopped.

One file per device for its next delta: `<device>.part` (payload bytes received so far) and
`<device>.json` (seq, sha256, size). The payload is checked against its sha256 only when
complete, so a part file that lost its tail (power cut) just means more bytes are resent.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class PartialUpload:
    seq: int
    sha256: bytes
    size: int
    received: int


class PartialUploads:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def _paths(self, device_id: str) -> tuple[Path, Path]:
        return self.root / f"{device_id}.part", self.root / f"{device_id}.json"

    def part_file(self, device_id: str) -> Path:
        return self._paths(device_id)[0]

    def status(self, device_id: str) -> PartialUpload | None:
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
        if offset == 0:
            part.write_bytes(b"")
            meta.write_text(json.dumps({"seq": seq, "sha256": sha256.hex(), "size": size}))
            return PartialUpload(seq, sha256, size, 0)
        current = self.status(device_id)
        if current is None or (current.seq, current.sha256, current.size) != (seq, sha256, size):
            raise ValueError(f"no partial upload of delta {seq} with this content to resume")
        if current.received < offset:
            raise ValueError(f"cannot resume at byte {offset}: only {current.received} bytes arrived")
        if current.received > offset:
            os.truncate(part, offset)
        return PartialUpload(seq, sha256, size, offset)

    def append(self, device_id: str, data: bytes) -> None:
        part, _ = self._paths(device_id)
        with open(part, "ab") as f:
            f.write(data)

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
        for path in self._paths(device_id):
            path.unlink(missing_ok=True)
