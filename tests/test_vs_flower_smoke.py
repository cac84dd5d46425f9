"""bench/vs_flower.py, fedsync side only (no Flower venv needed): a tiny fleet, a couple of rounds."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench import vs_flower


def spec(tmp_path: Path, **overrides: object) -> dict:
    base = {
        "devices": 4,
        "aggregation": "async",
        "online_probability": 1.0,
        "local_training": vs_flower.choose_fedsync_training("auto"),
        "local_epochs": 2,
        "batch_size": 16,
        "lr": 0.5,
        "partition": "iid",
        "alpha": 1.0,
        "overlap": 0.3,
        "seed": 0,
        "predictions_per_round": 0,
        "target": 0.90,
        "extra_rounds": 2,
        "max_minutes": 5.0,
        "max_rounds": 2,
        "data_dir": str(tmp_path / "sim"),
    }
    return {**base, **overrides}


def test_fedsync_side_counts_updates_and_restores_the_coordinator(tmp_path: Path) -> None:
    from coordinator import Coordinator

    original = Coordinator.aggregate_now
    r = vs_flower.run_fedsync(spec(tmp_path))
    assert Coordinator.aggregate_now is original
    assert r["rounds"] == 2 and r["stopped_by"] == "rounds"
    # Round 1 installs the initial model; round 2 trains and syncs: 4 deltas, buffer of 2.
    assert r["updates"] == 4 and r["versions"] == 2
    assert r["updates_per_s"] == pytest.approx(r["updates"] / r["train_wall_s"])
    assert r["steady_updates_per_s"] >= r["updates_per_s"]
    assert [p["version"] for p in r["accuracy_over_time"]] == [2, 3]
    assert r["final_accuracy"] == r["accuracy_over_time"][-1]["accuracy"]
    assert r["peak_rss_mb"] > 0


def test_fedsync_side_stops_after_the_target(tmp_path: Path) -> None:
    r = vs_flower.run_fedsync(spec(tmp_path, aggregation="sync", target=0.0, extra_rounds=0, max_rounds=6))
    assert r["stopped_by"] == "target"
    assert r["rounds"] == r["rounds_to_target"] == 2  # the first version after the initial one
    assert r["time_to_target_s"] == r["accuracy_over_time"][0]["wall_s"]


def test_helpers() -> None:
    timeline = [{"wall_s": 1.0, "accuracy": 0.5}, {"wall_s": 2.0, "accuracy": 0.91}, {"wall_s": 3.0, "accuracy": 0.95}]
    assert vs_flower.time_to_target(timeline, 0.90) == 2.0
    assert vs_flower.time_to_target(timeline, 0.99) is None
    assert vs_flower.ratio(6.0, 2.0) == 3.0
    assert vs_flower.ratio(None, 2.0) is None and vs_flower.ratio(1.0, 0.0) is None
    assert vs_flower.median([3.0, None, 1.0, 2.0]) == 2.0
    assert vs_flower.median([1.0, 4.0]) == 2.5 and vs_flower.median([None]) is None
    assert vs_flower.choose_fedsync_training("keras") == "keras"
    assert vs_flower.choose_fedsync_training("auto") in ("litert", "keras")


def test_intermittency_ratios_flag_a_side_that_never_reached_the_target() -> None:
    sync = {"time_to_target_s": None, "train_wall_s": 40.0, "sim_time_to_target_s": None, "sim_s": 1200.0}
    asynchronous = {"time_to_target_s": 10.0, "train_wall_s": 15.0, "sim_time_to_target_s": 300.0, "sim_s": 420.0}
    r = vs_flower.intermittency_ratios(sync, asynchronous)
    assert r["time_ratio"] == 4.0 and r["wall_ratio"] == 4.0  # bounds: sync's whole run stands in
    assert not r["sync_reached"] and r["async_reached"]
    assert (r["sync_time_s"], r["async_time_s"]) == (1200.0, 300.0)
    assert (r["sync_wall_s"], r["async_wall_s"]) == (40.0, 10.0)
