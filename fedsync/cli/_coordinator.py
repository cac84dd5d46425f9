"""`fedsync coordinator serve|enroll` and `fedsync certs`."""

from __future__ import annotations

import argparse
import json
import signal
import sys
from pathlib import Path

from fedsync.cli._common import CommandError, _check_address


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
    from coordinator.store import Durability

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
        durability=Durability[args.durability.upper()],
    )
    port = coordinator.start(args.address)
    host = args.address.rsplit(":", 1)[0]
    print(
        f"fedsync coordinator listening on {host}:{port} ({'TLS' if tls else 'plaintext'}, "
        f"{'credentials required' if not args.no_credentials else 'NO credentials'}; "
        f"data in {args.data_dir}, durable against a {'power cut' if args.durability == 'power' else 'process crash'}, "
        f"version {coordinator.version})"
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
