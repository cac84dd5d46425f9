"""`fedsync simulate`: a fleet of virtual devices, each a real EdgeClient with its own SQLite journal,
syncing over real gRPC with a real coordinator on loopback.

Time is virtual: a round is one tick of the connectivity model. In every round each device works
locally (predicts on its inputs, fine-tunes once per model version it holds), online or not, and
the devices that are online sync in a seeded random order. Asynchronous aggregation publishes a
version whenever the coordinator's buffer fills, so devices later in the same round already
download it; synchronous FedAvg publishes once per round from that round's deltas.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from fedsync.sim.connectivity import ConnectivityModel, fleet_schedules
from fedsync.sim.data import SCHEMES, load_digits_split, partition

ROUND_SECONDS = 60.0


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
    max_staleness: int = 8
    codec: str = "float32"
    local_epochs: int = 5
    batch_size: int = 16
    learning_rate: float = 0.1
    predictions_per_round: int = 8
    local_training: str = "keras"  # keras (TensorFlow), litert (whole model, no TF) or head (LiteRT head only)
    address: str = "127.0.0.1:0"

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
        if self.aggregation not in ("async", "sync"):
            raise SimulationConfigError(f"--aggregation must be 'async' or 'sync', got {self.aggregation!r}")
        if self.buffer_size is not None and self.buffer_size < 1:
            raise SimulationConfigError(f"--buffer-size must be at least 1, got {self.buffer_size}")
        if self.local_training not in ("keras", "litert", "head"):
            raise SimulationConfigError(f"--local-training must be keras, litert or head, got {self.local_training!r}")
        if self.local_epochs < 1 or self.batch_size < 1 or not self.learning_rate > 0:
            raise SimulationConfigError("--local-epochs, --batch-size and --lr must be positive")
        from fedsync.codecs import CodecError, get_codec

        try:
            get_codec(self.codec)
        except CodecError as exc:
            raise SimulationConfigError(f"--codec: {exc}") from None


@dataclass
class RoundFigures:
    round: int
    online: int
    version: int
    accuracy: float
    events_synced: int
    deltas_synced: int
    corrections_applied: int
    wall_s: float


@dataclass
class SimulationReport:
    config: dict[str, object]
    versions: list[dict[str, float]] = field(default_factory=list)
    rounds: list[RoundFigures] = field(default_factory=list)
    events_journaled: int = 0
    events_synced: int = 0
    deltas_synced: int = 0
    deltas_rejected: int = 0
    conflicts_resolved: int = 0
    corrections_applied: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    final_version: int = 0
    final_accuracy: float = 0.0
    wall_s: float = 0.0
    accuracy_over_time: list[dict[str, float]] = field(default_factory=list)  # wall_s, version, accuracy
    staleness_histogram: dict[str, int] = field(default_factory=dict)
    resolved_label_accuracy: float | None = None  # on disputed inputs: the coordinator's resolved label
    single_device_accuracy: float | None = None  # on the same inputs: each device's own prediction

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, default=str)


def _resolution_accuracy(coordinator: object, truth: dict[bytes, int], report: SimulationReport) -> None:
    """How often the resolved label of a disputed input is right, against single devices' predictions."""
    conn = coordinator.store.conn  # type: ignore[attr-defined]
    resolved = conn.execute("SELECT input_hash, label FROM resolutions").fetchall()
    scored = [(truth[bytes(h)], label) for h, label in resolved if bytes(h) in truth]
    if not scored:
        return
    report.resolved_label_accuracy = sum(t == label for t, label in scored) / len(scored)
    disputed = {bytes(h) for h, _ in resolved}
    singles = [
        (truth[bytes(h)], label)
        for h, label in conn.execute("SELECT input_hash, label FROM events")
        if bytes(h) in disputed and bytes(h) in truth
    ]
    report.single_device_accuracy = sum(t == label for t, label in singles) / len(singles)


