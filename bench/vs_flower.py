"""fedsync against Flower 1.41 (Ray simulation) on the same task, then sync vs async under intermittency.

One run, ends with ONE JSON line.

Part 1, for each fleet size in ``--devices`` (default 100 and 1,000): the same model (the Keras MLP
64-32-10 of fedsync.model, same initial weights), the same data partition
(fedsync.sim.data.partition: scheme, alpha, overlap, seed), the same number of devices, local
epochs, batch size and SGD learning rate, every device online, in

  * fedsync: ``run_simulation`` (real EdgeClients with SQLite journals syncing over loopback gRPC
    with a real coordinator that publishes every version), aggregation ``--fedsync-aggregation``
    (default async: FedBuff, a version per half fleet of deltas, server learning rate
    ``--fedsync-server-lr`` 0.7: with every device online, versions alternate between buffers of
    fresh deltas and of deltas one version stale, and a full step along the latter makes accuracy
    near convergence swing by a few points; 0.7 damps that, at the cost of a round or two to the
    target. Part 2 keeps the simulator's default, 1.0: under intermittency the faster start matters
    more, and 0.7 there takes about 1.2x as many rounds to 0.90), local training
    ``--fedsync-training`` (default: ``litert``, the whole MLP trained in LiteRT, if this checkout's
    SimulationConfig accepts it, else ``keras``); ``--predictions-per-round`` defaults to 0
    because Flower's devices don't predict; ``--fedsync-backend`` (default ``processes``: the devices
    in one worker process per CPU, the coordinator in the driver, as Flower's Ray simulation runs one
    client per CPU); the simulation's files (device journals and model stores, the coordinator's
    store) in ``--scratch`` (default /dev/shm, a tmpfs, where it exists: Flower's simulation keeps its
    state in memory);
  * Flower 1.41: bench/flower_side.py in its own virtual environment (bench/.flower-venv, created
    and filled on first use: flwr[simulation]==1.41.0, tensorflow-cpu 2.21, scikit-learn), the
    library's FedAvg with every node training every round, ServerApp-side evaluation on the same
    test split after every round, one CPU per client on Ray.

Figures per side: device updates per second (updates aggregated into published models / wall time
of the run, from its start after imports to the end of the round where it stopped), the same rate
after the first round (``steady_updates_per_s``: leaves out start-up, which is Ray workers
importing TensorFlow on Flower's side and the first model download on fedsync's), wall time until
test accuracy first reached ``--target`` (0.90), final accuracy and peak RSS (fedsync: one process
holds the coordinator and the whole fleet). A run stops ``--extra-rounds`` rounds after reaching
the target, or after ``--max-minutes``, or after ``--max-rounds``.

Part 2: fedsync with ``--intermittent-devices`` (100) devices online with probability
``--online-prob`` (0.5) at any moment, synchronous FedAvg against asynchronous aggregation on the
same fleet and seed (synchronous FedAvg in rounds, as Flower runs them: a cohort of
``--cohort-fraction`` of the devices online when a round starts, waited for until every member
returns an update on the round's version or ``--round-timeout`` rounds pass): time to the target
for each, for every seed in ``--intermittency-seeds`` (default 0,1,2), on the local backend (one
process, so each seed's run is exactly reproducible). ``async_vs_sync_time_to_0.90`` is the median
over seeds of the synchronous time over the asynchronous one (above 1: asynchronous is sooner) on
the fleet's clock: the simulated time of the connectivity model (a round is ROUND_SECONDS), which
is the time a deployed fleet would take. ``async_vs_sync_wall_time_to_0.90`` is the same ratio on
the simulation's wall clock, reported beside it: it measures the simulator's work rather than the
fleet's time (an asynchronous round trains and syncs every online device, a synchronous one only
its cohort, and the simulator spends no wall time on the hours a round waits for devices to come
back). When a side never reaches the target within its budget, its whole run stands in for its
time and ``..._reached`` says so.

Each fedsync configuration runs in a child process (this script with ``--child``), so that its
peak RSS (VmHWM) is its own.

Run:  .venv/bin/python bench/vs_flower.py [--devices 100,1000] [--max-minutes 4] [--skip-flower]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fedsync.sim.config import ROUND_SECONDS  # noqa: E402  (light: no TensorFlow, no gRPC)

FLOWER_VENV = REPO / "bench" / ".flower-venv"
FLOWER_REQUIREMENTS = ("flwr[simulation]==1.41.0", "tensorflow-cpu==2.21.*", "scikit-learn")
FLOWER_STAMP = FLOWER_VENV / ".fedsync-bench-installed"
TARGET_KEY = "async_vs_sync_time_to_0.90"


# -- fedsync side ---------------------------------------------------------------------------------


def peak_rss_mb() -> float:
    """This process's own high-water mark (VmHWM), which unlike ru_maxrss does not survive exec."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def choose_fedsync_training(requested: str) -> str:
    """``auto``: the whole-model LiteRT trainer if this checkout has it, else Keras."""
    from fedsync.sim.runner import SimulationConfig, SimulationConfigError

    if requested != "auto":
        return requested
    try:
        SimulationConfig(local_training="litert").validate()
        return "litert"
    except SimulationConfigError:
        return "keras"


