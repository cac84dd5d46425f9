"""`fedsync simulate` end to end on a small fleet: real devices, a real coordinator, a report and a plot."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedsync.cli import main
from fedsync.sim.runner import SimulationConfig, run_simulation


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
