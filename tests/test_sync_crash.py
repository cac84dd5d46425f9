"""A few trials of the crash test: coordinator and client processes killed with SIGKILL at random
moments; afterwards the coordinator holds every journaled event and delta exactly once."""

from __future__ import annotations

import random
from pathlib import Path

from bench.sync_crash import run_trial


def test_sigkilled_processes_lose_and_double_nothing(tmp_path: Path) -> None:
    result = run_trial(0, tmp_path, clients=2, kills=3, rng=random.Random(7), coordinator_first=True)
    assert result.coordinator_kills >= 1 and result.events_checked > 0, result
    assert (result.lost, result.duplicated, result.mismatched, result.integrity_failures) == (0, 0, 0, 0), result