def time_to_target(timeline: list[dict], target: float) -> float | None:
    """Wall time of the first published version whose test accuracy reached ``target``."""
    for point in timeline:
        if point["accuracy"] >= target:
            return point["wall_s"]
    return None


def run_fedsync(spec: dict) -> dict:
    """One fedsync simulation in this process, stopped early like the Flower side; returns its figures.

    ``spec`` keys: devices, aggregation, online_probability, local_training, local_epochs,
    batch_size, lr, partition, alpha, overlap, seed, predictions_per_round, target, extra_rounds,
    max_minutes, max_rounds, data_dir, backend (local or processes, default local).

    Published versions are recorded by wrapping ``Coordinator.aggregate_now`` (the runner's only
    aggregation call): wall time, version, test accuracy and number of deltas aggregated.
    ``stop_when`` ends the run early (target reached, or out of budget)."""
    from fedsync._quiet import quiet_tensorflow_logs

    quiet_tensorflow_logs()
    import client  # noqa: F401  (imports stay outside the timed run, as on the Flower side)
    import coordinator
    import coordinator.server  # `coordinator` imports it, and TensorFlow, only on first use
    from fedsync.sim.runner import RoundFigures, SimulationConfig, run_simulation

    config = SimulationConfig(
        devices=int(spec["devices"]),
        rounds=int(spec["max_rounds"]),
        seed=int(spec["seed"]),
        data_dir=Path(spec["data_dir"]),
        partition=str(spec["partition"]),
        alpha=float(spec["alpha"]),
        overlap=float(spec["overlap"]),
        online_probability=float(spec["online_probability"]),
        aggregation=str(spec["aggregation"]),
        local_epochs=int(spec["local_epochs"]),
        batch_size=int(spec["batch_size"]),
        learning_rate=float(spec["lr"]),
        predictions_per_round=int(spec["predictions_per_round"]),
        local_training=str(spec["local_training"]),
        cohort_fraction=float(spec.get("cohort_fraction", 1.0)),
        round_timeout=int(spec.get("round_timeout", 4)),
        backend=str(spec.get("backend", "local")),
        workers=int(spec.get("workers", 0)),
        server_lr=float(spec.get("server_lr", 1.0)),
    )
    target = float(spec["target"])
    budget_s = float(spec["max_minutes"]) * 60
    timeline: list[dict] = []
    rounds: list[dict] = []
    state: dict = {"hit_round": None, "stopped_by": "rounds"}

    original = coordinator.Coordinator.aggregate_now

    def recording_aggregate_now(self, force: bool = True):
        published = original(self, force=force)
        if published is not None:
            timeline.append(
                {
                    "wall_s": time.perf_counter() - started,
                    "version": published.version,
                    "accuracy": published.accuracy,
                    "deltas": published.num_deltas,
                }
            )
        return published

    def stop_when(figures: RoundFigures) -> bool:
        now = time.perf_counter() - started
        rounds.append(
            {
                "round": figures.round,
                "wall_s": now,
                "online": figures.online,
                "deltas_synced": figures.deltas_synced,
                "version": figures.version,
                "accuracy": figures.accuracy,
            }
        )
        if state["hit_round"] is None and any(p["accuracy"] >= target for p in timeline):
            state["hit_round"] = figures.round
        if state["hit_round"] is not None and figures.round >= state["hit_round"] + int(spec["extra_rounds"]):
            state["stopped_by"] = "target"
            return True
        if now > budget_s:
            state["stopped_by"] = "time"
            return True
        return False

    coordinator.Coordinator.aggregate_now = recording_aggregate_now
    started = time.perf_counter()
    try:
        report = run_simulation(config, stop_when=stop_when)
    finally:
        coordinator.Coordinator.aggregate_now = original
    total_s = time.perf_counter() - started

    wall_s = rounds[-1]["wall_s"] if rounds else total_s
    updates = sum(p["deltas"] for p in timeline)
    first_round_s = rounds[0]["wall_s"] if rounds else 0.0
    later = sum(p["deltas"] for p in timeline if p["wall_s"] > first_round_s)
    hit = time_to_target(timeline, target)
    return {
        "framework": "fedsync",
        "devices": config.devices,
        "aggregation": config.aggregation,
        "online_probability": config.online_probability,
        "local_training": config.local_training,
        "local_epochs": config.local_epochs,
        "batch_size": config.batch_size,
        "lr": config.learning_rate,
        "partition": config.partition,
        "updates": updates,
        "versions": len(timeline),
        "rounds": len(rounds),
        "train_wall_s": wall_s,
        "total_wall_s": total_s,
        "updates_per_s": updates / wall_s if wall_s > 0 else 0.0,
        "steady_updates_per_s": later / (wall_s - first_round_s) if wall_s > first_round_s else 0.0,
        "time_to_target_s": hit,
        "rounds_to_target": state["hit_round"],
        # On the fleet's clock: the end of the round that published the first version at the target.
        "sim_time_to_target_s": state["hit_round"] * ROUND_SECONDS if state["hit_round"] else None,
        "sim_s": len(rounds) * ROUND_SECONDS,
        "final_accuracy": timeline[-1]["accuracy"] if timeline else None,
        "stopped_by": state["stopped_by"],
        "backend": config.backend,
        # The driver (coordinator and rounds) plus, with --backend processes, each device worker.
        "peak_rss_mb": peak_rss_mb() + sum(report.device_host_peak_rss_mb),
        "driver_peak_rss_mb": peak_rss_mb(),
        "worker_peak_rss_mb": report.device_host_peak_rss_mb,
        "accuracy_over_time": [{k: p[k] for k in ("wall_s", "version", "accuracy")} for p in timeline],
    }


