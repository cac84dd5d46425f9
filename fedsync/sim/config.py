"""What a simulation runs: its parameters, checked before any work starts."""

from __future__ import annotations

import math
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from fedsync.sim.connectivity import ConnectivityModel
from fedsync.sim.data import SCHEMES

ROUND_SECONDS = 60.0
BACKENDS = ("local", "processes", "ray")


class SimulationConfigError(ValueError):
    """Impossible simulation parameters, reported before any work starts."""


@dataclass(frozen=True)
class SimulationConfig:
    devices: int = 20
    rounds: int = 8
    seed: int = 0
    data_dir: Path = Path(".fedsync/sim")
    partition: str = "dirichlet"
    alpha: float = 1.0
    overlap: float = 0.3
    online_probability: float = 0.8
    aggregation: str = "async"  # async | sync
    buffer_size: int | None = None  # async: deltas per version (default: half the fleet)
    server_lr: float = 1.0  # async: the coordinator's step along each buffer's mean delta (FedBuff's eta_g)
    # sync: each round's cohort is this fraction of the devices online when it starts (Flower's
    # fraction_fit), and a round waits at most round_timeout rounds after the one that sends the model.
    cohort_fraction: float = 1.0
    round_timeout: int = 4
    max_staleness: int = 8
    codec: str = "float32"
    local_epochs: int = 5
    batch_size: int = 16
    learning_rate: float = 0.1
    predictions_per_round: int = 8
    local_training: str = "keras"  # keras (TensorFlow), litert (whole model, no TF) or head (LiteRT head only)
    address: str = "127.0.0.1:0"  # where the coordinator listens
    advertise_host: str | None = None  # the host devices dial (see device_address)
    dropout_prob: float = 0.0  # probability that a sync attempt loses its link mid-way
    # A device's speed factor (drawn uniformly in [speed_min, speed_max]) scales its predictions and
    # local epochs per round; 1.0 and 1.0 give every device the nominal workload.
    speed_min: float = 1.0
    speed_max: float = 1.0
    backend: str = "local"  # local (this process), processes (worker processes here) or ray (Ray actors)
    workers: int = 0  # processes: how many worker processes host the devices (0: one per CPU)
    ray_address: str | None = None  # an existing Ray cluster; None starts a local one

    def validate(self) -> None:
        if self.devices < 1:
            raise SimulationConfigError(f"--devices must be at least 1, got {self.devices}")
        if self.rounds < 1:
            raise SimulationConfigError(f"--rounds must be at least 1, got {self.rounds}")
        if self.partition not in SCHEMES:
            raise SimulationConfigError(f"--partition must be one of {', '.join(SCHEMES)}, got {self.partition!r}")
        if not self.alpha > 0:
            raise SimulationConfigError(f"--alpha must be > 0, got {self.alpha}")
        if not 0.0 <= self.overlap <= 1.0:
            raise SimulationConfigError(f"--overlap must be in [0, 1], got {self.overlap}")
        if not 0.0 <= self.online_probability <= 1.0:
            raise SimulationConfigError(f"--online-prob must be in [0, 1], got {self.online_probability}")
        if not 0.0 <= self.dropout_prob <= 1.0:
            raise SimulationConfigError(f"--dropout-prob must be in [0, 1], got {self.dropout_prob}")
        if not (math.isfinite(self.speed_min) and math.isfinite(self.speed_max) and self.speed_min > 0):
            raise SimulationConfigError(
                f"--speed-min and --speed-max must be finite and > 0, got {self.speed_min} and {self.speed_max}"
            )
        if self.speed_min > self.speed_max:
            raise SimulationConfigError(f"--speed-min {self.speed_min} is above --speed-max {self.speed_max}")
        if self.aggregation not in ("async", "sync"):
            raise SimulationConfigError(f"--aggregation must be 'async' or 'sync', got {self.aggregation!r}")
        if self.buffer_size is not None and self.buffer_size < 1:
            raise SimulationConfigError(f"--buffer-size must be at least 1, got {self.buffer_size}")
        if not (math.isfinite(self.server_lr) and self.server_lr > 0):
            raise SimulationConfigError(f"--server-lr must be a positive number, got {self.server_lr}")
        if not 0.0 < self.cohort_fraction <= 1.0:
            raise SimulationConfigError(f"--cohort-fraction must be in (0, 1], got {self.cohort_fraction}")
        if self.round_timeout < 1:
            raise SimulationConfigError(f"--round-timeout must be at least 1, got {self.round_timeout}")
        if self.local_training not in ("keras", "litert", "head"):
            raise SimulationConfigError(f"--local-training must be keras, litert or head, got {self.local_training!r}")
        if self.local_epochs < 1 or self.batch_size < 1 or not self.learning_rate > 0:
            raise SimulationConfigError("--local-epochs, --batch-size and --lr must be positive")
        if self.predictions_per_round < 0:
            raise SimulationConfigError(f"--predictions-per-round must be >= 0, got {self.predictions_per_round}")
        if self.backend not in BACKENDS:
            raise SimulationConfigError(f"--backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        host, _, port = self.address.rpartition(":")
        if not host or not port.isdigit() or int(port) > 65535:
            raise SimulationConfigError(f"--listen must be host:port, got {self.address!r}")
        if int(port):
            _check_free(host, int(port))
        if self.workers < 0:
            raise SimulationConfigError(f"--workers must be >= 0 (0: one per CPU), got {self.workers}")
        if self.backend == "ray":
            try:
                import ray  # noqa: F401
            except ImportError:
                raise SimulationConfigError("--backend ray needs Ray: pip install 'fedsync[ray]'") from None
        from fedsync.codecs import CodecError, get_codec

        try:
            get_codec(self.codec)
        except CodecError as exc:
            raise SimulationConfigError(f"--codec: {exc}") from None

    def connectivity(self) -> ConnectivityModel:
        return ConnectivityModel.from_online_probability(
            self.online_probability,
            mean_cycle_s=4 * ROUND_SECONDS,
            dropout_prob=self.dropout_prob,
            speed_min=self.speed_min,
            speed_max=self.speed_max,
        )


def scaled_workload(nominal: int, speed: float) -> int:
    """A device's share of a nominal per-round workload: proportional to its speed, at least 1
    unless the nominal workload is 0."""
    return max(1, round(nominal * speed)) if nominal > 0 else 0


LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "[::1]"})


