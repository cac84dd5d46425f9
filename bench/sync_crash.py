"""Crash test of the whole sync path: a coordinator process and several client processes, killed with
SIGKILL at random moments and restarted, trial after trial. At the end of each trial every client
drains its journal, and the coordinator must hold every journaled event and delta exactly once,
with every database passing PRAGMA integrity_check. Ends with one JSON line.

    .venv/bin/python bench/sync_crash.py [--trials 50] [--clients 3] [--kills 4] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CLIENT_LOOP = """
import sys, time
sys.path.insert(0, {repo!r})
import grpc
import numpy as np
from client import EdgeClient, NoModelError
from fedsync.sim.data import load_digits_split
train, test = load_digits_split()
device = EdgeClient({home!r}, {device!r}, fine_tuning="head")
rng = np.random.default_rng({seed})
step = 0
while True:
    step += 1
    try:
        if device.model_version:
            for _ in range(int(rng.integers(20, 200))):
                device.predict(test.x[int(rng.integers(len(test.x)))] + np.float32(rng.normal(0, 0.01)))
            if step % 3 == 0:
                rows = rng.choice(len(train.x), 64, replace=False)
                device.fine_tune(train.x[rows], train.y[rows], epochs=1, learning_rate=0.3)
        device.sync({address!r}, timeout_s=5, attempts=1)
    except grpc.RpcError:
        time.sleep(0.05)
