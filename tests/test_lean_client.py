"""A LiteRT-only client (int8 inference, trainable-head fine-tuning) never imports TensorFlow, and
its head-only deltas aggregate into the global model without touching the layers it didn't train."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from coordinator import Coordinator
from fedsync.aggregation import Strategy

REPO = Path(__file__).resolve().parents[1]

LEAN_DEVICE = """
import json, sys
sys.path.insert(0, {repo!r})
from client import EdgeClient
from fedsync.sim.data import load_digits_split
train, test = load_digits_split()
device = EdgeClient({home!r}, "lean-1", inference="int8", fine_tuning={profile!r})
first = device.sync({address!r})
predictions = [device.predict(x).label for x in test.x[:50]]
seq = device.fine_tune(train.x[:400], train.y[:400], epochs={epochs}, learning_rate={lr})
second = device.sync({address!r})
print(json.dumps({{
    "tensorflow_imported": any(m == "tensorflow" or m.startswith("tensorflow.") for m in sys.modules),
    "keras_imported": "keras" in sys.modules,
    "installed": first.installed_version,
    "accuracy": float(sum(p == y for p, y in zip(predictions, test.y[:50])) / 50),
    "delta_seq": seq,
    "deltas_sent": second.deltas_sent,
    "events_sent": second.events_sent,
    "files": sorted(p.name for p in device.models.version_dir(device.model_version).iterdir()),
}}))
"""


def test_lean_client_trains_the_head_without_tensorflow(tmp_path: Path) -> None:
    coordinator = Coordinator(tmp_path / "coordinator", strategy=Strategy.fedbuff(buffer_size=1), auto_aggregate=False)
    coordinator.start("127.0.0.1:0")
    try:
        before = {k: v.copy() for k, v in coordinator.aggregator.weights.items()}
        script = LEAN_DEVICE.format(
            repo=str(REPO), home=str(tmp_path / "lean"), address=coordinator.address, profile="head", epochs=5, lr=0.5
        )
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        result = json.loads(done.stdout.strip().splitlines()[-1])
        assert result["tensorflow_imported"] is False and result["keras_imported"] is False
        assert result["installed"] == 1 and result["delta_seq"] == 1 and result["deltas_sent"] == 1
        assert result["events_sent"] == 50
        # Only what the lean profile needs was downloaded: the int8 model and the trainable head.
        assert result["files"] == ["head-trainable.tflite", "manifest.json", "model-int8.tflite"]

        published = coordinator.aggregate_now()
        assert published is not None and published.version == 2
        after = coordinator.aggregator.weights
        np.testing.assert_array_equal(after["hidden/kernel"], before["hidden/kernel"])
        np.testing.assert_array_equal(after["hidden/bias"], before["hidden/bias"])
        assert not np.allclose(after["head/kernel"], before["head/kernel"])
        # Training the head on real labels beats the random initial head on the held-out set.
        assert published.accuracy > coordinator.store.version_history()[0][2] + 0.2
    finally:
        coordinator.stop()


def test_litert_client_trains_the_whole_model_without_tensorflow(tmp_path: Path) -> None:
    coordinator = Coordinator(
        tmp_path / "coordinator",
        strategy=Strategy.fedbuff(buffer_size=1),
        auto_aggregate=False,
        publish_trainable_head=False,
        publish_trainable=True,
    )
    coordinator.start("127.0.0.1:0")
    try:
        before = {k: v.copy() for k, v in coordinator.aggregator.weights.items()}
        script = LEAN_DEVICE.format(
            repo=str(REPO),
            home=str(tmp_path / "lean"),
            address=coordinator.address,
            profile="litert",
            epochs=20,
            lr=0.3,
        )
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        result = json.loads(done.stdout.strip().splitlines()[-1])
        assert result["tensorflow_imported"] is False and result["deltas_sent"] == 1
        assert result["files"] == ["manifest.json", "model-int8.tflite", "model-trainable.tflite"]
        published = coordinator.aggregate_now()
        assert published is not None
        after = coordinator.aggregator.weights
        assert all(not np.allclose(after[name], before[name]) for name in before)  # every layer trained
        assert published.accuracy > 0.8
    finally:
        coordinator.stop()
