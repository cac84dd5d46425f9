"""Coordinator core behaviour with real parts: crash safety of aggregation, version retention,
staleness rejection, codecs end to end, and the Prometheus endpoint."""

from __future__ import annotations

import subprocess
import sys
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from client import EdgeClient
from coordinator import Coordinator
from fedsync.aggregation import Strategy
from fedsync.sim.data import load_digits_split

REPO = Path(__file__).resolve().parents[1]
TRAIN, TEST = load_digits_split(seed=0)


def make_coordinator(data_dir: Path, **kwargs: object) -> Coordinator:
    kwargs.setdefault("strategy", Strategy.fedbuff(buffer_size=2, max_staleness=1))
    coordinator = Coordinator(
        data_dir, auto_aggregate=False, publish_int8=False, publish_trainable_head=False, **kwargs
    )
    coordinator.start("127.0.0.1:0")
    return coordinator


def trained_client(
    tmp_path: Path, name: str, coordinator: Coordinator, rows: slice, codec: str = "float32"
) -> EdgeClient:
    client = EdgeClient(tmp_path / name, name)
    client.sync(coordinator.address)
    client.fine_tune(TRAIN.x[rows], TRAIN.y[rows], epochs=3, codec=codec)
    return client


CRASHING_AGGREGATION = """
import sys
sys.path.insert(0, {repo!r})
from coordinator import Coordinator
from fedsync.aggregation import Strategy
c = Coordinator({data_dir!r}, strategy=Strategy.fedbuff(buffer_size=2), auto_aggregate=False,
                publish_int8=False, publish_trainable_head=False)
c.aggregate_now()
print("survived")
"""


@pytest.mark.parametrize("where", ["aggregator.before_publish", "aggregator.after_publish"])
def test_kill_9_mid_aggregation_loses_and_doubles_nothing(tmp_path: Path, where: str) -> None:
    coordinator = make_coordinator(tmp_path / "coordinator")
    clients = [trained_client(tmp_path, f"d{i}", coordinator, slice(100 * i, 100 * i + 100)) for i in range(2)]
    for client in clients:
        assert client.sync(coordinator.address).deltas_sent == 1
    coordinator.stop()

    script = CRASHING_AGGREGATION.format(repo=str(REPO), data_dir=str(tmp_path / "coordinator"))
    env = {**__import__("os").environ, "FEDSYNC_FAILPOINT": where}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == -9 and "survived" not in done.stdout

    coordinator = make_coordinator(tmp_path / "coordinator")
    try:
        assert coordinator.version == 1
        assert coordinator.store.integrity_ok()
        assert coordinator.store.counts()["deltas_buffered"] == 2
        published = coordinator.aggregate_now()
        assert published is not None and published.version == 2 and published.num_deltas == 2
        counts = coordinator.store.counts()
        assert (counts["deltas_buffered"], counts["deltas_aggregated"]) == (0, 2)
        assert coordinator.aggregate_now() is None  # nothing left to count twice
        for client in clients:
            client.sync(coordinator.address)
            assert client.model_version == 2
    finally:
        for client in clients:
            client.close()
        coordinator.stop()


def test_stale_deltas_are_rejected_with_a_reason_and_old_bases_are_kept(tmp_path: Path) -> None:
    coordinator = make_coordinator(
        tmp_path / "coordinator", strategy=Strategy.fedbuff(buffer_size=1, max_staleness=1), keep_versions=1
    )
    laggard = trained_client(tmp_path, "laggard", coordinator, slice(0, 100))  # base version 1, offline
    fresh = EdgeClient(tmp_path / "fresh", "fresh")
    try:
        for round_ in range(3):
            fresh.sync(coordinator.address)
            fresh.fine_tune(TRAIN.x[100 * round_ : 100 * round_ + 100], TRAIN.y[100 * round_ : 100 * round_ + 100])
            fresh.sync(coordinator.address)
            coordinator.aggregate_now()
        assert coordinator.version == 4
        # keep_versions=1, but the laggard still runs version 1 and "fresh" last reported version 3.
        kept = sorted(int(p.name[1:]) for p in (tmp_path / "coordinator" / "models").glob("v*"))
        assert kept == [1, 3, 4]
        report = laggard.sync(coordinator.address)
        assert report.deltas_rejected == 1 and report.deltas_sent == 0
        status, reason = coordinator.store.conn.execute(
            "SELECT status, reason FROM deltas WHERE device_id = 'laggard'"
        ).fetchone()
        assert status == "rejected" and reason.startswith("stale")
        assert laggard.model_version == 4
    finally:
        laggard.close()
        fresh.close()
        coordinator.stop()


