"""kill -9 an edge client mid-predict, fine-tune, sync or model install: nothing journaled is lost or
duplicated, the journal stays intact, the model store stays on a valid version (bench/client_crash.py)."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]


def _load_bench() -> Any:
    spec = importlib.util.spec_from_file_location("fedsync_bench_client_crash", REPO / "bench" / "client_crash.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


crash = _load_bench()


@pytest.fixture(scope="module")
def coordinator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    coordinator = crash.start_coordinator(tmp_path_factory.mktemp("crash-coordinator"))
    try:
        yield coordinator
    finally:
        coordinator.stop()


@pytest.mark.parametrize("durability", ["POWER", "PROCESS"])
def test_kill_9_loses_and_duplicates_nothing(coordinator: Any, tmp_path: Path, durability: str) -> None:
    results = crash.run_trials(
        coordinator, tmp_path, 3, seed=1234, durability=durability, fine_tuning="head", device_prefix="test"
    )
    summary = crash.summarize(results)
    details = [(r.trial, r.phase, r.problems, r.child_error[-300:], r.verifier_error[-300:]) for r in results]
    assert summary["trials"] == 3
    assert summary["kills"] == 3, details  # every child was still running when the kill came
    assert summary["events_checked"] > 0, details
    assert summary["lost"] == 0, details
    assert summary["duplicated"] == 0, details
    assert summary["integrity_failures"] == 0, details
    assert summary["invalid_model_store"] == 0, details
    assert summary["coordinator_mismatches"] == 0, details
    assert summary["unacked_after_sync"] == 0, details
    assert summary["failed_trials"] == 0, details
    # The devices got far enough to install a published version.
    assert all(r.store_version >= 1 for r in results), details
