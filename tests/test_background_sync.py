"""The background sync loop: work goes on while the coordinator is down, and everything drains
when it comes back, with no event lost or doubled."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from client import Durability, EdgeClient
from coordinator import Coordinator
from fedsync.aggregation import Strategy
from fedsync.sim.data import load_digits_split

TRAIN, TEST = load_digits_split(seed=0)


def start(data_dir: Path, port: int = 0) -> Coordinator:
    coordinator = Coordinator(
        data_dir,
        strategy=Strategy.fedbuff(buffer_size=100),
        auto_aggregate=False,
        publish_int8=False,
        publish_trainable_head=False,
    )
    coordinator.start(f"127.0.0.1:{port}")
    return coordinator


def wait_until(condition, timeout_s: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return False


def test_background_sync_recovers_when_the_coordinator_returns(tmp_path: Path) -> None:
    coordinator = start(tmp_path / "coordinator")
    port = coordinator.port
    client = EdgeClient(tmp_path / "device", "device", durability=Durability.PROCESS, fine_tuning=None)
    client.sync(coordinator.address)
    coordinator.stop()
    loop = client.sync_in_background(f"127.0.0.1:{port}", interval_s=0.2)
    loop.backoff.max = 0.5  # keep retries quick in the test
    try:
        started = time.monotonic()
        for i in range(300):
            client.predict(TEST.x[i % len(TEST.x)] + np.float32(i) * 1e-3)
        assert time.monotonic() - started < 10  # predict never waited on the failing sync
        assert wait_until(lambda: loop.failures >= 2)
        assert loop.last_error is not None and "UNAVAILABLE" in loop.last_error
        coordinator = start(tmp_path / "coordinator", port)
        loop.wake()
        assert wait_until(lambda: client.journal.pending_event_count() == 0)
        assert loop.failures == 0
        stored = coordinator.store.conn.execute(
            "SELECT COUNT(*), COUNT(DISTINCT seq), MIN(seq), MAX(seq) FROM events WHERE device_id = 'device'"
        ).fetchone()
        assert stored == (300, 300, 1, 300)
    finally:
        loop.stop()
        client.close()
        coordinator.stop()
