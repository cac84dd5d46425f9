"""`fedsync simulate`: a fleet of virtual devices, each a real EdgeClient with its own SQLite journal,
syncing over real gRPC with a real coordinator on loopback.

Time is virtual: a round is one tick of the connectivity model. In every round each device works
locally (predicts on its inputs, fine-tunes once per model version it holds; a device's speed
scales both), online or not, and the devices that are online sync in a seeded random order; a
sync drawn to drop loses its link mid-way and resumes on the device's next online period.
Asynchronous aggregation publishes a version whenever the coordinator's buffer fills, so devices
later in the same round already download it.

Synchronous FedAvg runs in FedAvg rounds, as Flower does: a FedAvg round starts at the beginning
of a (simulation) round, samples its cohort among the devices online then (`--cohort-fraction`),
which download the current version when they sync in that round; only cohort members fine-tune,
and only on that version. The FedAvg round completes as soon as every cohort member has delivered
a delta on that version, or at the end of the round `--round-timeout` rounds after the one it
started in; then the fresh deltas are aggregated (deltas on older versions are refused as stale,
as Flower drops late results) and the next FedAvg round starts with the next simulation round. So
with every device online a FedAvg round takes two rounds (send the model, train and return it),
and a cohort member that goes offline stalls it until the member is back or the timeout passes.

This module is the driver: it runs the coordinator and orders the rounds. The devices live in a
fleet: in this process (`local`), or spread over Ray actors (`ray`, see fedsync.sim.ray_backend).
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable, Collection, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np

from fedsync.sim.config import ROUND_SECONDS, SimulationConfig, SimulationConfigError, device_address
from fedsync.sim.connectivity import fleet_schedules
from fedsync.sim.data import load_digits_split
from fedsync.sim.fedavg_rounds import FedAvgRounds, fedavg_figures

if TYPE_CHECKING:  # the devices bring gRPC and LiteRT: imported when a simulation runs
    from fedsync.sim.dropout import SyncOutcome

__all__ = [
    "ROUND_SECONDS",
    "ProgressTick",
    "RoundFigures",
    "SimulationConfig",
    "SimulationConfigError",
    "SimulationReport",
    "run_simulation",
]


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
    syncs_cut: int = 0


@dataclass
class SimulationReport:
    config: dict[str, object]
    backend: str = "local"
    device_hosts: int = 1  # processes the devices lived in: 1 locally, else the workers or Ray actors
    device_host_peak_rss_mb: list[float] = field(default_factory=list)  # processes backend: each worker's
    versions: list[dict[str, float]] = field(default_factory=list)
    rounds: list[RoundFigures] = field(default_factory=list)
    events_journaled: int = 0
    events_synced: int = 0  # acknowledged to the devices (an ack lost to a cut counts on the next sync)
    events_at_coordinator: int = 0
    deltas_synced: int = 0
    deltas_rejected: int = 0
    conflicts_resolved: int = 0
    corrections_applied: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    # Model bytes the devices of a host linked from their shared artifact cache instead of
    # downloading them again (each device would download them on its own link in the field).
    bytes_down_shared: int = 0
    sync_attempts: int = 0
    sync_dropouts: int = 0  # attempts whose link was drawn to drop (--dropout-prob)
    syncs_cut: int = 0  # those whose link dropped before the sync was done
    cut_sync_bytes: int = 0  # what crossed the link in those attempts before the cut
    final_version: int = 0
    final_accuracy: float = 0.0
    wall_s: float = 0.0
    # wall_s, sim_s (the simulated clock, ROUND_SECONDS a round), round, version, accuracy
    accuracy_over_time: list[dict[str, float]] = field(default_factory=list)
    staleness_histogram: dict[str, int] = field(default_factory=dict)
    # sync: every FedAvg round (start/end round, version trained, cohort size, members delivered in
    # time, version published or None); versions also carry their round's cohort and delivered.
    fedavg_rounds: list[dict[str, int | None]] = field(default_factory=list)
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
        # max_staleness=0: a delta on an older version is refused as stale. The buffer size never
        # triggers: the driver forces each FedAvg round's aggregation.
        return Strategy.fedavg(num_clients=config.devices)
    return Strategy.fedbuff(buffer_size=_async_buffer(config), max_staleness=config.max_staleness, lr=config.server_lr)


def _async_buffer(config: SimulationConfig) -> int:
    return config.buffer_size or max(1, config.devices // 2)


@dataclass(frozen=True)
class ProgressTick:
    round: int
    synced: int  # devices synced so far this round
    online: int
    version: int
    accuracy: float
    events_synced: int  # in the whole run so far


class Fleet(Protocol):
    """Where the devices live; the driver tells it when to work and whom to sync."""

    @property
    def hosts(self) -> int: ...

    def work(self, round_index: int, cohort: Collection[int] | None = None, cohort_version: int = 0) -> int:
        """Every device's local work; with a cohort, only its members fine-tune, on that version."""
        ...

    def sync(self, order: list[int], address: str, per_batch: int) -> Iterator[list[SyncOutcome]]:
        """Sync the devices in `order`; yields outcomes as batches of about `per_batch` devices
        complete (the driver may aggregate between batches)."""
        ...

    def close(self) -> None: ...


