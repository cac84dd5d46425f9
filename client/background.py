"""A background thread that syncs whenever the coordinator is reachable.

Work never waits for it: predict and fine_tune journal locally and return; this loop drains the
journal when it can. Failures back off exponentially with jitter (tenacity's wait strategy) up to a
cap, and `wake()` asks for a sync now (say, when the app sees the network come back).
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING

import grpc
from tenacity import RetryCallState, wait_exponential_jitter

from client.sync import SyncReport, sync_once

if TYPE_CHECKING:
    from client.edge import EdgeClient

log = logging.getLogger(__name__)


class BackgroundSync:
    def __init__(
        self,
        client: EdgeClient,
        address: str,
        *,
        interval_s: float = 30.0,
        timeout_s: float = 30.0,
        max_backoff_s: float = 300.0,
    ) -> None:
        self.client = client
        self.address = address
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self.backoff = wait_exponential_jitter(initial=1.0, max=max_backoff_s)
        self.failures = 0
        self.last_report: SyncReport | None = None
        self.last_error: str | None = None
        self.syncs = 0
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"fedsync-sync-{client.device_id}", daemon=True)

    def start(self) -> BackgroundSync:
        self._thread.start()
        return self

    def wake(self) -> None:
        self._wake.set()

    def stop(self, timeout_s: float = 30.0) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout_s)

    def __enter__(self) -> BackgroundSync:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _next_wait(self) -> float:
        if self.failures == 0:
            return self.interval_s
        state = RetryCallState(retry_object=None, fn=None, args=(), kwargs={})  # type: ignore[arg-type]
        state.attempt_number = self.failures
        return float(self.backoff(state))

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.last_report = sync_once(self.client, self.address, timeout_s=self.timeout_s)
                self.failures, self.last_error = 0, None
                self.syncs += 1
            except grpc.RpcError as exc:
                self.failures += 1
                self.last_error = f"{exc.code().name}: {exc.details()}"  # type: ignore[attr-defined]
            except Exception as exc:  # keep the loop alive; the journal keeps everything
                self.failures += 1
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.exception("background sync failed")
            self._wake.wait(self._next_wait())
            self._wake.clear()
