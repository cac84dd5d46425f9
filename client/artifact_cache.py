"""Model artifacts shared by the clients on one machine, by content.

Clients that install the same version on one host (the virtual devices of a simulation, several
apps on one gateway) need not each download its artifacts: the first client to install an artifact
adds its verified file here under its sha256, and the others hard-link it into their own model
store instead of fetching it. Every client still has its own complete store and verifies the
manifest against what it links (the store re-checks each file's sha256), so a shared cache can
save transfers but never install anything a client would not have installed itself.

Files are immutable once added (a client never writes into an installed artifact), which is what
makes hard links safe. Where hard links are impossible (another filesystem), nothing is shared.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

_HEX_DIGITS = frozenset("0123456789abcdef")


class ArtifactCache:
    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._root = str(self.root)

    def _path(self, sha256: str) -> str:
        if len(sha256) != 64 or not _HEX_DIGITS.issuperset(sha256):
            raise ValueError(f"not a sha256 hex digest: {sha256!r}")
        return os.path.join(self._root, sha256)

    def link_into(self, sha256: str, size: int, target: Path) -> bool:
        """Hard-link the cached artifact to `target` (which must not exist); False on a miss."""
        source = self._path(sha256)
        try:
            if os.stat(source).st_size != size:
                return False
            os.link(source, target)
        except OSError:  # not cached, or links impossible here: the caller downloads it
            return False
        return True

    def add(self, path: Path, sha256: str) -> None:
        """Share a file whose content the caller has verified against `sha256`."""
        with contextlib.suppress(OSError):  # already there (another client was first), or no links
            os.link(path, self._path(sha256))
