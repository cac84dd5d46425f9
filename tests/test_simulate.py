"""`fedsync simulate` end to end on a small fleet: real devices, a real coordinator, a report and a plot."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from fedsync.cli import main
from fedsync.sim.runner import ROUND_SECONDS, SimulationConfig, run_simulation


def test_small_fleet_learns_and_reports(tmp_path: Path) -> None:
    ticks = []
    report = run_simulation(
        SimulationConfig(devices=6, rounds=4, seed=1, data_dir=tmp_path, overlap=0.5, online_probability=1.0),
        on_progress=ticks.append,
    )
    assert report.final_version >= 3
    assert report.final_accuracy > 0.5  # from 0.08 for the random initial model
    assert report.events_synced == sum(r.events_synced for r in report.rounds) > 0
    assert report.accuracy_over_time[0]["version"] == 1
    assert [p["version"] for p in report.accuracy_over_time] == sorted(
        {p["version"] for p in report.accuracy_over_time}
    )
    # The simulated clock: version 1 before round 1, then the end of the round that published each.
    rounds = [p["round"] for p in report.accuracy_over_time]
    assert rounds[0] == 0 and rounds == sorted(rounds) and rounds[-1] <= 4
    assert all(p["sim_s"] == p["round"] * ROUND_SECONDS for p in report.accuracy_over_time)
    published_in = {r.round for r in report.rounds if r.version > 1}
    assert set(rounds[1:]) <= published_in
    assert sum(report.staleness_histogram.values()) == sum(v["deltas"] for v in report.versions)
    assert report.bytes_up > 0 and report.bytes_down > 0
    assert ticks and ticks[-1].round == 4
    if report.conflicts_resolved:
        assert 0.0 <= report.resolved_label_accuracy <= 1.0


def test_compare_writes_one_report_per_configuration_and_a_plot(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code = main(
        [
            "simulate", "--devices", "4", "--rounds", "2", "--local-training", "head",
            "--compare", "float32,int8", "--data-dir", str(tmp_path / "sim"),
            "--report", str(tmp_path / "report.json"), "--plot", str(tmp_path / "accuracy.png"),
        ]
    )  # fmt: skip
    assert code == 0
    reports = json.loads((tmp_path / "report.json").read_text())
    assert set(reports) == {"float32", "int8"}
    assert reports["int8"]["config"]["codec"] == "int8"
    assert (tmp_path / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = capsys.readouterr().out
    assert "final version" in out and "plot written" in out


def test_compare_with_an_unknown_item_fails_before_any_work(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["simulate", "--compare", "float32,bogus", "--data-dir", str(tmp_path / "sim")]) == 2
    assert capsys.readouterr().err.startswith("fedsync: error: --compare")
    assert not (tmp_path / "sim").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--dropout-prob", "1.5"], "--dropout-prob must be in [0, 1], got 1.5"),
        (["--dropout-prob", "-0.1"], "--dropout-prob must be in [0, 1], got -0.1"),
        (["--speed-min", "0"], "--speed-min and --speed-max must be finite and > 0"),
        (["--speed-min", "2", "--speed-max", "1"], "--speed-min 2.0 is above --speed-max 1.0"),
        (["--backend", "dask"], "--backend must be one of local, processes, ray, got 'dask'"),
        (["--backend", "processes", "--workers", "-1"], "--workers must be >= 0 (0: one per CPU), got -1"),
        (["--cohort-fraction", "0"], "--cohort-fraction must be in (0, 1], got 0.0"),
        (["--cohort-fraction", "1.5"], "--cohort-fraction must be in (0, 1], got 1.5"),
        (["--round-timeout", "0"], "--round-timeout must be at least 1, got 0"),
        (["--server-lr", "0"], "--server-lr must be a positive number, got 0.0"),
        (["--server-lr", "nan"], "--server-lr must be a positive number, got nan"),
    ],
)
def test_bad_simulation_parameters_fail_in_one_line_before_any_work(
    tmp_path: Path, capsys: pytest.CaptureFixture, args: list[str], message: str
) -> None:
    assert main(["simulate", "--data-dir", str(tmp_path / "sim"), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"fedsync: error: {message}") and err.count("\n") == 1
    assert not (tmp_path / "sim").exists()


def test_ray_backend_without_ray_says_how_to_install_it(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray raises ImportError
    assert main(["simulate", "--backend", "ray", "--data-dir", str(tmp_path / "sim")]) == 2
    err = capsys.readouterr().err
    assert err == "fedsync: error: --backend ray needs Ray: pip install 'fedsync[ray]'\n"
    assert not (tmp_path / "sim").exists()


def test_a_listen_port_in_use_fails_in_one_line_before_any_work(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["simulate", "--listen", f"127.0.0.1:{port}", "--data-dir", str(tmp_path / "sim")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"fedsync: error: --listen 127.0.0.1:{port}: Address already in use") and err.count("\n") == 1
    assert not (tmp_path / "sim").exists()


def test_devices_dial_loopback_an_advertised_host_or_the_cluster_node() -> None:
    from fedsync.sim.config import device_address

    assert device_address(SimulationConfig(), 5000) == "127.0.0.1:5000"
    assert device_address(SimulationConfig(advertise_host="10.0.0.7"), 5000) == "10.0.0.7:5000"
    cluster = SimulationConfig(address="0.0.0.0:0", backend="ray")
    assert device_address(cluster, 5000, node_ip=lambda: "10.0.0.9") == "10.0.0.9:5000"
    assert device_address(SimulationConfig(address="0.0.0.0:0"), 5000) == "127.0.0.1:5000"  # one machine


@pytest.mark.parametrize("server_lr", [1.0, 0.5])
def test_the_async_coordinator_steps_server_lr_along_the_buffers_mean_delta(server_lr: float) -> None:
    import numpy as np

    from fedsync.aggregation import Update
    from fedsync.sim.config import SimulationConfig
    from fedsync.sim.runner import _strategy

    strategy = _strategy(SimulationConfig(devices=4, server_lr=server_lr))
    weights = {"w": np.zeros(3, dtype=np.float32)}
    updates = [Update({"w": np.full(3, 2.0, dtype=np.float32)}, 1), Update({"w": np.full(3, 4.0, dtype=np.float32)}, 1)]
    np.testing.assert_allclose(strategy.aggregate(weights, updates)["w"], np.full(3, 3.0 * server_lr))
