"""The `fedsync` command line. Errors are one line on stderr and exit code 2, never a traceback."""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path


class CommandError(Exception):
    """A user-facing error: printed as one line."""


def _writable_file(path: str) -> Path:
    target = Path(path)
    if target.is_dir():
        raise CommandError(f"report path {path} is a directory")
    existing = target.parent
    while not existing.exists():
        existing = existing.parent
    try:
        # os.access is no test: it says yes to root everywhere, and to a regular file "parent".
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as exc:
        raise CommandError(f"report path {path} is not writable: {exc.strerror or exc}") from None
    return target


def _check_address(address: str) -> None:
    """Fail before any work (and before gRPC logs its own error) when the address cannot be bound."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise CommandError(f"--address must be host:port, got {address!r}")
    host = host.strip("[]") or "0.0.0.0"
    try:
        infos = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
    except OSError as exc:
        raise CommandError(f"cannot listen on {address}: {exc}") from None
    family, _, _, _, sockaddr = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(sockaddr)
        except OSError as exc:
            raise CommandError(f"cannot listen on {address}: {exc.strerror or exc}") from None


# -- coordinator ------------------------------------------------------------------------------


def _strategy_from_args(args: argparse.Namespace):
    from fedsync import aggregation as agg

    if args.buffer_size < 1:
        raise CommandError(f"--buffer-size must be at least 1, got {args.buffer_size}")
    if args.aggregation == "sync":
        return agg.Strategy.fedavg(num_clients=args.buffer_size)
    rules = {
        "mean": agg.weighted_mean,
        "median": agg.coordinate_median,
        "trimmed-mean": lambda: agg.trimmed_mean(args.trim),
        "krum": lambda: agg.krum(args.byzantine),
        "multi-krum": lambda: agg.multi_krum(args.byzantine),
    }
    staleness = {
        "constant": agg.constant_staleness,
        "polynomial": lambda: agg.polynomial_staleness(args.staleness_a),
        "hinge": agg.hinge_staleness,
    }
    rule = rules[args.rule]()
    if args.clip_norm is not None:
        if not args.clip_norm > 0:
            raise CommandError(f"--clip-norm must be > 0, got {args.clip_norm}")
        rule = agg.norm_clipping(args.clip_norm) | rule
    optimizer = (
        agg.server_momentum(lr=args.server_lr, momentum=args.server_momentum)
        if args.server_momentum
        else agg.server_sgd(lr=args.server_lr)
    )
    try:
        return agg.Strategy(
            rule=rule,
            staleness=staleness[args.staleness](),
            max_staleness=args.max_staleness,
            optimizer=optimizer,
            buffer_size=args.buffer_size,
            max_wait_s=args.max_wait_s,
        )
    except ValueError as exc:
        raise CommandError(str(exc)) from None


def _serve(args: argparse.Namespace) -> int:
    from fedsync.conflicts import confidence_weighted_vote, highest_confidence

    strategy = _strategy_from_args(args)
    if args.keep_versions < 1:
        raise CommandError(f"--keep-versions must be at least 1, got {args.keep_versions}")
    _check_address(args.address)
    from fedsync._quiet import import_tensorflow_quietly

    import_tensorflow_quietly()
    from coordinator import Coordinator
    from coordinator.server import ServerTLS

    tls = None
    if args.tls_cert or args.tls_key:
        if not (args.tls_cert and args.tls_key):
            raise CommandError("--tls-cert and --tls-key go together")
        for path in (args.tls_cert, args.tls_key, args.client_ca):
            if path and not Path(path).is_file():
                raise CommandError(f"no such file: {path}")
        tls = ServerTLS(Path(args.tls_cert), Path(args.tls_key), Path(args.client_ca) if args.client_ca else None)
    elif args.client_ca:
        raise CommandError("--client-ca (mutual TLS) needs --tls-cert and --tls-key")
    coordinator = Coordinator(
        args.data_dir,
        strategy=strategy,
        metrics=args.metrics_port is not None,
        keep_versions=args.keep_versions,
        require_credentials=not args.no_credentials,
        tls=tls,
        policy=confidence_weighted_vote() if args.conflict_policy == "vote" else highest_confidence(),
        max_delta_norm=args.max_delta_norm,
    )
    port = coordinator.start(args.address)
    host = args.address.rsplit(":", 1)[0]
    print(
        f"fedsync coordinator listening on {host}:{port} ({'TLS' if tls else 'plaintext'}, "
        f"{'credentials required' if not args.no_credentials else 'NO credentials'}; "
        f"data in {args.data_dir}, version {coordinator.version})"
    )
    if args.metrics_port is not None:
        metrics_port = coordinator.serve_metrics(args.metrics_port, host)
        print(f"Prometheus metrics at http://{host}:{metrics_port}/metrics")
    sys.stdout.flush()
    stop = lambda *_: coordinator.server.stop(2)  # noqa: E731
    signal.signal(signal.SIGTERM, stop)
    try:
        coordinator.wait()
    except KeyboardInterrupt:
        pass
    finally:
        coordinator.stop()
    return 0


def _enroll(args: argparse.Namespace) -> int:
    from coordinator.auth import CredentialStore
    from coordinator.store import CoordinatorStore
    from fedsync.model import LABELS

    if not (Path(args.data_dir) / "coordinator.db").exists():
        raise CommandError(f"{args.data_dir} holds no coordinator (no coordinator.db): start one there first")
    store = CoordinatorStore(Path(args.data_dir) / "coordinator.db", num_labels=len(LABELS))
    try:
        token = CredentialStore(store.conn, store.lock).enroll(args.device_id)
    finally:
        store.close()
    print(token)
    return 0


def _certs(args: argparse.Namespace) -> int:
    from fedsync.certs import generate_all, generate_client_certificate

    out = Path(args.out)
    if args.client:
        ca_cert, ca_key = out / "ca.pem", out / "ca.key"
        if not (ca_cert.exists() and ca_key.exists()):
            raise CommandError(f"{out} has no ca.pem and ca.key: run `fedsync certs --out {out}` first")
        cert, key = generate_client_certificate(out, ca_cert, ca_key, args.client)
        print(json.dumps({"client_cert": str(cert), "client_key": str(key)}))
        return 0
    files = generate_all(out, hostnames=args.hostname or ("localhost", "127.0.0.1"), overwrite=args.overwrite)
    print(json.dumps({k: str(v) for k, v in files.__dict__.items()}))
    return 0


# -- simulate ---------------------------------------------------------------------------------


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
        ray_address=args.ray_address,
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


def _client_sync(args: argparse.Namespace) -> int:
    from client import EdgeClient
    from fedsync.wire import ClientTLS

    tls = None
    if args.tls_ca:
        tls = ClientTLS(
            Path(args.tls_ca),
            Path(args.tls_cert) if args.tls_cert else None,
            Path(args.tls_key) if args.tls_key else None,
        )
    client = EdgeClient(
        args.home,
        args.device_id,
        fine_tuning=None if args.no_fine_tuning else args.fine_tuning,
        credential=args.credential or os.environ.get("FEDSYNC_CREDENTIAL"),
        tls=tls,
    )
    try:
        report = client.sync(args.address, timeout_s=args.timeout)
    finally:
        client.close()
    print(json.dumps(report.__dict__, default=str))
    return 0


def _client_status(args: argparse.Namespace) -> int:
    from client.journal import Journal
    from client.model_store import ModelStore

    home = Path(args.home)
    if not (home / "journal.db").exists():
        raise CommandError(f"{home} holds no fedsync client (no journal.db)")
    journal = Journal(home / "journal.db")
    store = ModelStore(home / "models")
    status = {
        "model_version": store.current_version(),
        "installed_versions": store.installed_versions(),
        "events_journaled": journal.last_event_seq(),
        "events_pending": journal.pending_event_count(),
        "deltas_pending": journal.pending_delta_count(),
        "journal_integrity": "ok" if journal.integrity_ok() else "DAMAGED",
        "storage": [a.__dict__ for a in store.storage_report()],
    }
    journal.close()
    print(json.dumps(status, indent=1))
    return 0


def _client_prune(args: argparse.Namespace) -> int:
    from client.model_store import ModelStore

    home = Path(args.home)
    if not (home / "models").is_dir():
        raise CommandError(f"{home} holds no fedsync model store (no models/ folder)")
    if args.keep < 1:
        raise CommandError(f"--keep must be at least 1, got {args.keep}")
    store = ModelStore(home / "models")
    removed = store.prune(args.keep)
    print(json.dumps({"removed_versions": removed, "kept_versions": store.installed_versions()}))
    return 0


def _client_stats(args: argparse.Namespace) -> int:
    import sqlite3

    path = Path(args.home) / "journal.db"
    if not path.exists():
        raise CommandError(f"{args.home} holds no fedsync client (no journal.db)")
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        latencies = sorted(row[0] for row in conn.execute("SELECT latency_us FROM events WHERE latency_us IS NOT NULL"))
        cold = conn.execute(
            "SELECT cold_start_s, latency_us, rss_mb FROM inference_stats WHERE kind = 'cold' ORDER BY seq DESC LIMIT 1"
        ).fetchone()
        rss = conn.execute("SELECT MAX(rss_mb), AVG(rss_mb) FROM inference_stats").fetchone()
        warm = latencies[1:] if cold is not None else latencies
    finally:
        conn.close()

    def percentile(values: list[float], q: float) -> float | None:
        return round(values[min(len(values) - 1, int(q * len(values)))], 1) if values else None

    print(
        json.dumps(
            {
                "inferences": len(latencies),
                "warm_latency_us": {
                    "p50": percentile(warm, 0.5),
                    "p95": percentile(warm, 0.95),
                    "p99": percentile(warm, 0.99),
                },
                "cold_start_s": None if cold is None else round(cold[0], 3),
                "cold_first_inference_us": None if cold is None else round(cold[1], 1),
                "rss_mb": {"max": rss[0] and round(rss[0], 1), "mean": rss[1] and round(rss[1], 1)},
            },
            indent=1,
        )
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedsync", description="Federated offline sync.")
    commands = parser.add_subparsers(dest="command", required=True)

    coordinator = commands.add_parser("coordinator", help="run a coordinator").add_subparsers(
        dest="coordinator_command", required=True
    )
    serve = coordinator.add_parser("serve", help="serve the Sync gRPC API")
    serve.add_argument("--data-dir", default=".fedsync/coordinator", help="SQLite database and published models")
    serve.add_argument("--address", default="127.0.0.1:50051", help="host:port to listen on")
    serve.add_argument("--aggregation", choices=["async", "sync"], default="async", help="FedBuff or FedAvg rounds")
    serve.add_argument("--buffer-size", type=int, default=10, help="deltas per new version")
    serve.add_argument("--max-wait-s", type=float, default=None, help="publish after this long with any deltas")
    serve.add_argument("--max-staleness", type=int, default=8, help="reject deltas older than this many versions")
    serve.add_argument("--staleness", choices=["constant", "polynomial", "hinge"], default="polynomial")
    serve.add_argument("--staleness-a", type=float, default=0.5, help="exponent of (1+staleness)^-a")
    serve.add_argument("--rule", choices=["mean", "median", "trimmed-mean", "krum", "multi-krum"], default="mean")
    serve.add_argument("--trim", type=float, default=0.1, help="trimmed-mean: fraction cut at each end")
    serve.add_argument("--byzantine", type=int, default=1, help="krum: number of faulty devices tolerated")
    serve.add_argument("--clip-norm", type=float, default=None, help="clip each delta to this L2 norm first")
    serve.add_argument("--server-lr", type=float, default=1.0)
    serve.add_argument("--server-momentum", type=float, default=0.0)
    serve.add_argument("--max-delta-norm", type=float, default=None, help="reject deltas with a larger L2 norm")
    serve.add_argument("--conflict-policy", choices=["highest-confidence", "vote"], default="highest-confidence")
    serve.add_argument("--keep-versions", type=int, default=5, help="published versions to keep (plus those in use)")
    serve.add_argument("--metrics-port", type=int, default=None, help="serve Prometheus metrics on this port")
    serve.add_argument("--no-credentials", action="store_true", help="accept calls without device credentials")
    serve.add_argument("--tls-cert", help="server certificate (PEM), see `fedsync certs`")
    serve.add_argument("--tls-key", help="server private key (PEM)")
    serve.add_argument("--client-ca", help="require client certificates signed by this CA (mutual TLS)")
    serve.set_defaults(run=_serve)
    enroll = coordinator.add_parser("enroll", help="issue a device credential (prints the token once)")
    enroll.add_argument("--data-dir", default=".fedsync/coordinator")
    enroll.add_argument("--device-id", required=True)
    enroll.set_defaults(run=_enroll)

    certs = commands.add_parser("certs", help="generate a local CA and server (or client) certificates")
    certs.add_argument("--out", default=".fedsync/certs")
    certs.add_argument("--hostname", action="append", help="server name or IP (repeatable)")
    certs.add_argument("--client", metavar="DEVICE_ID", help="issue a client certificate for mutual TLS instead")
    certs.add_argument("--overwrite", action="store_true")
    certs.set_defaults(run=_certs)

    sim = commands.add_parser("simulate", help="simulate a fleet of intermittent devices against a real coordinator")
    sim.add_argument("--devices", type=int, default=20)
    sim.add_argument("--rounds", type=int, default=8)
    sim.add_argument("--seed", type=int, default=0)
    sim.add_argument("--data-dir", default=".fedsync/sim", help="where device journals and the coordinator live")
    sim.add_argument("--report", default=None, help="write a JSON report here")
    sim.add_argument("--partition", default="dirichlet", help="iid, dirichlet or label-skew")
    sim.add_argument("--alpha", type=float, default=1.0, help="Dirichlet concentration (non-IID-ness)")
    sim.add_argument("--overlap", type=float, default=0.3, help="fraction of inputs shared across devices")
    sim.add_argument("--online-prob", type=float, default=0.8, help="stationary probability a device is online")
    sim.add_argument("--aggregation", default="async", help="async (buffered, staleness-aware) or sync (FedAvg)")
    sim.add_argument("--buffer-size", type=int, default=None, help="async: deltas per version")
    sim.add_argument(
        "--cohort-fraction", type=float, default=1.0, help="sync: fraction of the online devices sampled to train "
        "each round (Flower's fraction_fit)",
    )  # fmt: skip
    sim.add_argument(
        "--round-timeout", type=int, default=4, help="sync: rounds a FedAvg round waits for its cohort after sending "
        "the model; then it aggregates the updates that arrived",
    )  # fmt: skip
    sim.add_argument("--codec", default="float32", help="delta codec: float32, float16, int8, topk:0.1")
    sim.add_argument("--local-epochs", type=int, default=5)
    sim.add_argument(
        "--local-training", choices=["keras", "litert", "head"], default="keras",
        help="keras: whole model with TensorFlow; litert: whole model in LiteRT (no TensorFlow, fast enough for "
        "large fleets); head: only the softmax head in LiteRT",
    )  # fmt: skip
    sim.add_argument(
        "--compare", default=None, help="run several configurations on the same fleet and seed, e.g. sync,async "
        "or float32,int8 or keras,head; plots them together",
    )  # fmt: skip
    sim.add_argument("--plot", default=None, help="write a PNG of accuracy over time and versions here")
    sim.add_argument("--lr", type=float, default=None, help="local learning rate (default 0.1 keras, 0.5 head)")
    sim.add_argument(
        "--dropout-prob", type=float, default=0.0, help="probability that a sync's link drops after 0-15 messages (the "
        "device resumes on its next online period)",
    )  # fmt: skip
    sim.add_argument("--speed-min", type=float, default=1.0, help="slowest device speed (scales predictions, epochs)")
    sim.add_argument("--speed-max", type=float, default=1.0, help="fastest device speed")
    sim.add_argument(
        "--backend", default="local", help="local (this process) or ray (devices in Ray actors; pip install "
        "'fedsync[ray]')",
    )  # fmt: skip
    sim.add_argument("--ray-address", default=None, help="ray backend: an existing Ray cluster (default: start one)")
    sim.set_defaults(run=_simulate)

    client = commands.add_parser("client", help="operate an edge client's folder").add_subparsers(
        dest="client_command", required=True
    )
    csync = client.add_parser("sync", help="sync a client folder with a coordinator once")
    csync.add_argument("--home", required=True)
    csync.add_argument("--device-id", required=True)
    csync.add_argument("--address", required=True)
    csync.add_argument("--timeout", type=float, default=30.0)
    csync.add_argument("--no-fine-tuning", action="store_true", help="download only what inference needs")
    csync.add_argument(
        "--fine-tuning", default="keras", choices=["keras", "litert", "head"], help="fine-tuning profile"
    )
    csync.add_argument("--credential", help="the device's token (or set FEDSYNC_CREDENTIAL)")
    csync.add_argument("--tls-ca", help="CA certificate to trust the coordinator with (enables TLS)")
    csync.add_argument("--tls-cert", help="client certificate for mutual TLS")
    csync.add_argument("--tls-key", help="client key for mutual TLS")
    csync.set_defaults(run=_client_sync)
    cstatus = client.add_parser("status", help="journal, pending work, installed versions and storage")
    cstatus.add_argument("--home", required=True)
    cstatus.set_defaults(run=_client_status)
    cstats = client.add_parser("stats", help="inference latency, cold start and memory")
    cstats.add_argument("--home", required=True)
    cstats.set_defaults(run=_client_stats)
    cprune = client.add_parser("prune", help="remove old model versions, keeping the newest good ones")
    cprune.add_argument("--home", required=True)
    cprune.add_argument("--keep", type=int, default=2)
    cprune.set_defaults(run=_client_prune)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from fedsync._quiet import quiet_tensorflow_logs

    quiet_tensorflow_logs()
    args = build_parser().parse_args(argv)
    run: Callable[[argparse.Namespace], int] = args.run
    try:
        return run(args)
    except KeyboardInterrupt:
        print("fedsync: interrupted", file=sys.stderr)
        return 130
    except (CommandError, OSError, ValueError) as exc:
        print(f"fedsync: error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # a bug or an environment problem: still one line, with its kind
        import grpc

        if isinstance(exc, grpc.RpcError):
            print(f"fedsync: error: {exc.code().name}: {exc.details()}", file=sys.stderr)  # type: ignore[attr-defined]
        else:
            print(f"fedsync: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
