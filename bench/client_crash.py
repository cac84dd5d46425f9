"""Client crash durability: kill -9 an EdgeClient process at random moments, then check its state.

The issue's requirement: "After kill -9 at any moment during predict, fine-tune, model install or
sync, the journal passes PRAGMA integrity_check, no journaled event is lost or duplicated, and the
model store is on a valid version."

Set-up: a coordinator runs in this process on an ephemeral loopback port with auto_aggregate=True
and Strategy.fedbuff(buffer_size=1), so every delta a device sends publishes a new version and the
device's next sync installs it.

Each trial:
  1. A child process (``sys.executable -c``) opens an EdgeClient on the device's home (the same
     home across trials: every trial restarts a crashed device) and loops: predict (each returned
     ``Prediction.seq`` is written to the child's log as ``event <seq>`` and flushed: a printed seq
     is a journaled event), fine_tune every ``k`` predictions (``delta <seq>``), sync every ``m``
     predictions (``synced``). Before each operation it logs ``begin <op>``, so the last line tells
     which operation the kill interrupted. The log is a file, not a pipe, so the child never blocks
     on a full pipe.
  2. The parent SIGKILLs the child at a seeded random moment: 15% of trials in the first 0.5 s
     after spawn (imports, journal open and recovery), 20% 0-15 ms after the child logs
     "begin install" (model install inside a sync: download, sha256 check, rename, smoke test,
     CURRENT switch), the rest uniformly in a window after the child logged "opened" (the loop).
     The child's log says which operation was interrupted (kills_by_phase); a ``.staging-vN``
     folder left behind shows a kill mid-download (kills_left_staging). A failed sync (an RPC
     error) is logged and the child goes on, as a device would (sync_errors).
  3. Checks on the dead child's state, read directly from disk:
       * the journal passes ``PRAGMA integrity_check``;
       * every printed event and delta seq is in the journal (else: lost);
       * event and delta seqs are exactly 1..max (a gap is a lost row, a repeated seq or a repeated
         (input_hash, time_ns) event is a duplicate);
       * the model store's CURRENT is 0 only if nothing was ever installed, otherwise names a
         version folder whose manifest parses, has that version, lists every artifact kind the
         device needs, and whose files all match the manifest's sha256 and size; CURRENT never goes
         backwards across trials.
  4. A verifier child opens the same home, syncs once and exits. Then the coordinator must hold
     each journal event exactly once with the same content (``SELECT ... FROM events WHERE
     device_id = ? ORDER BY seq`` equals the journal's rows) and each journal delta exactly once
     (same seq and payload sha256); the journal's ack marks must cover everything; the model store
     is checked again (the verifier's sync may have installed a version).

Prints a summary table, then ONE JSON line. Run:
    .venv/bin/python bench/client_crash.py [--trials 30] [--seed 0] [--durability POWER|PROCESS]
                                           [--fine-tuning head|keras|both]
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import random  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import sqlite3  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections import Counter  # noqa: E402
from dataclasses import asdict, dataclass, field  # noqa: E402
from typing import Any  # noqa: E402

# Artifact kinds a device needs, by fine-tuning profile (float32 inference in every case).
NEEDED_KINDS = {
    "head": ("tflite-float32", "tflite-trainable-head"),
    "keras": ("tflite-float32", "keras"),
}

# Kill windows (seconds after spawn) per fine-tuning profile: they cover the child's start-up and a
# few loop rounds. A Keras device imports TensorFlow on its first fine-tune, which takes seconds.
DEFAULT_WINDOW_S = {"head": 2.0, "keras": 8.0}

CHILD = r"""
import os, sys, threading
threading.Timer(float(sys.argv[9]), os._exit, (3,)).start()  # never outlive a lost parent
sys.path.insert(0, sys.argv[1])
home, device_id, address, durability, fine_tuning = sys.argv[2:7]
k, m = int(sys.argv[7]), int(sys.argv[8])
seed = int(sys.argv[10])
log = open(sys.argv[11], "a", buffering=1)
data_path = sys.argv[12]