class LocalFleet:
    """Every device in this process, synced one at a time in the driver's order."""

    def __init__(self, config: SimulationConfig) -> None:
        from fedsync.sim.devices import DeviceGroup

        self.group = DeviceGroup(config, range(config.devices))

    @property
    def hosts(self) -> int:
        return 1

    def work(self, round_index: int, cohort: Collection[int] | None = None, cohort_version: int = 0) -> int:
        return self.group.work(round_index, cohort, cohort_version)

    def sync(self, order: list[int], address: str, per_batch: int) -> Iterator[list[SyncOutcome]]:
        for i in order:  # one device per batch: later devices see what the earlier ones published
            yield self.group.sync([i], address)

    def close(self) -> None:
        self.group.close()


def open_fleet(config: SimulationConfig) -> Fleet:
    if config.backend == "ray":
        from fedsync.sim.ray_backend import RayFleet

        return RayFleet(config)
    if config.backend == "processes":
        from fedsync.sim.process_backend import ProcessFleet

        return ProcessFleet(config)
    return LocalFleet(config)


def run_simulation(
    config: SimulationConfig,
    on_round: Callable[[RoundFigures], None] | None = None,
    on_progress: Callable[[ProgressTick], None] | None = None,
    stop_when: Callable[[RoundFigures], bool] | None = None,
) -> SimulationReport:
    """Run the simulation; `stop_when`, asked after every round, ends it early when it says so."""
    config.validate()
    from coordinator import Coordinator
    from coordinator.publisher import EvaluationData
    from coordinator.schema import Durability
    from fedsync.sim.devices import fleet_shards, ground_truth, reset_devices

    started = time.perf_counter()
    root = Path(config.data_dir)
    reset_devices(config)
    shutil.rmtree(root / "coordinator", ignore_errors=True)
    fleet = open_fleet(config)  # first: worker processes start up while the coordinator does
    try:
        _, test = load_digits_split(seed=config.seed)
        schedules = fleet_schedules(config.connectivity(), config.devices, config.seed)
        coordinator = Coordinator(
            root / "coordinator",
            strategy=_strategy(config),
            evaluation=EvaluationData(test.x, test.y),
            auto_aggregate=False,
            # A simulation need not survive a power cut: commits without fsyncs (kill -9 still safe).
            durability=Durability.PROCESS,
            # Publish only what the virtual fleet installs (float32 inference plus its training artifact).
            publish_int8=False,
            publish_trainable_head=config.local_training == "head",
            publish_trainable=config.local_training == "litert",
            publish_keras=config.local_training == "keras",
        )
        coordinator.start(config.address)
    except BaseException:
        fleet.close()
        raise
    report = SimulationReport(config={k: str(v) for k, v in asdict(config).items()}, backend=config.backend)
    rng = np.random.default_rng(config.seed)  # the sync order; devices draw from their own streams
    truth = ground_truth(fleet_shards(config))
    per_batch = config.devices if config.aggregation == "sync" else _async_buffer(config)
    fedavg = FedAvgRounds(config, coordinator) if config.aggregation == "sync" else None

    def record_version(round_number: int) -> None:
        """A newly published version, in the round (1-based; 0: before the first) that published it."""
        manifest = coordinator.aggregator.current_manifest()
        if not report.accuracy_over_time or report.accuracy_over_time[-1]["version"] != manifest.version:
            report.accuracy_over_time.append(
                {
                    "wall_s": time.perf_counter() - started,
                    # The fleet's clock: the end of the round that published the version.
                    "sim_s": round_number * ROUND_SECONDS,
                    "round": round_number,
                    "version": manifest.version,
                    "accuracy": manifest.metrics.get("accuracy", 0.0),
                }
            )

    address = device_address(config, coordinator.port)
    try:
        record_version(0)
        report.device_hosts = fleet.hosts
        for round_index in range(config.rounds):
            round_start = time.perf_counter()
            t = round_index * ROUND_SECONDS
            figures = RoundFigures(round_index + 1, 0, 0, 0.0, 0, 0, 0, 0.0)
            online = [i for i in range(config.devices) if schedules[i].is_online(t)]
            figures.online = len(online)
            if fedavg is not None:
                fedavg.start(round_index, online)
                report.events_journaled += fleet.work(round_index, *fedavg.training())
            else:
                report.events_journaled += fleet.work(round_index)
            order = [int(i) for i in rng.permutation(online)]
            done = 0
            for outcomes in fleet.sync(order, address, per_batch):
                for outcome in outcomes:
                    _add_outcome(report, figures, outcome)
                done += len(outcomes)
                if config.aggregation == "async" and coordinator.aggregate_now(force=False) is not None:
                    record_version(round_index + 1)
                if fedavg is not None and fedavg.complete() and fedavg.close(round_index):
                    record_version(round_index + 1)
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
            if fedavg is not None and fedavg.timed_out(round_index) and fedavg.close(round_index):
                record_version(round_index + 1)
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
            if stop_when is not None and stop_when(figures):
                break
        _final_figures(coordinator, truth, report)
        if fedavg is not None:
            fedavg_figures(fedavg, report)
    finally:
        fleet.close()
        report.device_host_peak_rss_mb = list(getattr(fleet, "peak_rss_mb", []))
        coordinator.stop()
    report.wall_s = time.perf_counter() - started
    return report


