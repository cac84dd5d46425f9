"""Delta payloads as files of their own beside the coordinator's database.

A large blob in SQLite would be written twice (WAL, then the database) and rewritten with every
update of its row; a file per delta is written once and its row names it. The row's commit comes
after the file is in place, so a crash in between leaves only an orphan file, removed on the next
start. Under POWER durability a placed file is fsynced with its directory entry.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable
from pathlib import Path

from fedsync.manifest import fsync_path


def payload_name(device_id: str, seq: int) -> str:
    """The file a delta's payload lives in; a (device, seq) names at most one stored delta."""
    return f"{device_id}.{seq}.delta"


class PayloadFiles:
    def __init__(self, folder: Path, durable: bool) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(exist_ok=True)
        self.durable = durable
        self._folder = str(self.folder)

    def path(self, name: str) -> str:
        return os.path.join(self._folder, name)

    def place(self, name: str, payload: bytes | memoryview | None, payload_file: Path | None = None) -> None:
        """Write `payload`, or move the already written `payload_file`, to `name`."""
        target = self.path(name)
        if payload_file is not None:
            if self.durable:
                fsync_path(payload_file)
            os.replace(payload_file, target)
        else:
            # os-level calls: a buffered file object costs more than writing a delta's bytes.
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o666)
            try:
                view = memoryview(payload)  # type: ignore[arg-type]
                while view:
                    view = view[os.write(fd, view) :]
                if self.durable:
                    os.fsync(fd)
            finally:
                os.close(fd)
        if self.durable:
            fsync_path(self.folder)

    def read(self, name: str) -> bytes:
        with open(self.path(name), "rb", buffering=0) as f:
            return f.readall()

    def remove(self, names: Iterable[str]) -> None:
        for name in names:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path(name))

    def remove_orphans(self, referenced: set[str]) -> None:
        """Payload files no row names: left by a crash between placing a file and its commit, or
        between a commit that released it and its removal."""
        self.remove(path.name for path in self.folder.glob("*.delta") if path.name not in referenced)