def out(line):
    log.write(line + "\n")
    log.flush()

out("begin import")
import numpy as np
from client import Durability, EdgeClient

data = np.load(data_path)  # the digits split, saved by the parent (no scikit-learn import here)
train_x, train_y, test_x = data["train_x"], data["train_y"], data["test_x"]
out("begin open")
client = EdgeClient(home, device_id, fine_tuning=fine_tuning, durability=Durability[durability])
_install = client.models.install


def install(*args, **kwargs):  # log the model-install step of a sync (download, verify, switch)
    out("begin install")
    version = _install(*args, **kwargs)
    out(f"installed {version}")
    return version


client.models.install = install
out("opened")
rng = np.random.default_rng(seed)

def sync():
    # A real device retries a failed sync later: log the error and go on working offline.
    out("begin sync")
    try:
        report = client.sync(address, timeout_s=20.0)
    except Exception as exc:
        out("sync_error " + " ".join(f"{type(exc).__name__}: {getattr(exc, 'details', lambda: exc)()}".split()))
        return
    out(f"synced {report.installed_version or 0}")


while client.model_version == 0:  # nothing to serve before the first install
    sync()
i = 0
while True:
    row = int(rng.integers(len(test_x)))
    # Half exact test rows (repeats hit the prediction cache), half perturbed (misses).
    x = test_x[row] if rng.random() < 0.5 else test_x[row] + rng.uniform(0, 1e-3, 64).astype(np.float32)
    out("begin predict")
    prediction = client.predict(x)
    out(f"event {prediction.seq}")
    i += 1
    if i % k == 0:
        idx = rng.choice(len(train_x), size=64, replace=False)
        out("begin fine_tune")
        seq = client.fine_tune(train_x[idx], train_y[idx], epochs=2, learning_rate=0.1, seed=i)
        out(f"delta {seq}")
    if i % m == 0:
        sync()
"""

VERIFIER = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
from client import Durability, EdgeClient
client = EdgeClient(sys.argv[2], sys.argv[3], fine_tuning=sys.argv[6], durability=Durability[sys.argv[5]])
errors = []
for _ in range(3):  # sync is idempotent: a failed attempt is retried (and reported)
    try:
        report = client.sync(sys.argv[4], timeout_s=30.0, attempts=5)
        break
    except Exception as exc:
        errors.append(" ".join(f"{type(exc).__name__}: {getattr(exc, 'details', lambda: exc)()}".split()))
else:
    raise SystemExit("verifier sync failed 3 times: " + " | ".join(errors))
print(json.dumps({
    "sync_errors": errors,
    "events_sent": report.events_sent,
    "deltas_sent": report.deltas_sent,
    "installed_version": report.installed_version,
    "install_error": report.install_error,
    "events_acked": client.journal.events_acked(),
    "deltas_acked": client.journal.deltas_acked(),
    "pending_events": client.journal.pending_event_count(),
    "pending_deltas": client.journal.pending_delta_count(),
}))
client.close()
"""


@dataclass
class TrialResult:
    trial: int
    device_id: str
    fine_tuning: str
    durability: str
    kill_after_s: float  # after spawn ("startup"), "begin install" ("install") or "opened" ("loop")
    kill_mode: str
    killed: bool  # the child was still running when the kill came
    phase: str  # what the child was doing when killed ("open", "predict", ..., or "between")
    printed_events: int
    printed_deltas: int
    new_events: int = 0  # journal events this trial added (the journal accumulates across trials)
    journal_events: int = 0
    journal_deltas: int = 0
    lost: int = 0
    duplicated: int = 0
    integrity_ok: bool = True
    store_version: int = 0
    install_interrupted: bool = False  # a .staging-vN folder was left: killed mid-download/verify
    store_ok: bool = True
    store_after_sync_ok: bool = True
    coordinator_events_match: bool = True
    coordinator_deltas_match: bool = True
    unacked_after_sync: int = 0
    child_error: str = ""
    verifier_error: str = ""
    sync_errors: list[str] = field(default_factory=list)  # failed syncs (child and verifier), retried
    problems: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.problems


