"""Edge inference benchmark: EdgeClient.predict end to end vs Keras, cold start, int8 vs float32.

One run, in one process plus a few short-lived child processes:

  1. A coordinator on an ephemeral loopback port publishes v1 (float32, int8, trainable-head and
     Keras artifacts). One trainer device fine-tunes v1 on the whole digits train split and syncs;
     ``aggregate_now()`` (FedBuff, buffer_size=1) publishes the trained v2. Every benchmarked
     device then syncs and installs v2, and the coordinator is stopped (no background threads).
  2. Warm latency of ``EdgeClient.predict`` per sample, end to end (input check, sha256, model
     lookup, cache lookup, LiteRT inference, correction lookup, one journal transaction), on
     distinct inputs so every call is a cache miss: LiteRT float32 and int8 with
     Durability.PROCESS (WAL, synchronous=NORMAL), float32 with Durability.POWER
     (synchronous=FULL). Then a cache hit (same inputs again, same version). Median and mean of
     per-call ``perf_counter_ns``.
  3. Keras ``model.predict`` on one sample (the published ``.keras`` v2 artifact), and the naive
     pattern: Keras ``model.predict`` + one ``sqlite3`` INSERT+COMMIT per event with the default
     rollback journal and ``synchronous=FULL``.
  4. Cold start: a fresh ``sys.executable`` child on a copy of an already-installed device home
     imports ``client``, opens an EdgeClient and predicts once. ``cold_start_s`` is the wall time
     from the parent's ``time.time()`` taken just before ``Popen`` (passed in argv) to the return
     of the first prediction, measured in the child with ``time.time()``: it includes fork/exec and
     interpreter start-up. The child also reports its own breakdown (``perf_counter`` from the
     first line of its script: imports / open / first predict), its peak RSS and whether
     TensorFlow is in ``sys.modules``. Median of several runs.
     Peak RSS is ``VmHWM`` from /proc/self/status, not ``getrusage(RUSAGE_SELF).ru_maxrss``: on Linux
     ru_maxrss survives execve, so a child forked from this (TensorFlow-laden, ~0.7 GB) parent
     reports the parent's peak. ru_maxrss is still shown (``ru_maxrss_mb``) for comparison; the
     child's own high-water mark is VmHWM, which starts afresh with the new address space.
  5. Sizes of the float32 and int8 ``.tflite`` and the accuracy of LiteRT float32, LiteRT int8
     and Keras on the digits test split. ``int8_accuracy_drop_points`` is in percentage points:
     (float_accuracy - int8_accuracy) * 100.
  6. A breakdown of where the microseconds of one warm ``predict`` go (the same steps as
     EdgeClient.predict, re-run inline with a timer around each).

Prints a table, then ONE JSON line. Run: .venv/bin/python bench/inference.py [--predictions N]
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import argparse  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import sqlite3  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402

import numpy as np  # noqa: E402

from fedsync._quiet import quiet_tensorflow_logs  # noqa: E402

quiet_tensorflow_logs()

from client import Durability, EdgeClient  # noqa: E402
from client.litert_runtime import LiteRTClassifier, check_sample  # noqa: E402
from fedsync.manifest import KERAS, TFLITE_FLOAT32, TFLITE_INT8  # noqa: E402
from fedsync.sim.data import load_digits_split  # noqa: E402

GOALS = {
    "warm_predict_us": 50.0,  # below
    "speedup_vs_keras": 1000.0,  # at least
    "cold_start_s": 0.5,  # below
    "rss_mb": 80.0,  # below
    "int8_size_ratio": 2.0,  # at least
    "int8_accuracy_drop_points": 1.0,  # at most
}

COLD_CHILD = r"""
import time
_T0 = time.perf_counter()
import sys
spawn_unix, repo, home, device_id, inference, x_path = sys.argv[1:7]
sys.path.insert(0, repo)
import json, resource
import numpy as np
from client import Durability, EdgeClient
_T_IMPORT = time.perf_counter()
x = np.load(x_path)
client = EdgeClient(home, device_id, inference=inference, fine_tuning=None, durability=Durability.PROCESS)
_T_OPEN = time.perf_counter()
prediction = client.predict(x)
_T_PRED = time.perf_counter()
wall = time.time() - float(spawn_unix)
tf = sorted(m for m in sys.modules if m == "tensorflow" or m.startswith("tensorflow."))
hwm_kb = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
try:  # what the client itself recorded for this cold start (client/process_stats.py)
    recorded = client.journal.conn.execute(
        "SELECT * FROM inference_stats WHERE seq = ?", (prediction.seq,)
    ).fetchone()
