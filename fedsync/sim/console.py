"""What `fedsync simulate` shows: a live progress bar per configuration, round lines, a summary."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from fedsync.sim.runner import ProgressTick, RoundFigures, SimulationConfig, SimulationReport, run_simulation


def compare_variants(base: SimulationConfig, items: list[str]) -> dict[str, SimulationConfig]:
    """One configuration per item: an aggregation mode (sync, async), a local-training profile
    (keras, head) or a codec (float32, float16, int8, topk:F)."""
    variants = {}
    for item in items:
        if item in ("sync", "async"):
            change = {"aggregation": item}
        elif item in ("keras", "litert", "head"):
            change = {"local_training": item}
        else:
            change = {"codec": item}
        variants[item] = dataclasses.replace(base, data_dir=Path(base.data_dir) / item.replace(":", "-"), **change)
    return variants


def run_with_console(configs: Mapping[str, SimulationConfig], console: Console) -> dict[str, SimulationReport]:
    reports: dict[str, SimulationReport] = {}
    for name, config in configs.items():
        console.print(
            f"[bold]{name}[/]: {config.devices} devices, {config.rounds} rounds, {config.aggregation} aggregation, "
            f"{config.local_training} training, {config.codec} deltas, {config.partition} partition, "
            f"seed {config.seed}, {config.backend} backend"
            + (f", dropout p={config.dropout_prob}" if config.dropout_prob else "")
            + (f", speeds {config.speed_min}-{config.speed_max}" if config.speed_min != config.speed_max else "")
        )
        progress = Progress(
            TextColumn("[bold blue]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("round {task.fields[round]}, v{task.fields[version]}, acc {task.fields[accuracy]:.3f}, "
                       "{task.fields[online]} online, {task.fields[rate]:,.0f} events/s"),
            TimeElapsedColumn(),
            console=console,
            transient=True,
        )  # fmt: skip
        task = progress.add_task(name, total=config.rounds, round=0, version=1, accuracy=0.0, online=0, rate=0.0)

        def on_progress(tick: ProgressTick, task: int = task, progress: Progress = progress) -> None:
            elapsed = progress.tasks[task].elapsed or 1e-9
            progress.update(
                task,
                round=tick.round,
                version=tick.version,
                accuracy=tick.accuracy,
                online=tick.online,
                rate=tick.events_synced / elapsed,
            )

        def on_round(r: RoundFigures, task: int = task, progress: Progress = progress) -> None:
            progress.advance(task)
            progress.console.print(
                f"  round {r.round:>3}: {r.online:>4} online, version {r.version:>3}, accuracy {r.accuracy:.3f}, "
                f"{r.events_synced} events, {r.deltas_synced} deltas, {r.corrections_applied} corrections, "
                + (f"{r.syncs_cut} syncs cut, " if r.syncs_cut else "")
                + f"{r.wall_s:.1f} s"
            )

        with progress:
            reports[name] = run_simulation(config, on_round=on_round, on_progress=on_progress)
        print_summary(reports[name], console)
    return reports


def print_summary(report: SimulationReport, console: Console) -> None:
    versions = Table("version", "deltas", "accuracy", title="Global model versions")
    for v in report.versions:
        versions.add_row(str(v["version"]), str(v["deltas"]), f"{v['accuracy']:.3f}")
    console.print(versions)
    console.print(
        f"events journaled {report.events_journaled}, synced {report.events_synced}; "
        f"deltas synced {report.deltas_synced} (rejected {report.deltas_rejected}); "
        f"conflicts resolved {report.conflicts_resolved}; corrections applied {report.corrections_applied}; "
        f"{report.bytes_up / 2**20:.1f} MiB up, {report.bytes_down / 2**20:.1f} MiB down"
    )
    if report.syncs_cut:
        console.print(
            f"dropouts: {report.syncs_cut} of {report.sync_attempts} syncs cut mid-way "
            f"({report.sync_dropouts} links dropped, the others after their sync was done; "
            f"{report.cut_sync_bytes / 2**10:.0f} KiB crossed before the cuts); "
            f"{report.events_at_coordinator} events at the coordinator"
        )
    if report.fedavg_rounds:
        timed_out = sum(r["delivered"] < r["cohort"] for r in report.fedavg_rounds if r["end_round"] is not None)  # type: ignore[operator]
        console.print(
            f"FedAvg rounds: {len(report.fedavg_rounds)}, {timed_out} ended by the timeout without their whole cohort"
        )
    if report.resolved_label_accuracy is not None:
        console.print(
            f"disputed inputs: resolved labels {report.resolved_label_accuracy:.3f} correct, "
            f"single-device predictions {report.single_device_accuracy:.3f}"
        )
    console.print(
        f"[bold]final version {report.final_version}: accuracy {report.final_accuracy:.3f}[/] "
        f"on the digits test split, in {report.wall_s:.1f} s"
    )