# --------------------------------------------------------------------------- coordinator


def start_coordinator(data_dir: Path) -> Any:
    from fedsync._quiet import quiet_tensorflow_logs

    quiet_tensorflow_logs()
    from coordinator import Coordinator
    from fedsync.aggregation import Strategy

    coordinator = Coordinator(data_dir, strategy=Strategy.fedbuff(buffer_size=1), auto_aggregate=True)
    coordinator.start("127.0.0.1:0")
    return coordinator


# --------------------------------------------------------------------------- checks


def read_log(path: Path) -> tuple[list[int], list[int], str, list[str]]:
    """(printed event seqs, printed delta seqs, phase at the kill, sync errors) from the child's log."""
    events: list[int] = []
    deltas: list[int] = []
    errors: list[str] = []
    phase = "spawn"  # killed before the child wrote anything
    if not path.exists():
        return events, deltas, phase, errors
    for line in path.read_text().splitlines():
        parts = line.split()
        if len(parts) < 1:
            continue
        if parts[0] == "sync_error":
            errors.append(line[len("sync_error ") :])
            phase = "between"
        elif parts[0] == "begin" and len(parts) == 2:
            phase = parts[1]
        elif parts[0] == "event" and len(parts) == 2 and parts[1].isdigit():
            events.append(int(parts[1]))
            phase = "between"
        elif parts[0] == "delta" and len(parts) == 2 and parts[1].isdigit():
            deltas.append(int(parts[1]))
            phase = "between"
        elif parts[0] in ("synced", "opened"):
            phase = "between"
        elif parts[0] == "installed":
            phase = "sync"  # the rest of the sync session
    return events, deltas, phase, errors


def journal_rows(home: Path) -> tuple[bool, list[tuple], list[tuple], tuple[int, int]]:
    """(integrity ok, event rows, delta rows (seq, payload_sha256), (events_acked, deltas_acked))."""
    path = home / "journal.db"
    if not path.exists():
        return True, [], [], (0, 0)
    conn = sqlite3.connect(path, timeout=30.0)
    try:
        integrity = conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        events = (
            conn.execute(
                "SELECT seq, input_hash, label, confidence, model_version, time_ns FROM events ORDER BY seq"
            ).fetchall()
            if "events" in tables
            else []
        )
        deltas = (
            conn.execute("SELECT seq, payload_sha256 FROM deltas ORDER BY seq").fetchall() if "deltas" in tables else []
        )
        meta = dict(conn.execute("SELECT key, value FROM meta").fetchall()) if "meta" in tables else {}
    finally:
        conn.close()
    return integrity, events, deltas, (int(meta.get("events_acked", 0)), int(meta.get("deltas_acked", 0)))


def count_lost_duplicated(printed: list[int], seqs: list[int], content_keys: list[Any]) -> tuple[int, int, list[str]]:
    problems = []
    present = set(seqs)
    missing = [s for s in printed if s not in present]
    gaps = sorted(set(range(1, max(seqs) + 1)) - present) if seqs else []
    repeated = sum(n - 1 for n in Counter(seqs).values() if n > 1)
    repeated += sum(n - 1 for n in Counter(content_keys).values() if n > 1)
    lost = len(set(missing) | set(gaps))
    if missing:
        problems.append(f"printed seqs missing from the journal: {missing[:10]}")
    if gaps:
        problems.append(f"seq gaps: {gaps[:10]}")
    if repeated:
        problems.append(f"{repeated} duplicated rows")
    return lost, repeated, problems


