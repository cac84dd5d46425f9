"""`fedsync simulate`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from fedsync.cli._common import CommandError, _writable_file


def _simulate(args: argparse.Namespace) -> int:
    from fedsync.sim.config import SimulationConfig, SimulationConfigError

    report_path = _writable_file(args.report) if args.report else None
    config = SimulationConfig(
        devices=args.devices,
        rounds=args.rounds,
        seed=args.seed,
        data_dir=Path(args.data_dir),
        partition=args.partition,
        alpha=args.alpha,
        overlap=args.overlap,
        online_probability=args.online_prob,
        aggregation=args.aggregation,
        buffer_size=args.buffer_size,
        server_lr=args.server_lr,
        cohort_fraction=args.cohort_fraction,
        round_timeout=args.round_timeout,
        codec=args.codec,
        local_epochs=args.local_epochs,
        local_training=args.local_training,
        learning_rate=args.lr if args.lr is not None else (0.5 if args.local_training == "head" else 0.1),
        dropout_prob=args.dropout_prob,
        speed_min=args.speed_min,
        speed_max=args.speed_max,
        backend=args.backend,
        workers=args.workers,
        ray_address=args.ray_address,
        address=args.listen,
        advertise_host=args.advertise_host,
    )
    try:
        config.validate()
    except SimulationConfigError as exc:
        raise CommandError(str(exc)) from None
    from rich.console import Console

    from fedsync.sim.console import compare_variants, run_with_console

    configs = {"fedsync": config}
    if args.compare:
        configs = compare_variants(config, [item.strip() for item in args.compare.split(",") if item.strip()])
        for variant in configs.values():
            try:
                variant.validate()
            except SimulationConfigError as exc:
                raise CommandError(f"--compare: {exc}") from None
    plot_path = _writable_file(args.plot) if args.plot else None
    if plot_path is None and args.compare:
        plot_path = Path(args.data_dir) / "compare.png"
    from fedsync._quiet import import_tensorflow_quietly

    import_tensorflow_quietly()  # the coordinator publishes with it
    console = Console(soft_wrap=True)
    reports = run_with_console(configs, console)
    if report_path is not None:
        report_path.parent.mkdir(parents=True, exist_ok=True)
        if args.compare:
            payload = "{" + ",".join(f"{json.dumps(n)}: {r.to_json()}" for n, r in reports.items()) + "}"
            report_path.write_text(json.dumps(json.loads(payload), indent=1))
        else:
            report_path.write_text(reports["fedsync"].to_json())
        console.print(f"report written to {report_path}")
    if plot_path is not None:
        from fedsync.sim.plots import plot_accuracy

        title = f"{config.devices} devices, {config.partition} partition, online p={config.online_probability}"
        console.print(f"plot written to {plot_accuracy(reports, plot_path, title)}")
    return 0


# -- client -----------------------------------------------------------------------------------
