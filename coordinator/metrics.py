"""Prometheus metrics of a coordinator (the `metrics` extra: prometheus-client).

Each coordinator has its own registry, so several can live in one process (tests, simulations).
Without prometheus-client installed, `NullMetrics` keeps the call sites unconditional.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Protocol

CONNECTED_WINDOW_S = 300.0
STALENESS_BUCKETS = (0, 1, 2, 3, 4, 6, 8, 12, 16, 24, 32)


class CoordinatorMetrics(Protocol):
    def delta_accepted(self, staleness: int) -> None: ...
    def delta_rejected(self, reason: str) -> None: ...
    def version_published(self) -> None: ...
    def conflicts_resolved(self, count: int) -> None: ...
    def corrections_sent(self, count: int) -> None: ...


class NullMetrics:
    def delta_accepted(self, staleness: int) -> None:
        pass

    def delta_rejected(self, reason: str) -> None:
        pass

    def version_published(self) -> None:
        pass

    def conflicts_resolved(self, count: int) -> None:
        pass

    def corrections_sent(self, count: int) -> None:
        pass


class PrometheusMetrics:
    def __init__(self, buffer_fill: Callable[[], float], connected_devices: Callable[[float], float]) -> None:
        try:
            import prometheus_client as prom
        except ImportError:  # pragma: no cover - depends on the environment
            raise RuntimeError("metrics need prometheus-client: pip install 'fedsync[metrics]'") from None
        self._prom = prom
        self.registry = prom.CollectorRegistry()
        r = self.registry
        self.accepted = prom.Counter("fedsync_deltas_accepted", "Deltas accepted into the buffer", registry=r)
        self.rejected = prom.Counter("fedsync_deltas_rejected", "Deltas rejected, by reason", ["reason"], registry=r)
        self.staleness = prom.Histogram(
            "fedsync_delta_staleness",
            "Versions between a delta's base and the current version",
            buckets=STALENESS_BUCKETS,
            registry=r,
        )
        self.versions = prom.Counter("fedsync_versions_published", "Global model versions published", registry=r)
        self.conflicts = prom.Counter(
            "fedsync_conflicts_resolved", "Inputs re-resolved because devices labelled them differently", registry=r
        )
        self.corrections = prom.Counter("fedsync_corrections_sent", "Corrections sent to devices", registry=r)
        buffer = prom.Gauge("fedsync_buffer_fill", "Deltas waiting for the next aggregation", registry=r)
        buffer.set_function(buffer_fill)
        connected = prom.Gauge(
            "fedsync_connected_devices", f"Devices seen in the last {CONNECTED_WINDOW_S:.0f} s", registry=r
        )
        connected.set_function(lambda: connected_devices(time.time() - CONNECTED_WINDOW_S))
        self._server: object | None = None

    def serve(self, port: int, address: str = "127.0.0.1") -> int:
        """Expose /metrics over HTTP; returns the bound port (0 picks a free one)."""
        server, _thread = self._prom.start_http_server(port, addr=address, registry=self.registry)
        self._server = server
        return int(server.server_address[1])

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()  # type: ignore[attr-defined]
            self._server.server_close()  # type: ignore[attr-defined]
            self._server = None

    def render(self) -> str:
        return self._prom.generate_latest(self.registry).decode()

    def delta_accepted(self, staleness: int) -> None:
        self.accepted.inc()
        self.staleness.observe(staleness)

    def delta_rejected(self, reason: str) -> None:
        self.rejected.labels(reason=reason).inc()

    def version_published(self) -> None:
        self.versions.inc()

    def conflicts_resolved(self, count: int) -> None:
        self.conflicts.inc(count)

    def corrections_sent(self, count: int) -> None:
        self.corrections.inc(count)