@pytest.mark.parametrize("codec", ["float16", "int8", "topk:0.2"])
def test_compressed_deltas_aggregate_close_to_float32(tmp_path: Path, codec: str) -> None:
    coordinator = make_coordinator(tmp_path / "coordinator", strategy=Strategy.fedbuff(buffer_size=1))
    client = trained_client(tmp_path, "device", coordinator, slice(0, 300), codec=codec)
    try:
        payload, stored_codec = client.journal.conn.execute("SELECT payload, codec FROM deltas").fetchone()
        assert stored_codec == codec
        float32_bytes = sum(a.size * 4 for a in coordinator.aggregator.weights.values())
        assert len(payload) < float32_bytes
        if codec != "float16":  # lossy codecs keep what they dropped for the next delta
            assert client.journal.codec_residuals()
        before = {k: v.copy() for k, v in coordinator.aggregator.weights.items()}
        client.sync(coordinator.address)
        assert coordinator.aggregate_now() is not None
        moved = sum(float(np.abs(coordinator.aggregator.weights[k] - before[k]).sum()) for k in before)
        assert moved > 0
    finally:
        client.close()
        coordinator.stop()


def test_prometheus_endpoint_counts_what_happened(tmp_path: Path) -> None:
    coordinator = make_coordinator(
        tmp_path / "coordinator", strategy=Strategy.fedbuff(buffer_size=2, max_staleness=0), metrics=True
    )
    port = coordinator.serve_metrics(0)
    a = trained_client(tmp_path, "a", coordinator, slice(0, 100))
    b = trained_client(tmp_path, "b", coordinator, slice(100, 200))
    try:
        a.sync(coordinator.address)
        b.sync(coordinator.address)
        coordinator.aggregate_now()
        b.fine_tune(TRAIN.x[200:300], TRAIN.y[200:300])  # based on version 1, now stale
        a.sync(coordinator.address)  # a reports version 2 ...
        b.journal.conn.execute("UPDATE deltas SET base_version = 1 WHERE seq = 2")
        b.sync(coordinator.address)
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        values = {
            line.split(" ")[0]: float(line.split(" ")[1])
            for line in text.splitlines()
            if line and not line.startswith("#")
        }
        assert values["fedsync_deltas_accepted_total"] == 2
        assert values['fedsync_deltas_rejected_total{reason="stale"}'] == 1
        assert values["fedsync_versions_published_total"] == 1
        assert values["fedsync_connected_devices"] == 2
        assert values["fedsync_buffer_fill"] == 0
        assert values['fedsync_delta_staleness_bucket{le="0.0"}'] == 2
    finally:
        a.close()
        b.close()
        coordinator.stop()


def test_a_coordinator_without_the_keras_artifact_restarts_from_its_own_weights(tmp_path: Path) -> None:
    data = tmp_path / "coordinator"
    coordinator = make_coordinator(
        data, publish_keras=False, publish_trainable=True, strategy=Strategy.fedbuff(buffer_size=1)
    )
    client = EdgeClient(tmp_path / "device", "device", fine_tuning="litert")
    try:
        client.sync(coordinator.address)
        client.fine_tune(TRAIN.x[:100], TRAIN.y[:100], epochs=2, learning_rate=0.5)
        client.sync(coordinator.address)
        assert coordinator.aggregate_now() is not None and coordinator.version == 2
        kinds = {a.kind for a in coordinator.aggregator.current_manifest().artifacts}
        assert "keras" not in kinds and "tflite-float32" in kinds
        assert not (data / "models" / "v2" / "model.keras").exists()
        weights = {k: v.copy() for k, v in coordinator.aggregator.weights.items()}
    finally:
        client.close()
        coordinator.stop()
    restarted = make_coordinator(data, publish_keras=False, publish_trainable=True)
    try:
        assert restarted.version == 2
        assert set(restarted.aggregator.weights) == set(weights)
        for name, value in weights.items():
            np.testing.assert_array_equal(restarted.aggregator.weights[name], value)
    finally:
        restarted.stop()


def test_a_version_published_before_weights_npz_loads_from_its_keras_model(tmp_path: Path) -> None:
    data = tmp_path / "coordinator"
    coordinator = make_coordinator(data)
    weights = {k: v.copy() for k, v in coordinator.aggregator.weights.items()}
    coordinator.stop()
    (data / "models" / "v1" / "weights.npz").unlink()
    restarted = make_coordinator(data)
    try:
        for name, value in weights.items():
            np.testing.assert_array_equal(restarted.aggregator.weights[name], value)
    finally:
        restarted.stop()
