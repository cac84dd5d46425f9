"""Aggregation throughput benchmark.

Measures, in one run:
  * np.add streaming bandwidth: ``acc += x`` over 100 distinct float32 arrays of 1M values;
  * weighted_mean of K=100 encoded deltas of 1M float32 params (4 tensors) per codec;
  * wire size of float32 vs int8 payloads;
  * conflict-resolution merge throughput, if fedsync.conflicts provides it.

Prints a table, then one JSON line with the figures. GB/s for a codec is the
encoded payload bytes read per second (for float32: 100 x 4 MiB / time).

Run: .venv/bin/python bench/aggregate.py
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from fedsync.aggregation import Update, weighted_mean
from fedsync.codecs import EncodedDelta

NUM_DELTAS = 100
PARAMS = 1 << 20
SHAPES = {f"layer{i}/kernel": (512, 512) for i in range(4)}  # 4 x 262144 = 1M params
CODECS = {"f32": "float32", "f16": "float16", "int8": "int8", "int8c": "int8-channel"}
GB = 1e9


def timed(run: Callable[[], object]) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def make_updates(rng: np.random.Generator) -> dict[str, list[Update]]:
    updates: dict[str, list[Update]] = {key: [] for key in CODECS}
    for i in range(NUM_DELTAS):
        delta = {name: rng.standard_normal(shape, dtype=np.float32) * 0.01 for name, shape in SHAPES.items()}
        examples = int(rng.integers(10, 1000))
        for key, codec in CODECS.items():
            updates[key].append(Update(EncodedDelta.encode(codec, delta), examples, 0, f"device-{i}"))
    return updates


def bench(rng: np.random.Generator, repeats: int = 5) -> tuple[float, dict[str, dict[str, float]]]:
    """Best-of-``repeats`` timings; np.add and each codec alternate so load drift hits all alike."""
    arrays = [rng.standard_normal(PARAMS, dtype=np.float32) for _ in range(NUM_DELTAS)]
    acc = np.zeros(PARAMS, dtype=np.float32)

    def np_add() -> None:
        for x in arrays:
            np.add(acc, x, out=acc)

    updates = make_updates(rng)
    rule = weighted_mean()
    weights = np.array([u.num_examples for u in updates["f32"]], dtype=np.float64)
    best = dict.fromkeys(["np_add", *CODECS], float("inf"))
    for _ in range(repeats):
        best["np_add"] = min(best["np_add"], timed(np_add))
        for key, batch in updates.items():
            best[key] = min(best[key], timed(lambda batch=batch: rule.aggregate(batch, weights)))

    outputs = {key: rule.aggregate(batch, weights) for key, batch in updates.items()}
    results: dict[str, dict[str, float]] = {}
    for key, batch in updates.items():
        payload_bytes = sum(u.delta.nbytes for u in batch)
        results[key] = {
            "seconds": best[key],
            "payload_bytes": payload_bytes,
            "gb_per_s": payload_bytes / best[key] / GB,
            "mparams_per_s": NUM_DELTAS * PARAMS / best[key] / 1e6,
            "max_abs_err_vs_f32": max(
                float(np.abs(outputs[key][name] - outputs["f32"][name]).max()) for name in SHAPES
            ),
        }
    return NUM_DELTAS * PARAMS * 4 / best["np_add"] / GB, results


def bench_conflicts() -> tuple[float | None, str]:
    try:
        from fedsync.conflicts import bench_merge_obs_per_s
    except ImportError as exc:
        return None, f"not available ({exc})"
    try:
        return float(bench_merge_obs_per_s()), "ok"
    except Exception as exc:  # report, do not abort the aggregation figures
        return None, f"failed ({type(exc).__name__}: {exc})"


def main() -> None:
    np_add, aggregation = bench(np.random.default_rng(0))
    conflict_obs_per_s, conflict_status = bench_conflicts()
    int8_bytes_ratio = aggregation["f32"]["payload_bytes"] / aggregation["int8"]["payload_bytes"]

    print(f"np.add streaming (acc += x, {NUM_DELTAS} x {PARAMS:,} float32): {np_add:6.2f} GB/s")
    print()
    print(f"weighted_mean of K={NUM_DELTAS} deltas x {PARAMS:,} params ({len(SHAPES)} tensors)")
    print(f"{'codec':<14}{'seconds':>9}{'payload MB':>12}{'GB/s read':>11}{'Mparam/s':>10}{'max|err|':>11}")
    for key, codec in CODECS.items():
        row = aggregation[key]
        print(
            f"{codec:<14}{row['seconds']:>9.4f}{row['payload_bytes'] / 1e6:>12.1f}"
            f"{row['gb_per_s']:>11.2f}{row['mparams_per_s']:>10.0f}{row['max_abs_err_vs_f32']:>11.2e}"
        )
    print()
    print(f"float32 aggregation / np.add bandwidth: {aggregation['f32']['gb_per_s'] / np_add:.2f}")
    print(f"float32 / int8 payload bytes:           {int8_bytes_ratio:.3f}")
    conflict_text = f"{conflict_obs_per_s:,.0f} obs/s" if conflict_obs_per_s is not None else "null"
    print(f"conflict merge throughput:              {conflict_text} ({conflict_status})")

    summary = {
        "f32_gb_per_s": round(aggregation["f32"]["gb_per_s"], 3),
        "np_add_gb_per_s": round(np_add, 3),
        "ratio": round(aggregation["f32"]["gb_per_s"] / np_add, 3),
        "int8_bytes_ratio": round(int8_bytes_ratio, 4),
        "conflict_obs_per_s": None if conflict_obs_per_s is None else round(conflict_obs_per_s, 1),
        "f16_gb_per_s": round(aggregation["f16"]["gb_per_s"], 3),
        "int8_gb_per_s": round(aggregation["int8"]["gb_per_s"], 3),
        "int8_channel_gb_per_s": round(aggregation["int8c"]["gb_per_s"], 3),
        "f32_s": round(aggregation["f32"]["seconds"], 4),
        "f16_s": round(aggregation["f16"]["seconds"], 4),
        "int8_s": round(aggregation["int8"]["seconds"], 4),
        "int8_channel_s": round(aggregation["int8c"]["seconds"], 4),
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
