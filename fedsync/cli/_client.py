"""`fedsync client sync|status|stats|prune`."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from fedsync.cli._common import CommandError


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
