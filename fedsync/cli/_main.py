"""The parser and the entry point: errors are one line on stderr and exit code 2."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from fedsync.cli._client import _client_prune, _client_stats, _client_status, _client_sync
from fedsync.cli._common import CommandError
from fedsync.cli._coordinator import _certs, _enroll, _serve
from fedsync.cli._simulate import _simulate


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
    serve.add_argument(
        "--durability",
        choices=["power", "process"],
        default="power",
        help="what an acknowledged write survives: a power cut (default), or only a crash of the coordinator process",
    )
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
        "--server-lr", type=float, default=1.0, help="async: the coordinator's step along each buffer's mean delta "
        "(below 1 damps the noise of stale deltas)",
    )  # fmt: skip
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
        "--dropout-prob", type=float, default=0.0, help="probability that a sync's link drops after 0-7 messages (the "
        "device resumes on its next online period)",
    )  # fmt: skip
    sim.add_argument("--speed-min", type=float, default=1.0, help="slowest device speed (scales predictions, epochs)")
    sim.add_argument("--speed-max", type=float, default=1.0, help="fastest device speed")
    sim.add_argument(
        "--backend", default="local", help="local (every device in this process, fully reproducible), processes "
        "(devices in worker processes, one per CPU: uses every core) or ray (devices in Ray actors; pip install "
        "'fedsync[ray]')",
    )  # fmt: skip
    sim.add_argument("--workers", type=int, default=0, help="processes backend: worker processes (0: one per CPU)")
    sim.add_argument("--ray-address", default=None, help="ray backend: an existing Ray cluster (default: start one)")
    sim.add_argument(
        "--listen", default="127.0.0.1:0", help="the coordinator's host:port (default: loopback, any free port); "
        "0.0.0.0:PORT lets devices on other machines of a Ray cluster reach it",
    )  # fmt: skip
    sim.add_argument(
        "--advertise-host", default=None, help="the host the devices dial (default: 127.0.0.1 when listening on "
        "loopback, else this node's IP address as Ray sees it)",
    )  # fmt: skip
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
