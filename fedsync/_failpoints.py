"""Failpoints for crash testing: `FEDSYNC_FAILPOINT=name` makes the process SIGKILL itself there.

Crash tests use them to stop a real process at the exact step under test (between writing a
version's artifacts and committing it, say) rather than hoping a random kill lands there.
"""

from __future__ import annotations

import os
import signal

ENV = "FEDSYNC_FAILPOINT"


def failpoint(name: str) -> None:
    if os.environ.get(ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)