def _add_outcome(report: SimulationReport, figures: RoundFigures, outcome: SyncOutcome) -> None:
    figures.events_synced += outcome.events_sent
    figures.deltas_synced += outcome.deltas_sent
    figures.corrections_applied += outcome.corrections_applied
    figures.syncs_cut += outcome.cut
    report.sync_attempts += 1
    report.sync_dropouts += outcome.dropout
    report.syncs_cut += outcome.cut
    report.cut_sync_bytes += outcome.cut_bytes
    report.deltas_rejected += outcome.deltas_rejected
    report.bytes_up += outcome.bytes_up
    report.bytes_down += outcome.bytes_down
    report.bytes_down_shared += outcome.bytes_shared


def _final_figures(coordinator: object, truth: dict[bytes, int], report: SimulationReport) -> None:
    store = coordinator.store  # type: ignore[attr-defined]
    report.versions = [
        {"version": v, "deltas": n, "accuracy": acc if acc is not None else float("nan")}
        for v, n, acc in store.version_history()
    ]
    report.conflicts_resolved = store.counts()["conflicts_resolved"]
    # A cut sync's last batch may still be committing on the connection these reads share.
    with store.lock:
        report.events_at_coordinator = store.conn.execute("SELECT COUNT(*) FROM events").fetchone()[0]
        report.staleness_histogram = {
            str(staleness): count
            for staleness, count in store.conn.execute(
                "SELECT staleness, COUNT(*) FROM deltas WHERE status = 'aggregated' GROUP BY staleness ORDER BY 1"
            )
        }
        _resolution_accuracy(coordinator, truth, report)
    report.final_version = coordinator.version  # type: ignore[attr-defined]
    report.final_accuracy = report.versions[-1]["accuracy"]