def default_scratch() -> str | None:
    """/dev/shm (tmpfs) where it exists and is writable, else the system's temporary directory."""
    shm = Path("/dev/shm")
    return str(shm) if shm.is_dir() and os.access(shm, os.W_OK) else None


def run_fedsync_child(spec: dict, timeout_s: float, scratch: str | None = None) -> dict:
    """``run_fedsync`` in a fresh interpreter (its own peak RSS); the figures come back through a file."""
    with tempfile.TemporaryDirectory(prefix="fedsync-vs-flower-", dir=scratch) as tmp:
        spec = {**spec, "data_dir": str(Path(tmp) / "sim")}
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec), "--child-out", str(out)]
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout_s)
        if proc.returncode != 0 or not out.exists():
            raise RuntimeError(f"fedsync child failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
        return json.loads(out.read_text())


# -- Flower side ----------------------------------------------------------------------------------


def flower_python() -> Path:
    return FLOWER_VENV / "bin" / "python"


def ensure_flower_venv(log=print) -> Path:
    """Create bench/.flower-venv and install Flower into it, unless the stamp says it's done."""
    wanted = "\n".join(FLOWER_REQUIREMENTS)
    if FLOWER_STAMP.exists() and FLOWER_STAMP.read_text() == wanted and flower_python().exists():
        return flower_python()
    log(f"installing {', '.join(FLOWER_REQUIREMENTS)} into {FLOWER_VENV.relative_to(REPO)} (once)")
    if not flower_python().exists():
        subprocess.run([sys.executable, "-m", "venv", str(FLOWER_VENV)], check=True)
    pip = [str(flower_python()), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    subprocess.run([*pip, "--upgrade", "pip"], check=True)
    subprocess.run([*pip, *FLOWER_REQUIREMENTS], check=True)
    FLOWER_STAMP.write_text(wanted)
    return flower_python()


def run_flower(spec: dict, timeout_s: float) -> dict:
    """bench/flower_side.py in the Flower venv; returns the JSON line it prints."""
    cmd = [
        str(flower_python()),
        str(REPO / "bench" / "flower_side.py"),
        f"--devices={spec['devices']}",
        f"--rounds={spec['max_rounds']}",
        f"--local-epochs={spec['local_epochs']}",
        f"--batch-size={spec['batch_size']}",
        f"--lr={spec['lr']}",
        f"--partition={spec['partition']}",
        f"--alpha={spec['alpha']}",
        f"--overlap={spec['overlap']}",
        f"--seed={spec['seed']}",
        f"--target={spec['target']}",
        f"--extra-rounds={spec['extra_rounds']}",
        f"--max-minutes={spec['max_minutes']}",
        f"--trainer={spec['flower_trainer']}",
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout_s, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"Flower side failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    result = json.loads(lines[-1])
    if result.get("stopped_by") == "errors":
        raise RuntimeError(f"every Flower client failed: {result.get('first_error')}")
    return result


# -- the whole bench ------------------------------------------------------------------------------


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def median(values: list[float | None]) -> float | None:
    known = sorted(v for v in values if v is not None)
    if not known:
        return None
    mid = len(known) // 2
    return known[mid] if len(known) % 2 else (known[mid - 1] + known[mid]) / 2


def intermittency_ratios(sync: dict, asynchronous: dict) -> dict:
    """Synchronous over asynchronous time to the target, on the fleet's simulated clock (the
    headline) and on the simulation's wall clock; a side that never got there counts with its
    whole run (a bound, flagged by ``..._reached``)."""

    def taken(r: dict, key: str, whole: str) -> float:
        return r[key] if r[key] is not None else r[whole]

    sync_t, async_t = taken(sync, "sim_time_to_target_s", "sim_s"), taken(asynchronous, "sim_time_to_target_s", "sim_s")
    sync_wall = taken(sync, "time_to_target_s", "train_wall_s")
    async_wall = taken(asynchronous, "time_to_target_s", "train_wall_s")
    return {
        "sync_reached": sync["sim_time_to_target_s"] is not None,
        "async_reached": asynchronous["sim_time_to_target_s"] is not None,
        "sync_time_s": sync_t,
        "async_time_s": async_t,
        "time_ratio": ratio(sync_t, async_t),
        "sync_wall_s": sync_wall,
        "async_wall_s": async_wall,
        "wall_ratio": ratio(sync_wall, async_wall),
    }


def fmt(value: object, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def print_table(rows: list[tuple[str, dict]]) -> None:
    header = (
        f"{'run':<28}{'updates':>8}{'wall s':>8}{'upd/s':>8}{'steady':>8}"
        f"{'t->0.90 s':>10}{'rounds':>7}{'final':>7}{'RSS MB':>8}  stop"
    )
    print(header)
    print("-" * len(header))
    for name, r in rows:
        rss = r.get("peak_rss_mb", r.get("driver_peak_rss_mb"))
        print(
            f"{name:<28}{r['updates']:>8}{fmt(r['train_wall_s'], 1):>8}{fmt(r['updates_per_s'], 1):>8}"
            f"{fmt(r.get('steady_updates_per_s'), 1):>8}{fmt(r['time_to_target_s'], 1):>10}{r['rounds']:>7}"
            f"{fmt(r['final_accuracy'], 3):>7}{fmt(rss, 0):>8}  {r['stopped_by']}"
        )


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--devices", default="100,1000", help="comma-separated fleet sizes for part 1")
    p.add_argument("--max-minutes", type=float, default=4.0, help="wall-time budget per configuration")
    p.add_argument("--max-rounds", type=int, default=500)
    p.add_argument("--local-epochs", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=0.5)
    p.add_argument("--partition", default="dirichlet", choices=("iid", "dirichlet", "label-skew"))
    p.add_argument("--alpha", type=float, default=1.0)
    p.add_argument("--overlap", type=float, default=0.3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--target", type=float, default=0.90)
    p.add_argument("--extra-rounds", type=int, default=2, help="rounds run after reaching the target")
    p.add_argument("--fedsync-training", default="auto", choices=("auto", "litert", "keras", "head"))
    p.add_argument("--fedsync-aggregation", default="async", choices=("async", "sync"))
    p.add_argument(
        "--fedsync-server-lr",
        type=float,
        default=0.7,
        help="part 1, async: the coordinator's step along each buffer's mean delta",
    )
    p.add_argument("--predictions-per-round", type=int, default=0)
    p.add_argument("--fedsync-backend", default="processes", choices=("processes", "local"), help="part 1")
    p.add_argument("--workers", type=int, default=0, help="part 1, processes backend: workers (0: one per CPU)")
    p.add_argument(
        "--scratch", default=default_scratch(), help="where the simulations' files go (default: /dev/shm if present)"
    )
    p.add_argument("--flower-trainer", default="batch", choices=("batch", "fit"))
    p.add_argument("--intermittent-devices", type=int, default=100)
    p.add_argument("--online-prob", type=float, default=0.5)
    p.add_argument("--intermittency-seeds", default="0,1,2", help="comma-separated seeds for part 2")
    p.add_argument("--skip-flower", action="store_true")
    p.add_argument("--skip-intermittency", action="store_true")
    p.add_argument("--only-intermittency", action="store_true", help="part 2 only (no part 1, no Flower)")
    p.add_argument("--cohort-fraction", type=float, default=1.0, help="part 2, sync: Flower's fraction_fit")
    p.add_argument("--round-timeout", type=int, default=4, help="part 2, sync: rounds a FedAvg round waits")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--child-out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.child:
        result = run_fedsync(json.loads(args.child))
        Path(args.child_out).write_text(json.dumps(result))
        return result

    sizes = [] if args.only_intermittency else [int(n) for n in args.devices.split(",") if n.strip()]
    args.skip_flower = args.skip_flower or args.only_intermittency
    training = choose_fedsync_training(args.fedsync_training)
    common = {
        "local_epochs": args.local_epochs,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "partition": args.partition,
        "alpha": args.alpha,
        "overlap": args.overlap,
        "seed": args.seed,
        "target": args.target,
        "extra_rounds": args.extra_rounds,
        "max_minutes": args.max_minutes,
        "max_rounds": args.max_rounds,
    }
    # A configuration may overrun its budget by one round (plus start-up); beyond this it is hung.
    timeout_s = args.max_minutes * 60 * 3 + 300
    started = time.perf_counter()
    if not args.skip_flower:
        ensure_flower_venv()

    rows: list[tuple[str, dict]] = []
    per_size: dict[str, dict] = {}
    for n in sizes:
        print(f"[{time.perf_counter() - started:6.0f}s] fedsync, {n} devices ({training}, {args.fedsync_aggregation})")
        fs = run_fedsync_child(
            {
                **common,
                "devices": n,
                "aggregation": args.fedsync_aggregation,
                "online_probability": 1.0,
                "local_training": training,
                "predictions_per_round": args.predictions_per_round,
                "backend": args.fedsync_backend,
                "workers": args.workers,
                "server_lr": args.fedsync_server_lr,
            },
            timeout_s,
            args.scratch,
        )
        rows.append((f"fedsync {n} ({training}, {args.fedsync_backend})", fs))
        entry: dict = {"fedsync": fs}
        if not args.skip_flower:
            print(f"[{time.perf_counter() - started:6.0f}s] Flower 1.41, {n} devices (Ray, {args.flower_trainer})")
            fl = run_flower({**common, "devices": n, "flower_trainer": args.flower_trainer}, timeout_s)
            rows.append((f"flower {n} (keras {args.flower_trainer})", fl))
            entry["flower"] = fl
            entry["speedup"] = ratio(fs["updates_per_s"], fl["updates_per_s"])
            entry["steady_speedup"] = ratio(fs["steady_updates_per_s"], fl.get("steady_updates_per_s"))
        per_size[str(n)] = entry

    intermittency: dict[str, dict] = {}  # seed -> {"sync": figures, "async": figures, ratios}
    seeds = [] if args.skip_intermittency else [int(x) for x in args.intermittency_seeds.split(",") if x.strip()]
    for seed in seeds:
        pair: dict = {}
        for aggregation in ("sync", "async"):
            print(
                f"[{time.perf_counter() - started:6.0f}s] fedsync, {args.intermittent_devices} devices, "
                f"online {args.online_prob:.0%}, {aggregation}, seed {seed}"
            )
            r = run_fedsync_child(
                {
                    **common,
                    "seed": seed,
                    "devices": args.intermittent_devices,
                    "aggregation": aggregation,
                    "online_probability": args.online_prob,
                    "cohort_fraction": args.cohort_fraction,
                    "round_timeout": args.round_timeout,
                    "local_training": training,
                    "predictions_per_round": args.predictions_per_round,
                    "backend": "local",
                },
                timeout_s,
                args.scratch,
            )
            rows.append((f"fedsync {args.intermittent_devices} p={args.online_prob} {aggregation} s{seed}", r))
            pair[aggregation] = r
        pair.update(intermittency_ratios(pair["sync"], pair["async"]))
        intermittency[str(seed)] = pair

    print()
    print_table(rows)
    print()

    def stripped(r: dict) -> dict:
        return {k: v for k, v in r.items() if k != "accuracy_over_time"}

    headline = per_size[str(sizes[0])] if sizes else {}
    largest = max(sizes) if sizes else None
    pairs = list(intermittency.values())
    summary = {
        "bench": "vs_flower",
        "fedsync_training": training,
        "headline_devices": sizes[0] if sizes else None,
        "fedsync_updates_per_s": headline.get("fedsync", {}).get("updates_per_s"),
        "flower_updates_per_s": headline.get("flower", {}).get("updates_per_s"),
        "speedup": headline.get("speedup"),
        "steady_speedup": headline.get("steady_speedup"),
        "fedsync_final_acc": headline.get("fedsync", {}).get("final_accuracy"),
        "flower_final_acc": headline.get("flower", {}).get("final_accuracy"),
        "fedsync_time_to_0.90_s": headline.get("fedsync", {}).get("time_to_target_s"),
        "flower_time_to_0.90_s": headline.get("flower", {}).get("time_to_target_s"),
        # On the fleet's simulated clock; the wall-clock ratio measures the simulator, not the fleet.
        TARGET_KEY: median([q["time_ratio"] for q in pairs]),
        "async_vs_sync_time_ratio_per_seed": {seed: q["time_ratio"] for seed, q in intermittency.items()},
        "sync_sim_time_to_0.90_s": median([q["sync_time_s"] for q in pairs]),
        "async_sim_time_to_0.90_s": median([q["async_time_s"] for q in pairs]),
        "async_vs_sync_wall_time_to_0.90": median([q["wall_ratio"] for q in pairs]),
        "sync_wall_time_to_0.90_s": median([q["sync_wall_s"] for q in pairs]),
        "async_wall_time_to_0.90_s": median([q["async_wall_s"] for q in pairs]),
        "sync_reached_0.90": all(q["sync_reached"] for q in pairs) if pairs else None,
        "async_reached_0.90": all(q["async_reached"] for q in pairs) if pairs else None,
        "rss_mb_1000_devices": per_size.get("1000", {}).get("fedsync", {}).get("peak_rss_mb"),
        f"rss_mb_{largest}_devices": per_size.get(str(largest), {}).get("fedsync", {}).get("peak_rss_mb"),
        "per_size": {
            n: {
                **{k: stripped(v) for k, v in e.items() if isinstance(v, dict)},
                **{k: v for k, v in e.items() if not isinstance(v, dict)},
            }
            for n, e in per_size.items()
        },
        "intermittency": {
            seed: {k: stripped(v) if isinstance(v, dict) else v for k, v in q.items()}
            for seed, q in intermittency.items()
        },
        "settings": {
            **common,
            "fedsync_aggregation": args.fedsync_aggregation,
            "fedsync_server_lr": args.fedsync_server_lr,
            "fedsync_backend": args.fedsync_backend,
            "workers": args.workers,
            "scratch": args.scratch or tempfile.gettempdir(),
            "flower_trainer": args.flower_trainer,
            "cohort_fraction": args.cohort_fraction,
            "round_timeout": args.round_timeout,
        },
        "bench_wall_s": time.perf_counter() - started,
    }
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