def device_address(config: SimulationConfig, port: int, node_ip: Callable[[], str] | None = None) -> str:
    """The address the devices dial: `advertise_host`, else loopback when the coordinator listens
    there, else this machine's address as the cluster sees it (`node_ip`, Ray's by default), so
    that Ray actors on other nodes reach a coordinator listening on 0.0.0.0."""
    host = config.address.rpartition(":")[0]
    if config.advertise_host:
        return f"{config.advertise_host}:{port}"
    if host in LOOPBACK_HOSTS:
        return f"127.0.0.1:{port}"
    if node_ip is None:
        if config.backend != "ray":
            return f"127.0.0.1:{port}"  # every device is on this machine
        import ray

        node_ip = ray.util.get_node_ip_address
    return f"{node_ip()}:{port}"


def _check_free(host: str, port: int) -> None:
    """A plain bind (gRPC's own sets SO_REUSEPORT, which would not notice every listener)."""
    try:
        infos = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise SimulationConfigError(f"--listen {host}:{port}: {exc.strerror or exc}") from None
    family, kind, proto, _, sockaddr = infos[0]
    with socket.socket(family, kind, proto) as probe:
        try:
            probe.bind(sockaddr)
        except OSError as exc:
            raise SimulationConfigError(f"--listen {host}:{port}: {exc.strerror or exc}") from None