except Exception as exc:
    recorded = repr(exc)
print(json.dumps({
    "cold_start_s": wall,
    "child_imports_s": _T_IMPORT - _T0,
    "child_open_s": _T_OPEN - _T_IMPORT,
    "child_first_predict_s": _T_PRED - _T_OPEN,
    "child_script_s": _T_PRED - _T0,
    "rss_mb": hwm_kb / 1024.0,
    "ru_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
    "client_recorded": recorded,
    "tensorflow_in_sys_modules": bool(tf),
    "keras_in_sys_modules": "keras" in sys.modules,
    "label": prediction.label,
    "seq": prediction.seq,
}))
client.close()
"""


# --------------------------------------------------------------------------- helpers


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def summarize(ns: list[int]) -> dict[str, float]:
    us = [v / 1e3 for v in ns]
    return {
        "median_us": statistics.median(us),
        "mean_us": statistics.fmean(us),
        "p99_us": percentile(us, 99),
        "min_us": min(us),
        "n": len(us),
    }


def distinct_inputs(base: np.ndarray, n: int, seed: int) -> np.ndarray:
    """n inputs cycling over the test rows with a tiny perturbation: every row hashes differently."""
    rng = np.random.default_rng(seed)
    reps = -(-n // len(base))
    xs = np.tile(base, (reps, 1))[:n].astype(np.float32)
    xs += rng.uniform(0.0, 1e-4, size=xs.shape).astype(np.float32)
    hashes = {hashlib.sha256(np.ascontiguousarray(x).tobytes()).digest() for x in xs}
    assert len(hashes) == n, "perturbed inputs collide"
    return xs


def time_calls(fn: Callable[[np.ndarray], object], xs: np.ndarray) -> list[int]:
    out = []
    clock = time.perf_counter_ns
    for x in xs:
        start = clock()
        fn(x)
        out.append(clock() - start)
    return out


# --------------------------------------------------------------------------- set-up


def train_and_publish(root: Path, train, epochs: int, lr: float):
    from coordinator import Coordinator
    from fedsync.aggregation import Strategy

    coordinator = Coordinator(
        root / "coordinator",
        strategy=Strategy.fedbuff(buffer_size=1),
        auto_aggregate=False,
        publish_int8=True,
        publish_trainable_head=True,
    )
    coordinator.start("127.0.0.1:0")
    trainer = EdgeClient(root / "trainer", "trainer", durability=Durability.PROCESS)
    try:
        assert trainer.sync(coordinator.address).installed_version == 1
        trainer.fine_tune(train.x, train.y, epochs=epochs, learning_rate=lr)
        assert trainer.sync(coordinator.address).deltas_sent == 1
        published = coordinator.aggregate_now()
        assert published is not None and published.version == 2, published
    finally:
        trainer.close()
    return coordinator


def install_device(coordinator, home: Path, device_id: str, inference: str, durability: Durability) -> EdgeClient:
    client = EdgeClient(home, device_id, inference=inference, fine_tuning=None, durability=durability)
    report = client.sync(coordinator.address)
    assert client.model_version == 2, report
    return client


# --------------------------------------------------------------------------- measurements


def warm_predict(client: EdgeClient, xs: np.ndarray, warmup: int) -> tuple[dict[str, float], dict[str, float]]:
    """(cache-miss stats over xs, cache-hit stats over the first 2000 of xs again)."""
    for x in xs[:warmup]:  # warm-up on other inputs than the measured ones (perturbed differently)
        client.predict(x + np.float32(0.5))
    misses = time_calls(client.predict, xs)
    hit_inputs = xs[: min(len(xs), 2000)]
    assert client.predict(hit_inputs[0]).cached
    hits = time_calls(client.predict, hit_inputs)
    return summarize(misses), summarize(hits)


def predict_breakdown(client: EdgeClient, xs: np.ndarray) -> dict[str, float]:
    """Median µs of each step of EdgeClient.predict (the same calls, inline, timed per step).

    Mirrors client/edge.py's predict; keep in step with it if that changes. The journal step is
    one autocommit INSERT, or every RSS_SAMPLE_EVERY-th call / cache flush a transaction that
    also writes the stats row and the write-behind cache rows (medians hide those)."""
    import client.edge as edge_module

    clock = time.perf_counter_ns
    keys = (
        "check_sample",
        "sha256",
        "lock + _classifier()",
        "cache.get",
        "top1 (LiteRT set/invoke/get)",
        "cache.correction",
        "journal commit (1 INSERT)",
        "cache.put (memory)",
    )
    parts: dict[str, list[int]] = {k: [] for k in (*keys, "total")}
    for x in xs:
        t0 = clock()
        sample = check_sample(x)
        t1 = clock()
        input_hash = hashlib.sha256(sample).digest()
        t2 = clock()
        with client._lock:
            classifier, version = client._classifier()
            t3 = clock()
            cached = client.cache.get(input_hash, version)
            t4 = clock()
            model_label, confidence = edge_module.top1(classifier, sample)
            t5 = clock()
            correction = client.cache.correction(input_hash)
            corrected = correction is not None and correction.label != model_label
            label = correction.label if correction is not None else model_label
            t6 = clock()
            with edge_module._journal_writes():
                if not (client._inference_stats_due() or client.cache.flush_due()):
                    seq = client.journal.append_event(input_hash, model_label, confidence, version, 0.0)
                    client._predictions += 1
                else:
                    with client.journal.transaction():
                        seq = client.journal.append_event(input_hash, model_label, confidence, version, 0.0)
                        client.cache.flush()
                        client._record_inference_stats(seq, 0.0)
            t7 = clock()
            if cached is None:
                client.cache.put(input_hash, version, label, confidence, corrected)
            t8 = clock()
        stamps = (t0, t1, t2, t3, t4, t5, t6, t7, t8)
        for key, a, b in zip(keys, stamps[:-1], stamps[1:], strict=True):
            parts[key].append(b - a)
        parts["total"].append(t8 - t0)
    return {k: statistics.median(v) / 1e3 for k, v in parts.items()}


def keras_measurements(keras_path: Path, x_test: np.ndarray, y_test: np.ndarray, root: Path, calls: int):
    import keras

    model = keras.models.load_model(keras_path, compile=False)
    accuracy = float(np.mean(np.argmax(model.predict(x_test, verbose=0), axis=1) == y_test))
    conn = sqlite3.connect(root / "naive.db", isolation_level=None)
    conn.execute("PRAGMA synchronous=FULL")  # default rollback journal (DELETE)
    conn.execute(
        "CREATE TABLE events (seq INTEGER PRIMARY KEY, input_hash BLOB, label INTEGER, confidence REAL, "
        "model_version INTEGER, time_ns INTEGER)"
    )

    def naive(x: np.ndarray) -> None:
        probs = model.predict(x[None], verbose=0)[0]
        label = int(np.argmax(probs))
        conn.execute("BEGIN")
        conn.execute(
            "INSERT INTO events (input_hash, label, confidence, model_version, time_ns) VALUES (?, ?, ?, ?, ?)",
            (hashlib.sha256(x.tobytes()).digest(), label, float(probs[label]), 2, time.time_ns()),
        )
        conn.execute("COMMIT")

    def keras_only(x: np.ndarray) -> None:
        model.predict(x[None], verbose=0)

    for x in x_test[:20]:  # the first calls build and trace the predict function
        keras_only(x)
        naive(x)
    # Interleaved, so drift (warm-up, other load) hits both alike.
    keras_ns: list[int] = []
    naive_ns: list[int] = []
    for x in x_test[20 : 20 + calls]:
        keras_ns += time_calls(keras_only, x[None])
        naive_ns += time_calls(naive, x[None])
    journal_mode = conn.execute("PRAGMA journal_mode").fetchone()[0]
    conn.close()
    return accuracy, summarize(keras_ns), summarize(naive_ns), journal_mode


def cold_start(home: Path, device_id: str, inference: str, x_path: Path, root: Path, runs: int) -> list[dict]:
    results = []
    for i in range(runs):
        copy = root / f"cold-{inference}-{i}"
        shutil.copytree(home, copy)
        spawn = time.time()
        done = subprocess.run(
            [sys.executable, "-c", COLD_CHILD, repr(spawn), str(REPO), str(copy), device_id, inference, str(x_path)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        total = time.time() - spawn
        if done.returncode != 0:
            raise RuntimeError(f"cold-start child failed: {done.stderr[-2000:]}")
        result = json.loads(done.stdout.strip().splitlines()[-1])
        result["parent_total_s"] = total  # includes the child's shutdown
        results.append(result)
    return results


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--predictions", type=int, default=3000, help="measured cache-miss predictions per device")
    parser.add_argument("--warmup", type=int, default=300)
    parser.add_argument("--keras-calls", type=int, default=50)
    parser.add_argument("--cold-runs", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    train, test = load_digits_split(seed=0)
    root = Path(tempfile.mkdtemp(prefix="fedsync-bench-inference-"))
    try:
        return run(root, train, test, args)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def run(root: Path, train, test, args: argparse.Namespace) -> dict:
    t_setup = time.perf_counter()
    coordinator = train_and_publish(root, train, args.epochs, args.lr)
    try:
        devices = {
            "float32/PROCESS": install_device(
                coordinator, root / "f32-process", "f32-process", "float32", Durability.PROCESS
            ),
            "int8/PROCESS": install_device(coordinator, root / "i8-process", "i8-process", "int8", Durability.PROCESS),
            "float32/POWER": install_device(coordinator, root / "f32-power", "f32-power", "float32", Durability.POWER),
            "int8/POWER": install_device(coordinator, root / "i8-power", "i8-power", "int8", Durability.POWER),
        }
        cold_home = root / "cold-home"
        install_device(coordinator, cold_home, "cold", "float32", Durability.PROCESS).close()
        version_dir = coordinator.data_dir / "models" / "v2"
    finally:
        coordinator.stop()
    setup_s = time.perf_counter() - t_setup

    reference = devices["float32/PROCESS"]
    manifest = reference.models.manifest()
    assert manifest is not None and manifest.version == 2
    sizes = {kind: manifest.artifact(kind).size for kind in (TFLITE_FLOAT32, TFLITE_INT8, KERAS)}

    # Accuracy on the test split, batch inference with the installed artifacts.
    f32 = LiteRTClassifier(reference.models.artifact_path(TFLITE_FLOAT32))
    i8 = LiteRTClassifier(devices["int8/PROCESS"].models.artifact_path(TFLITE_INT8))
    float_accuracy = float(np.mean(f32.predict(test.x) == test.y))
    int8_accuracy = float(np.mean(i8.predict(test.x) == test.y))
    # The served labels (EdgeClient.predict) must agree with batch inference.
    served = np.array([reference.predict(x).label for x in test.x])
    assert np.array_equal(served, f32.predict(test.x)), "EdgeClient.predict disagrees with batch LiteRT"

    n = args.predictions
    warm: dict[str, tuple[dict, dict]] = {}
    for i, (name, client) in enumerate(devices.items()):
        count = n if name.endswith("PROCESS") else min(n, 2000)
        xs = distinct_inputs(test.x, count, seed=args.seed + 1 + i)
        warm[name] = warm_predict(client, xs, args.warmup)

    breakdown = predict_breakdown(reference, distinct_inputs(test.x, 2000, seed=args.seed + 99) + np.float32(0.25))
    breakdown_power = predict_breakdown(
        devices["float32/POWER"], distinct_inputs(test.x, 500, seed=args.seed + 98) + np.float32(0.25)
    )
    integrity = all(c.journal.integrity_ok() for c in devices.values())
    for client in devices.values():
        client.close()

    keras_accuracy, keras_stats, naive_stats, naive_mode = keras_measurements(
        version_dir / "model.keras", test.x, test.y, root, args.keras_calls
    )

    x_path = root / "cold-input.npy"
    np.save(x_path, test.x[7])
    cold = cold_start(cold_home, "cold", "float32", x_path, root, args.cold_runs)
    cold_s = statistics.median(r["cold_start_s"] for r in cold)
    rss_mb = statistics.median(r["rss_mb"] for r in cold)
    tf_loaded = any(r["tensorflow_in_sys_modules"] for r in cold)

    warm_us = warm["float32/PROCESS"][0]["median_us"]
    result = {
        "warm_predict_us": round(warm_us, 2),
        "warm_predict_mean_us": round(warm["float32/PROCESS"][0]["mean_us"], 2),
        "warm_predict_int8_us": round(warm["int8/PROCESS"][0]["median_us"], 2),
        "warm_predict_int8_mean_us": round(warm["int8/PROCESS"][0]["mean_us"], 2),
        "warm_predict_power_us": round(warm["float32/POWER"][0]["median_us"], 2),
        "warm_predict_power_mean_us": round(warm["float32/POWER"][0]["mean_us"], 2),
        "warm_predict_int8_power_us": round(warm["int8/POWER"][0]["median_us"], 2),
        "cache_hit_us": round(warm["float32/PROCESS"][1]["median_us"], 2),
        "cache_hit_mean_us": round(warm["float32/PROCESS"][1]["mean_us"], 2),
        "cache_hit_power_us": round(warm["float32/POWER"][1]["median_us"], 2),
        "cold_start_s": round(cold_s, 4),
        "cold_start_runs": len(cold),
        "cold_child_imports_s": round(statistics.median(r["child_imports_s"] for r in cold), 4),
        "cold_child_open_s": round(statistics.median(r["child_open_s"] for r in cold), 4),
        "cold_child_first_predict_s": round(statistics.median(r["child_first_predict_s"] for r in cold), 4),
        "rss_mb": round(rss_mb, 1),
        "ru_maxrss_inherited_mb": round(statistics.median(r["ru_maxrss_mb"] for r in cold), 1),
        "keras_predict_us": round(keras_stats["median_us"], 1),
        "naive_keras_sqlite_us": round(naive_stats["median_us"], 1),
        "speedup_vs_keras": round(keras_stats["median_us"] / warm_us, 1),
        "speedup_vs_naive": round(naive_stats["median_us"] / warm_us, 1),
        "float32_tflite_bytes": sizes[TFLITE_FLOAT32],
        "int8_tflite_bytes": sizes[TFLITE_INT8],
        "keras_bytes": sizes[KERAS],
        "int8_size_ratio": round(sizes[TFLITE_FLOAT32] / sizes[TFLITE_INT8], 3),
        "float_accuracy": round(float_accuracy, 4),
        "int8_accuracy": round(int8_accuracy, 4),
        "keras_accuracy": round(keras_accuracy, 4),
        "int8_accuracy_drop": round(float_accuracy - int8_accuracy, 5),  # as a fraction of the test split
        "int8_accuracy_drop_points": round((float_accuracy - int8_accuracy) * 100, 3),
        "tensorflow_in_lean_process": tf_loaded,
        "journal_integrity_ok": integrity,
        "predictions_per_device": n,
        "setup_s": round(setup_s, 1),
    }
    goals = {
        "warm_predict_us": result["warm_predict_us"] < GOALS["warm_predict_us"],
        "speedup_vs_keras": result["speedup_vs_keras"] >= GOALS["speedup_vs_keras"],
        "cold_start_s": result["cold_start_s"] < GOALS["cold_start_s"],
        "rss_mb": result["rss_mb"] < GOALS["rss_mb"],
        "tensorflow_in_lean_process": not tf_loaded,
        "int8_size_ratio": result["int8_size_ratio"] >= GOALS["int8_size_ratio"],
        "int8_accuracy_drop_points": result["int8_accuracy_drop_points"] <= GOALS["int8_accuracy_drop_points"],
    }
    result["goals_met"] = goals

    print_report(result, warm, keras_stats, naive_stats, naive_mode, cold, breakdown, breakdown_power)
    print(json.dumps(result, sort_keys=True))
    return result


def print_report(result, warm, keras_stats, naive_stats, naive_mode, cold, breakdown, breakdown_power) -> None:
    print("\nEdgeClient.predict, warm, one sample (µs; cache misses unless noted)")
    print(f"  {'config':<34}{'median':>10}{'mean':>10}{'p99':>10}{'min':>10}{'n':>7}")
    for name, (miss, hit) in warm.items():
        for label, stats in ((f"LiteRT {name}", miss), (f"LiteRT {name}, cache hit", hit)):
            print(
                f"  {label:<34}{stats['median_us']:>10.1f}{stats['mean_us']:>10.1f}{stats['p99_us']:>10.1f}"
                f"{stats['min_us']:>10.1f}{stats['n']:>7}"
            )
    for label, stats in (
        ("Keras model.predict", keras_stats),
        (f"Keras + sqlite commit ({naive_mode}, FULL)", naive_stats),
    ):
        print(
            f"  {label:<34}{stats['median_us']:>10.1f}{stats['mean_us']:>10.1f}{stats['p99_us']:>10.1f}"
            f"{stats['min_us']:>10.1f}{stats['n']:>7}"
        )

    print("\nWhere a warm predict's µs go (median per step; float32 PROCESS | float32 POWER)")
    for key in breakdown:
        print(f"  {key:<36}{breakdown[key]:>10.1f}{breakdown_power[key]:>10.1f}")

    print("\nCold start (fresh interpreter -> first prediction on an installed home)")
    print(
        f"  {'run':<5}{'wall s':>9}{'imports':>9}{'open':>9}{'predict':>9}{'VmHWM MB':>10}{'ru_maxrss':>11}"
        f"{'TF?':>5}  client-recorded cold_start_s"
    )
    for i, r in enumerate(cold):
        recorded = r.get("client_recorded")
        recorded_s = recorded[-1] if isinstance(recorded, list) and recorded else recorded
        print(
            f"  {i:<5}{r['cold_start_s']:>9.3f}{r['child_imports_s']:>9.3f}{r['child_open_s']:>9.3f}"
            f"{r['child_first_predict_s']:>9.3f}{r['rss_mb']:>10.1f}{r['ru_maxrss_mb']:>11.1f}"
            f"{'yes' if r['tensorflow_in_sys_modules'] else 'no':>5}  {recorded_s}"
        )

    print("\nModels (v2, trained on the whole digits train split)")
    print(f"  float32 .tflite {result['float32_tflite_bytes']:>8} B  accuracy {result['float_accuracy']:.4f}")
    print(f"  int8 .tflite    {result['int8_tflite_bytes']:>8} B  accuracy {result['int8_accuracy']:.4f}")
    print(f"  keras           {result['keras_bytes']:>8} B  accuracy {result['keras_accuracy']:.4f}")
    print(
        f"  int8 is {result['int8_size_ratio']:.2f}x smaller, accuracy drop "
        f"{result['int8_accuracy_drop_points']:.2f} percentage points"
    )

    print("\nGoals")
    for key, ok in result["goals_met"].items():
        target = GOALS.get(key)
        value = result[key]
        print(f"  {key:<28}{value!s:>12}  goal {target!s:>8}  {'met' if ok else 'MISSED'}")
    print()


if __name__ == "__main__":
    main()