def check_model_store(root: Path, needed_kinds: tuple[str, ...]) -> tuple[int, list[str]]:
    """(CURRENT version, problems). Verifies the installed version the device would serve."""
    from fedsync.manifest import Manifest, sha256_file

    current_path = root / "CURRENT"
    if not current_path.exists():
        return 0, []
    text = current_path.read_text().strip()
    if not text.isdigit():
        return -1, [f"CURRENT holds {text!r}"]
    version = int(text)
    if version == 0:
        return 0, []
    folder = root / f"v{version}"
    try:
        manifest = Manifest.from_json((folder / "manifest.json").read_bytes())
    except Exception as exc:
        return version, [f"v{version}: manifest unreadable: {exc}"]
    problems = []
    if manifest.version != version:
        problems.append(f"v{version}: manifest says version {manifest.version}")
    by_name = {a.name: a for a in manifest.artifacts}
    for kind in needed_kinds:
        artifact = manifest.artifact(kind)
        if artifact is None or not (folder / artifact.name).exists():
            problems.append(f"v{version}: {kind} artifact missing")
    for path in sorted(folder.iterdir()):
        if path.name == "manifest.json":
            continue
        artifact = by_name.get(path.name)
        if artifact is None:
            problems.append(f"v{version}: stray file {path.name}")
        elif path.stat().st_size != artifact.size or sha256_file(path) != artifact.sha256:
            problems.append(f"v{version}: {path.name} does not match its manifest sha256/size")
    return version, problems


def coordinator_rows(coordinator: Any, device_id: str) -> tuple[list[tuple], list[tuple]]:
    path = coordinator.data_dir / "coordinator.db"
    conn = sqlite3.connect(path, timeout=60.0)  # a reader next to the server's connection (WAL)
    try:
        events = conn.execute(
            "SELECT seq, input_hash, label, confidence, model_version, time_ns FROM events "
            "WHERE device_id = ? ORDER BY seq",
            (device_id,),
        ).fetchall()
        deltas = conn.execute(
            "SELECT seq, payload_sha256 FROM deltas WHERE device_id = ? ORDER BY seq", (device_id,)
        ).fetchall()
    finally:
        conn.close()
    return events, deltas


# --------------------------------------------------------------------------- one trial


def ensure_data(folder: Path) -> Path:
    """The digits split as .npz, so the children skip scikit-learn (seconds of start-up under load)."""
    path = folder / "digits.npz"
    if not path.exists():
        import numpy as np

        from fedsync.sim.data import load_digits_split

        train, test = load_digits_split()
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / "digits.tmp.npz"
        np.savez(tmp, train_x=train.x, train_y=train.y, test_x=test.x)
        tmp.replace(path)
    return path


