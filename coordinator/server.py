"""A running coordinator: store, aggregator, gRPC server, and the background aggregation loop."""

from __future__ import annotations

import logging
import threading
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from coordinator.aggregator import Aggregator, PublishedVersion
from coordinator.auth import CredentialInterceptor, CredentialStore
from coordinator.metrics import PrometheusMetrics
from coordinator.publisher import EvaluationData, ModelPublisher
from coordinator.service import SyncService
from coordinator.store import CoordinatorStore, Durability
from fedsync.aggregation import Strategy
from fedsync.conflicts import ConflictPolicy
from fedsync.model import LABELS
from fedsync.v1.sync_pb2_grpc import add_SyncServicer_to_server
from fedsync.wire import channel_options

log = logging.getLogger(__name__)
SYNC_SERVICE = "fedsync.v1.Sync"


@dataclass(frozen=True)
class ServerTLS:
    """PEM files for TLS (see `fedsync certs`); with client_ca, clients must present a certificate
    signed by it (mutual TLS)."""

    cert: Path
    key: Path
    client_ca: Path | None = None

    def server_credentials(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials(
            [(self.key.read_bytes(), self.cert.read_bytes())],
            root_certificates=self.client_ca.read_bytes() if self.client_ca else None,
            require_client_auth=self.client_ca is not None,
        )


class AddressInUseError(OSError):
    """The coordinator could not bind its address."""


def default_evaluation(seed: int = 0) -> EvaluationData:
    from fedsync.sim.data import load_digits_split

    _, test = load_digits_split(seed=seed)
    return EvaluationData(test.x, test.y)


class Coordinator:
    """Owns a data folder: `coordinator.db` (SQLite) and `models/vN/` (published versions).

    durability: what an acknowledged event or delta survives, a power cut (POWER, the default)
    or only a crash of this process (PROCESS: no fsync before acknowledging; see Durability).
    """

    def __init__(
        self,
        data_dir: Path | str,
        *,
        strategy: Strategy | None = None,
        policy: ConflictPolicy | None = None,
        evaluation: EvaluationData | None = None,
        hidden_units: int = 32,
        publish_int8: bool = True,
        publish_trainable_head: bool = True,
        publish_trainable: bool | None = None,
        publish_keras: bool = True,
        auto_aggregate: bool = True,
        max_workers: int = 16,
        metrics: bool = False,
        keep_versions: int = 5,
        require_credentials: bool = False,
        tls: ServerTLS | None = None,
        max_delta_norm: float | None = None,
        durability: Durability = Durability.POWER,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.strategy = strategy or Strategy.fedbuff(buffer_size=10)
        self.durability = durability
        self.store = CoordinatorStore(
            self.data_dir / "coordinator.db", num_labels=len(LABELS), policy=policy, durability=durability
        )
        self.publisher = ModelPublisher(
            self.data_dir / "models",
            evaluation or default_evaluation(),
            hidden_units=hidden_units,
            int8=publish_int8,
            trainable_head=publish_trainable_head,
            # The whole-model trainable .tflite follows the head one unless asked for explicitly.
            trainable=publish_trainable_head if publish_trainable is None else publish_trainable,
            durable=durability is Durability.POWER,
            keras=publish_keras,
        )
        self.metrics: PrometheusMetrics | None = None
        if metrics:
            self.metrics = PrometheusMetrics(
                buffer_fill=lambda: self.store.buffered_count()[0], connected_devices=self.store.devices_seen_since
            )
        self.aggregator = Aggregator(
            self.store, self.publisher, self.strategy, self.metrics, keep_versions=keep_versions
        )
        self.auto_aggregate = auto_aggregate
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._loop: threading.Thread | None = None
        self.service = SyncService(
            self.store,
            self.aggregator,
            self.data_dir / "models",
            on_delta=self._wake.set,
            metrics=self.metrics,
            max_delta_norm=max_delta_norm,
        )
        self.credentials = CredentialStore(self.store.conn, self.store.lock)
        self.tls = tls
        interceptors = [CredentialInterceptor(self.credentials)] if require_credentials else []
        self.server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=max_workers), options=channel_options(), interceptors=interceptors
        )
        add_SyncServicer_to_server(self.service, self.server)
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        for service in ("", SYNC_SERVICE):
            self.health.set(service, health_pb2.HealthCheckResponse.SERVING)
        reflection.enable_server_reflection((SYNC_SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME), self.server)
        self.port = 0

    def enroll(self, device_id: str) -> str:
        """Issue a credential for a device; only its sha256 is stored. Returns the token to give it."""
        return self.credentials.enroll(device_id)

    @property
    def version(self) -> int:
        return self.aggregator.version

    def start(self, address: str = "127.0.0.1:0") -> int:
        try:
            if self.tls is None:
                self.port = self.server.add_insecure_port(address)
            else:
                self.port = self.server.add_secure_port(address, self.tls.server_credentials())
        except RuntimeError as exc:
            raise AddressInUseError(f"cannot listen on {address}: {exc}") from None
        if self.port == 0:
            raise AddressInUseError(f"cannot listen on {address}: address in use or invalid")
        self.server.start()
        if self.auto_aggregate:
            self._loop = threading.Thread(target=self._aggregation_loop, name="fedsync-aggregator", daemon=True)
            self._loop.start()
        return self.port

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def aggregate_now(self, force: bool = True) -> PublishedVersion | None:
        return self.aggregator.maybe_aggregate(force=force)

    def _aggregation_loop(self) -> None:
        while not self._stopping.is_set():
            self._wake.wait(timeout=1.0)
            self._wake.clear()
            if self._stopping.is_set():
                return
            try:
                self.aggregator.maybe_aggregate()
            except Exception:  # keep serving; the buffer stays for the next attempt
                log.exception("aggregation failed")

    def wait(self) -> None:
        self.server.wait_for_termination()

    def serve_metrics(self, port: int = 0, address: str = "127.0.0.1") -> int:
        """Expose Prometheus metrics at http://address:port/metrics (needs metrics=True)."""
        if self.metrics is None:
            raise RuntimeError("this coordinator was created without metrics=True")
        return self.metrics.serve(port, address)

    def stop(self, grace_s: float = 1.0) -> None:
        self.health.enter_graceful_shutdown()
        if self.metrics is not None:
            self.metrics.stop()
        self._stopping.set()
        self._wake.set()
        # Bounded: grpcio can leave a stream that received an undecodable message un-terminated,
        # and then the shutdown event is never set.
        if not self.server.stop(grace_s).wait(timeout=grace_s + 2):
            log.warning("gRPC server did not finish stopping within %.1f s", grace_s + 2)
        if self._loop is not None:
            self._loop.join(timeout=30)
        self.store.close()