def _strategy(config: SimulationConfig):
    from fedsync.aggregation import Strategy

    if config.aggregation == "sync":
        # Every delta of a round is aggregated at the round's end, whatever its base version.
        strategy = Strategy.fedavg(num_clients=config.devices)
        return Strategy(
            rule=strategy.rule,
            staleness=strategy.staleness,
            max_staleness=None,
            optimizer=strategy.optimizer,
            buffer_size=config.devices * 2,
        )
    buffer = config.buffer_size or max(1, config.devices // 2)
    return Strategy.fedbuff(buffer_size=buffer, max_staleness=config.max_staleness)


@dataclass(frozen=True)
class ProgressTick:
    round: int
    synced: int  # devices synced so far this round
    online: int
    version: int
    accuracy: float
    events_synced: int  # in the whole run so far


def run_simulation(
    config: SimulationConfig,
    on_round: Callable[[RoundFigures], None] | None = None,
    on_progress: Callable[[ProgressTick], None] | None = None,
) -> SimulationReport:
    config.validate()
    from client import Durability, EdgeClient
    from coordinator import Coordinator
    from coordinator.publisher import EvaluationData

    started = time.perf_counter()
    root = Path(config.data_dir)
    shutil.rmtree(root / "devices", ignore_errors=True)
    shutil.rmtree(root / "coordinator", ignore_errors=True)
    train, test = load_digits_split(seed=config.seed)
    shards = partition(
        train, config.devices, config.partition, seed=config.seed, alpha=config.alpha, overlap=config.overlap
    )
    schedules = fleet_schedules(
        ConnectivityModel.from_online_probability(config.online_probability, mean_cycle_s=4 * ROUND_SECONDS),
        config.devices,
        config.seed,
    )
    coordinator = Coordinator(
        root / "coordinator",
        strategy=_strategy(config),
        evaluation=EvaluationData(test.x, test.y),
        auto_aggregate=False,
    )
    coordinator.start(config.address)
    report = SimulationReport(config={k: str(v) for k, v in asdict(config).items()})
    rng = np.random.default_rng(config.seed)
    clients = [
        EdgeClient(
            root / "devices" / f"device-{i:05d}",
            f"device-{i:05d}",
            durability=Durability.PROCESS,
            fine_tuning=config.local_training,
        )
        for i in range(config.devices)
    ]
    trained_on: dict[int, int] = {}
    truth = {
        hashlib.sha256(x.tobytes()).digest(): int(y) for shard in shards for x, y in zip(shard.x, shard.y, strict=True)
    }

    def record_version() -> None:
        manifest = coordinator.aggregator.current_manifest()
        if not report.accuracy_over_time or report.accuracy_over_time[-1]["version"] != manifest.version:
            report.accuracy_over_time.append(
                {
                    "wall_s": time.perf_counter() - started,
                    "version": manifest.version,
                    "accuracy": manifest.metrics.get("accuracy", 0.0),
                }
            )

    record_version()
    try:
        for round_index in range(config.rounds):
            round_start = time.perf_counter()
            t = round_index * ROUND_SECONDS
            figures = RoundFigures(round_index + 1, 0, 0, 0.0, 0, 0, 0, 0.0)
            for i, client in enumerate(clients):
                if client.model_version == 0:
                    continue
                shard = shards[i]
                picks = rng.choice(len(shard.x), size=min(config.predictions_per_round, len(shard.x)), replace=False)
                for row in picks:
                    client.predict(shard.x[row])
                    report.events_journaled += 1
                if trained_on.get(i) != client.model_version:
                    client.fine_tune(
                        shard.x,
                        shard.y,
                        epochs=config.local_epochs,
                        batch_size=config.batch_size,
                        learning_rate=config.learning_rate,
                        codec=config.codec,
                        seed=config.seed + round_index * config.devices + i,
                    )
                    trained_on[i] = client.model_version
            online = [i for i in range(config.devices) if schedules[i].is_online(t)]
            figures.online = len(online)
            for done, i in enumerate(rng.permutation(online), start=1):
                sync = clients[int(i)].sync(coordinator.address, timeout_s=60.0)
                figures.events_synced += sync.events_sent
                figures.deltas_synced += sync.deltas_sent
                figures.corrections_applied += sync.corrections_applied
                report.deltas_rejected += sync.deltas_rejected
                report.bytes_up += sync.bytes_up
                report.bytes_down += sync.bytes_down
                if config.aggregation == "async" and coordinator.aggregate_now(force=False) is not None:
                    record_version()
                if on_progress is not None:
                    latest = report.accuracy_over_time[-1]
                    on_progress(
                        ProgressTick(
                            round_index + 1,
                            done,
                            len(online),
                            int(latest["version"]),
                            latest["accuracy"],
                            report.events_synced + figures.events_synced,
                        )
                    )
            if config.aggregation == "sync" and coordinator.aggregate_now(force=True) is not None:
                record_version()
            manifest = coordinator.aggregator.current_manifest()
            figures.version = manifest.version
            figures.accuracy = manifest.metrics.get("accuracy", 0.0)
            figures.wall_s = time.perf_counter() - round_start
            report.rounds.append(figures)
            report.events_synced += figures.events_synced
            report.deltas_synced += figures.deltas_synced
            report.corrections_applied += figures.corrections_applied
            if on_round is not None:
                on_round(figures)
        report.versions = [
            {"version": v, "deltas": n, "accuracy": acc if acc is not None else float("nan")}
            for v, n, acc in coordinator.store.version_history()
        ]
        counts = coordinator.store.counts()
        report.conflicts_resolved = counts["conflicts_resolved"]
        report.staleness_histogram = {
            str(staleness): count
            for staleness, count in coordinator.store.conn.execute(
                "SELECT staleness, COUNT(*) FROM deltas WHERE status = 'aggregated' GROUP BY staleness ORDER BY 1"
            )
        }
        _resolution_accuracy(coordinator, truth, report)
        report.final_version = coordinator.version
        report.final_accuracy = report.versions[-1]["accuracy"]
    finally:
        for client in clients:
            client.close()
        coordinator.stop()
    report.wall_s = time.perf_counter() - started
    return report