def wait_for_line(path: Path, prefix: str, child: subprocess.Popen, timeout_s: float) -> bool:
    """Wait until the child's log has a line starting with `prefix`; False if it exited or timed out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and child.poll() is None:
        if path.exists() and any(line.startswith(prefix) for line in path.read_text().splitlines()):
            return True
        time.sleep(0.005)
    return False


def run_trial(
    coordinator: Any,
    home: Path,
    device_id: str,
    *,
    trial: int = 0,
    seed: int = 0,
    durability: str = "POWER",
    fine_tuning: str = "head",
    kill_window_s: float | None = None,
    startup_fraction: float = 0.15,
    install_fraction: float = 0.2,
    startup_window_s: float = 0.5,
    fine_tune_every: int = 30,
    sync_every: int = 60,
    min_version: int = 0,
    timeout_s: float = 60.0,
) -> TrialResult:
    """One kill -9 trial on the device at `home`; `min_version` is CURRENT before it (never go back).

    Kill schedule, drawn per trial: with probability `startup_fraction` uniformly in the first
    `startup_window_s` after spawn (imports, journal open and recovery); with probability
    `install_fraction` 0-15 ms after the child logs "begin install" (a model install in a sync:
    download, sha256 verification, rename, smoke test, CURRENT switch); otherwise uniformly in the
    `kill_window_s` after the child logged "opened" (the operation loop)."""
    started = time.perf_counter()
    rng = random.Random(f"{seed}:{trial}:{device_id}")
    window = DEFAULT_WINDOW_S[fine_tuning] if kill_window_s is None else kill_window_s
    draw = rng.random()
    mode = "startup" if draw < startup_fraction else "install" if draw < startup_fraction + install_fraction else "loop"
    kill_after = {
        "startup": rng.uniform(0.0, startup_window_s),
        "install": rng.uniform(0.0, 0.015),
        "loop": rng.uniform(0.0, window),
    }[mode]
    home.mkdir(parents=True, exist_ok=True)
    data_path = ensure_data(home.parent)
    log_path = home.parent / f"{device_id}.trial{trial}.log"
    err_path = home.parent / f"{device_id}.trial{trial}.err"
    log_path.unlink(missing_ok=True)
    with open(err_path, "w") as err:
        child = subprocess.Popen(
            [
                sys.executable,
                "-c",
                CHILD,
                str(REPO),
                str(home),
                device_id,
                coordinator.address,
                durability,
                fine_tuning,
                str(fine_tune_every),
                str(sync_every),
                str(timeout_s),
                str(rng.randrange(2**31)),
                str(log_path),
                str(data_path),
            ],
            stdout=subprocess.DEVNULL,
            stderr=err,
            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
        )
        try:
            if mode == "loop":
                wait_for_line(log_path, "opened", child, timeout_s)
            elif mode == "install" and not wait_for_line(log_path, "begin install", child, timeout_s / 2):
                mode = "loop (no install came)"
            child.wait(timeout=kill_after)
            killed = False
        except subprocess.TimeoutExpired:
            child.send_signal(signal.SIGKILL)
            killed = True
        finally:
            if child.poll() is None:  # a failure above: never leave the child running
                child.kill()
        child.wait(timeout=30)
    printed_events, printed_deltas, phase, sync_errors = read_log(log_path)
    result = TrialResult(
        trial=trial,
        device_id=device_id,
        fine_tuning=fine_tuning,
        durability=durability,
        kill_after_s=round(kill_after, 3),
        kill_mode=mode,
        killed=killed,
        phase=phase if killed else "exited",
        printed_events=len(printed_events),
        printed_deltas=len(printed_deltas),
        sync_errors=sync_errors,
    )
    if not killed:
        result.child_error = err_path.read_text()[-2000:] or f"exit status {child.returncode}"
        result.problems.append(f"child exited by itself with status {child.returncode}")

    # -- the dead child's state on disk
    integrity, events, deltas, _ = journal_rows(home)
    result.integrity_ok = integrity
    if not integrity:
        result.problems.append("journal integrity_check failed")
    result.journal_events, result.journal_deltas = len(events), len(deltas)
    lost_e, dup_e, problems_e = count_lost_duplicated(
        printed_events, [e[0] for e in events], [(e[1], e[5]) for e in events]
    )
    lost_d, dup_d, problems_d = count_lost_duplicated(printed_deltas, [d[0] for d in deltas], [])
    result.lost, result.duplicated = lost_e + lost_d, dup_e + dup_d
    result.problems += [f"events: {p}" for p in problems_e] + [f"deltas: {p}" for p in problems_d]
    needed = NEEDED_KINDS[fine_tuning]
    version, store_problems = check_model_store(home / "models", needed)
    result.store_version = version
    result.install_interrupted = any((home / "models").glob(".staging-v*"))
    if version < min_version:
        store_problems.append(f"CURRENT went back from v{min_version} to v{version}")
    result.store_ok = not store_problems
    result.problems += store_problems

    # -- restart: a verifier child syncs once; the coordinator must hold every event exactly once
    try:
        done = subprocess.run(
            [
                sys.executable,
                "-c",
                VERIFIER,
                str(REPO),
                str(home),
                device_id,
                coordinator.address,
                durability,
                fine_tuning,
            ],
            capture_output=True,
            text=True,
            timeout=timeout_s,
        )
        if done.returncode != 0:
            raise RuntimeError(done.stderr[-2000:])
        verifier = json.loads(done.stdout.strip().splitlines()[-1])
    except Exception as exc:
        result.verifier_error = str(exc)[-2000:]
        result.problems.append("verifier sync failed")
        result.seconds = round(time.perf_counter() - started, 2)
        return result
    result.sync_errors += verifier.get("sync_errors", [])
    integrity, events_after, deltas_after, acked = journal_rows(home)
    if not integrity:
        result.integrity_ok = False
        result.problems.append("journal integrity_check failed after the verifier's sync")
    if events_after != events or deltas_after != deltas:
        result.problems.append("the verifier changed the journal's events or deltas")
    coord_events, coord_deltas = coordinator_rows(coordinator, device_id)
    journal_set = set(events_after)
    coord_counts = Counter(coord_events)
    missing_at_coordinator = [e[0] for e in events_after if e not in coord_counts]
    extra_at_coordinator = [e[0] for e in coord_events if e not in journal_set]
    result.duplicated += sum(n - 1 for n in coord_counts.values() if n > 1) + len(extra_at_coordinator)
    result.lost += len(missing_at_coordinator)
    result.coordinator_events_match = coord_events == events_after
    if not result.coordinator_events_match:
        result.problems.append(
            f"coordinator events differ: missing {missing_at_coordinator[:10]}, extra {extra_at_coordinator[:10]}"
        )
    result.coordinator_deltas_match = coord_deltas == deltas_after
    if not result.coordinator_deltas_match:
        missing = sorted({d[0] for d in deltas_after} - {d[0] for d in coord_deltas})
        extra = sorted({d[0] for d in coord_deltas} - {d[0] for d in deltas_after})
        result.lost += len(missing)
        result.duplicated += len(extra)
        result.problems.append(f"coordinator deltas differ: missing {missing[:10]}, extra {extra[:10]}")
    last_event = events_after[-1][0] if events_after else 0
    last_delta = deltas_after[-1][0] if deltas_after else 0
    result.unacked_after_sync = max(0, last_event - acked[0]) + max(0, last_delta - acked[1])
    if result.unacked_after_sync:
        result.problems.append(f"after sync the journal still has {result.unacked_after_sync} unacked rows")
    if verifier.get("install_error"):
        result.problems.append(f"verifier install error: {verifier['install_error']}")
    version_after, problems_after = check_model_store(home / "models", needed)
    if version_after < max(version, min_version):
        problems_after.append(f"CURRENT went back to v{version_after} after the verifier's sync")
    result.store_after_sync_ok = not problems_after
    result.problems += [f"after sync: {p}" for p in problems_after]
    result.store_version = max(version, version_after)
    result.seconds = round(time.perf_counter() - started, 2)
    return result


# --------------------------------------------------------------------------- many trials


def run_trials(
    coordinator: Any,
    root: Path,
    trials: int,
    *,
    seed: int = 0,
    durability: str = "POWER",
    fine_tuning: str = "head",
    kill_window_s: float | None = None,
    device_prefix: str = "crash",
    on_result: Any = None,
) -> list[TrialResult]:
    """`trials` trials; fine_tuning "both" alternates a head device and a Keras device."""
    profiles = ["head", "keras"] if fine_tuning == "both" else [fine_tuning]
    versions = dict.fromkeys(profiles, 0)
    events_before = dict.fromkeys(profiles, 0)
    results = []
    for i in range(trials):
        profile = profiles[i % len(profiles)]
        device_id = f"{device_prefix}-{profile}-{durability.lower()}"
        result = run_trial(
            coordinator,
            root / device_id,
            device_id,
            trial=i,
            seed=seed,
            durability=durability,
            fine_tuning=profile,
            kill_window_s=kill_window_s,
            min_version=versions[profile],
        )
        versions[profile] = max(versions[profile], result.store_version)
        result.new_events = result.journal_events - events_before[profile]
        events_before[profile] = result.journal_events
        results.append(result)
        if on_result is not None:
            on_result(result)
    return results


def summarize(results: list[TrialResult]) -> dict[str, Any]:
    return {
        "trials": len(results),
        "kills": sum(r.killed for r in results),
        # distinct journal events checked (each trial re-checks all earlier ones too)
        "events_checked": sum(r.new_events for r in results),
        "event_checks": sum(r.journal_events for r in results),
        "deltas_checked": max((r.journal_deltas for r in results), default=0),
        "lost": sum(r.lost for r in results),
        "duplicated": sum(r.duplicated for r in results),
        "integrity_failures": sum(not r.integrity_ok for r in results),
        "invalid_model_store": sum(not (r.store_ok and r.store_after_sync_ok) for r in results),
        "coordinator_mismatches": sum(not (r.coordinator_events_match and r.coordinator_deltas_match) for r in results),
        "unacked_after_sync": sum(r.unacked_after_sync for r in results),
        "child_errors": sum(bool(r.child_error) for r in results),
        "verifier_errors": sum(bool(r.verifier_error) for r in results),
        "failed_trials": sum(not r.ok for r in results),
        # syncs that raised (the device retries later); not a durability failure, but reported
        "sync_errors": sum(len(r.sync_errors) for r in results),
        "sync_error_kinds": dict(Counter(e[:120] for r in results for e in r.sync_errors)),
        "kills_by_phase": dict(sorted(Counter(r.phase for r in results).items())),
        "kills_by_mode": dict(sorted(Counter(r.kill_mode for r in results).items())),
        "kills_left_staging": sum(r.install_interrupted for r in results),
    }


def print_row(r: TrialResult, file: Any = None) -> None:
    print(
        f"{r.trial:>5} {r.fine_tuning:<6}{r.durability:<8}{r.kill_mode[:8]:<9}{r.kill_after_s:>7.3f} {r.phase:<10}"
        f"{r.printed_events:>7}{r.journal_events:>7}{r.printed_deltas:>6}{r.journal_deltas:>6}"
        f"{r.store_version:>5}{r.lost:>5}{r.duplicated:>5}  {'ok' if r.ok else 'FAIL: ' + '; '.join(r.problems)}"
        f"  ({r.seconds:.1f}s)",
        file=file,
        flush=True,
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--durability", choices=("POWER", "PROCESS"), default="POWER")
    parser.add_argument("--fine-tuning", choices=("head", "keras", "both"), default="both")
    parser.add_argument("--kill-window", type=float, default=None, help="seconds after spawn (default per profile)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = parser.parse_args(argv)

    # The coordinator's publisher points fd 1 and 2 at /dev/null while it converts a model (in its
    # aggregation thread): print through a duplicate of stdout taken now, which that leaves alone.
    console = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
    root = Path(tempfile.mkdtemp(prefix="fedsync-client-crash-"))
    coordinator = start_coordinator(root / "coordinator")
    print(
        f"\n{'trial':>5} {'ft':<6}{'durab.':<8}{'mode':<9}{'kill@s':>7} {'phase':<10}{'ev.pr':>7}{'ev.jn':>7}"
        f"{'d.pr':>6}{'d.jn':>6}{'ver':>5}{'lost':>5}{'dup':>5}",
        file=console,
    )
    try:
        results = run_trials(
            coordinator,
            root / "devices",
            args.trials,
            seed=args.seed,
            durability=args.durability,
            fine_tuning=args.fine_tuning,
            kill_window_s=args.kill_window,
            on_result=lambda r: print_row(r, console),
        )
        published = coordinator.version
    finally:
        coordinator.stop()
        if args.keep:
            print(f"kept {root}", file=console)
        else:
            shutil.rmtree(root, ignore_errors=True)
    summary = summarize(results)
    summary.update(
        {
            "seed": args.seed,
            "durability": args.durability,
            "fine_tuning": args.fine_tuning,
            "coordinator_versions_published": published,
        }
    )
    print("\nSummary", file=console)
    for key, value in summary.items():
        print(f"  {key:<32}{value}", file=console)
    failed = [asdict(r) for r in results if not r.ok]
    for r in failed[:5]:
        detail = f"{r['child_error'][-500:]} {r['verifier_error'][-500:]}"
        print(f"  failed trial {r['trial']}: {r['problems']} {detail}", file=console)
    print(json.dumps(summary, sort_keys=True), file=console)
    console.flush()
    return summary


if __name__ == "__main__":
    main()