"""


@dataclass
class TrialResult:
    trial: int
    coordinator_kills: int = 0
    client_kills: int = 0
    events_checked: int = 0
    deltas_checked: int = 0
    lost: int = 0
    duplicated: int = 0
    mismatched: int = 0
    integrity_failures: int = 0
    notes: list[str] = field(default_factory=list)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_coordinator(data_dir: Path, port: int) -> subprocess.Popen[bytes]:
    process = subprocess.Popen(
        [
            sys.executable, "-m", "fedsync.cli", "coordinator", "serve", "--data-dir", str(data_dir),
            "--address", f"127.0.0.1:{port}", "--no-credentials", "--buffer-size", "3",
        ],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    process.stdout.readline()  # type: ignore[union-attr]  # "listening on ..." once it serves
    return process


def start_client(root: Path, index: int, port: int, seed: int) -> subprocess.Popen[bytes]:
    script = CLIENT_LOOP.format(
        repo=str(REPO),
        home=str(root / f"client-{index}"),
        device=f"client-{index}",
        seed=seed,
        address=f"127.0.0.1:{port}",
    )
    return subprocess.Popen([sys.executable, "-c", script], cwd=REPO, stderr=subprocess.DEVNULL)


def kill(process: subprocess.Popen[bytes]) -> None:
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)


def wait_for_first_events(root: Path, clients: int, timeout_s: float = 60.0) -> None:
    """Let every client install a model and journal something before the kills start."""
    deadline = time.monotonic() + timeout_s
    for i in range(clients):
        path = root / f"client-{i}" / "journal.db"
        while time.monotonic() < deadline:
            try:
                conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
                try:
                    if conn.execute("SELECT COUNT(*) FROM events").fetchone()[0] > 0:
                        break
                finally:
                    conn.close()
            except sqlite3.Error:
                pass
            time.sleep(0.1)


def integrity_ok(path: Path) -> bool:
    conn = sqlite3.connect(path)
    try:
        return conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    finally:
        conn.close()


def run_trial(
    trial: int, root: Path, clients: int, kills: int, rng: random.Random, coordinator_first: bool = False
) -> TrialResult:
    from client import EdgeClient

    result = TrialResult(trial)
    port = free_port()
    coordinator = start_coordinator(root / "coordinator", port)
    workers = [start_client(root, i, port, rng.randrange(1 << 30)) for i in range(clients)]
    try:
        wait_for_first_events(root, clients)
        for k in range(kills):
            time.sleep(rng.uniform(0.5, 3.0))
            victim = clients if coordinator_first and k == 0 else rng.randrange(clients + 1)
            if victim == clients:
                kill(coordinator)
                result.coordinator_kills += 1
                time.sleep(rng.uniform(0.0, 0.5))
                coordinator = start_coordinator(root / "coordinator", port)
            else:
                kill(workers[victim])
                result.client_kills += 1
                workers[victim] = start_client(root, victim, port, rng.randrange(1 << 30))
        time.sleep(rng.uniform(0.5, 2.0))
    finally:
        for worker in workers:
            kill(worker)
    # Drain: each client's journal, synced once more by a fresh process-local client.
    for i in range(clients):
        device = EdgeClient(root / f"client-{i}", f"client-{i}", fine_tuning="head")
        try:
            for _attempt in range(5):
                try:
                    device.sync(f"127.0.0.1:{port}", timeout_s=30, attempts=3)
                    break
                except Exception as exc:
                    result.notes.append(f"drain client-{i}: {exc}")
                    time.sleep(1)
        finally:
            device.close()
    kill(coordinator)

    db = sqlite3.connect(root / "coordinator" / "coordinator.db")
    for i in range(clients):
        journal_path = root / f"client-{i}" / "journal.db"
        journal = sqlite3.connect(journal_path)
        mine = journal.execute(
            "SELECT seq, input_hash, label, confidence, model_version FROM events ORDER BY seq"
        ).fetchall()
        theirs = db.execute(
            "SELECT seq, input_hash, label, confidence, model_version FROM events WHERE device_id = ? ORDER BY seq",
            (f"client-{i}",),
        ).fetchall()
        result.events_checked += len(mine)
        their_seqs = [row[0] for row in theirs]
        result.duplicated += len(their_seqs) - len(set(their_seqs))
        result.lost += len({row[0] for row in mine} - set(their_seqs))
        result.mismatched += sum(1 for a, b in zip(mine, theirs, strict=False) if a != b)
        my_deltas = journal.execute("SELECT seq, payload_sha256 FROM deltas ORDER BY seq").fetchall()
        their_deltas = db.execute(
            "SELECT seq, payload_sha256 FROM deltas WHERE device_id = ? ORDER BY seq", (f"client-{i}",)
        ).fetchall()
        result.deltas_checked += len(my_deltas)
        result.lost += len(set(my_deltas) - set(their_deltas))
        journal.close()
        result.integrity_failures += not integrity_ok(journal_path)
    db.close()
    result.integrity_failures += not integrity_ok(root / "coordinator" / "coordinator.db")
    return result


def run(trials: int, clients: int, kills: int, seed: int) -> dict[str, object]:
    rng = random.Random(seed)
    results = []
    for trial in range(trials):
        with tempfile.TemporaryDirectory() as tmp:
            results.append(run_trial(trial, Path(tmp), clients, kills, rng))
        r = results[-1]
        print(
            f"trial {trial:>3}: killed coordinator {r.coordinator_kills}x, clients {r.client_kills}x; "
            f"{r.events_checked} events, {r.deltas_checked} deltas checked; lost {r.lost}, "
            f"duplicated {r.duplicated}, mismatched {r.mismatched}, integrity failures {r.integrity_failures}",
            flush=True,
        )
    totals = {
        key: sum(getattr(r, key) for r in results)
        for key in (
            "coordinator_kills", "client_kills", "events_checked", "deltas_checked",
            "lost", "duplicated", "mismatched", "integrity_failures",
        )
    }  # fmt: skip
    return {
        "trials": trials,
        "clients": clients,
        **totals,
        "failed_trials": [
            asdict(r) for r in results if (r.lost or r.duplicated or r.mismatched or r.integrity_failures)
        ],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=50)
    parser.add_argument("--clients", type=int, default=3)
    parser.add_argument("--kills", type=int, default=4, help="SIGKILLs per trial")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    print(json.dumps(run(args.trials, args.clients, args.kills, args.seed)))


if __name__ == "__main__":
    main()
