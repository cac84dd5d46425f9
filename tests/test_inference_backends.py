"""Inference backends (LiteRT float32/int8, Keras fallback) agree, and inference metrics are recorded."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from client import EdgeClient
from coordinator import Coordinator
from fedsync.aggregation import Strategy
from fedsync.cli import main
from fedsync.sim.data import load_digits_split

TRAIN, TEST = load_digits_split(seed=0)
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def trained_coordinator(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("backends")
    coordinator = Coordinator(root / "coordinator", strategy=Strategy.fedbuff(buffer_size=1), auto_aggregate=False)
    coordinator.start("127.0.0.1:0")
    trainer = EdgeClient(root / "trainer", "trainer")
    trainer.sync(coordinator.address)
    trainer.fine_tune(TRAIN.x, TRAIN.y, epochs=20, learning_rate=0.1)
    trainer.sync(coordinator.address)
    coordinator.aggregate_now()
    trainer.close()
    yield coordinator, root
    coordinator.stop()


@pytest.mark.parametrize("backend", ["float32", "int8", "keras"])
def test_backends_predict_like_the_coordinator_evaluated(trained_coordinator, backend: str) -> None:
    coordinator, root = trained_coordinator
    client = EdgeClient(root / f"client-{backend}", f"client-{backend}", inference=backend, fine_tuning=None)
    try:
        client.sync(coordinator.address)
        assert client.model_version == 2
        labels = np.array([client.predict(x).label for x in TEST.x[:200]])
        accuracy = float(np.mean(labels == TEST.y[:200]))
        assert accuracy > 0.85
        manifest = client.models.manifest()
        assert manifest is not None and abs(accuracy - manifest.metrics["accuracy"]) < 0.06
        # A second prediction of the same input is a cache hit, journaled as an event too.
        again = client.predict(TEST.x[0])
        assert again.cached and again.label == labels[0]
        assert client.journal.last_event_seq() == 201
    finally:
        client.close()


def test_inference_stats_record_cold_start_and_memory(trained_coordinator, capsys: pytest.CaptureFixture) -> None:
    coordinator, root = trained_coordinator
    home = root / "stats-client"
    client = EdgeClient(home, "stats-client", fine_tuning=None)
    try:
        client.sync(coordinator.address)
        for x in TEST.x[:250]:
            client.predict(x)
        kinds = client.journal.conn.execute("SELECT kind, COUNT(*) FROM inference_stats GROUP BY kind").fetchall()
    finally:
        client.close()
    counts = dict(kinds)
    assert counts.get("warm", 0) >= 2  # one RSS sample every 100 inferences
    assert main(["client", "stats", "--home", str(home)]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["inferences"] == 250
    assert stats["warm_latency_us"]["p50"] > 0
    assert stats["rss_mb"]["max"] > 10


def test_client_stats_on_a_folder_without_a_client_is_one_line(tmp_path: Path, capsys) -> None:
    assert main(["client", "stats", "--home", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fedsync: error:") and err.count("\n") == 1


def test_process_start_is_known_to_a_clock_tick() -> None:
    """The cold start is measured from the process's start, which must not be rounded to whole
    seconds (/proc/stat's btime is): the child's start lies between the parent's clock reading
    before spawning it (less one 10 ms tick) and its own reading after a 0.3 s sleep."""
    code = (
        f"import json, sys, time; sys.path.insert(0, {str(REPO)!r})\n"
        "from client.process_stats import process_age_s, process_start_unix\n"
        "time.sleep(0.3)\n"
        "print(json.dumps([process_start_unix(), process_age_s(), time.time()]))\n"
    )
    before = time.time()
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    start, age, now = json.loads(done.stdout)
    assert before - 0.05 <= start <= now - 0.3 + 0.05
    assert age >= 0.3
