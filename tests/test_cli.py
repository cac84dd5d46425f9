"""The `fedsync` command line: help, and user errors as one stderr line with exit code 2."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from client.journal import Journal
from fedsync.cli import main

REPO = Path(__file__).resolve().parents[1]

# Runs `python -m fedsync.cli ARGS` with one difference: if the simulation itself is ever reached the
# process exits 97 at once, instead of spending a minute simulating. Its last stdout line tells
# whether TensorFlow or the coordinator were imported.
_GUARDED = textwrap.dedent(
    """
    import os, runpy, sys
    sys.path.insert(0, {repo!r})
    import fedsync.sim.runner as runner

    def _guard(*args, **kwargs):
        sys.stderr.write("GUARD: run_simulation was called: the arguments were not rejected up front\\n")
        sys.stderr.flush()
        os._exit(97)

    runner.run_simulation = _guard
    sys.argv = ["fedsync", *sys.argv[1:]]
    try:
        runpy.run_module("fedsync.cli", run_name="__main__", alter_sys=True)
    finally:
        heavy = sorted(m for m in ("tensorflow", "keras", "coordinator", "grpc") if m in sys.modules)
        print("IMPORTED:" + ",".join(heavy), flush=True)
    """
)


# As a user would run it: none of the logging knobs the test process may have set.
_LOG_KNOBS = ("TF_CPP_MIN_LOG_LEVEL", "GRPC_VERBOSITY", "GRPC_TRACE", "ABSL_MIN_LOG_LEVEL")


def run_cli(*args: str, guarded: bool = False, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    if guarded:
        cmd = [sys.executable, "-c", _GUARDED.format(repo=str(REPO)), *args]
    else:
        cmd = [sys.executable, "-m", "fedsync.cli", *args]
    env = {k: v for k, v in os.environ.items() if k not in _LOG_KNOBS}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO, env=env)


@pytest.fixture(autouse=True)
def _restore_environ():
    """main() sets logging variables in os.environ; keep them from leaking into other tests."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


def assert_one_error_line(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr[-3000:]
    assert lines[0].startswith("fedsync: error:"), lines[0]
    return lines[0]


# -- help ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (("simulate",), ["--devices", "--alpha", "--online-prob", "--partition", "--codec", "--report"]),
        (("coordinator", "serve"), ["--address", "--data-dir", "--buffer-size", "--max-staleness"]),
        (("client", "status"), ["--home"]),
    ],
)
def test_help_exits_0(args: tuple[str, ...], expected: list[str]) -> None:
    proc = run_cli(*args, "--help")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    assert proc.stdout.startswith(f"usage: fedsync {' '.join(args)}")
    for option in expected:
        assert option in proc.stdout


# -- simulate: impossible arguments are refused before any work ---------------------------------


def _proc_report(tmp_path: Path) -> list[str]:
    return ["--report", "/proc/forbidden/x.json"]


def _report_below_a_file(tmp_path: Path) -> list[str]:
    (tmp_path / "a-file").write_text("not a folder")
    return ["--report", str(tmp_path / "a-file" / "x.json")]


def _report_is_a_dir(tmp_path: Path) -> list[str]:
    return ["--report", str(tmp_path)]


_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0
_SIMULATE_ERRORS = [
    pytest.param(lambda _: ["--devices", "0"], "--devices", id="devices-0"),
    pytest.param(lambda _: ["--alpha", "0"], "--alpha", id="alpha-0"),
    pytest.param(lambda _: ["--online-prob", "1.5"], "--online-prob", id="online-prob-1.5"),
    pytest.param(lambda _: ["--partition", "nope"], "--partition", id="partition-nope"),
    pytest.param(lambda _: ["--codec", "nope"], "--codec", id="codec-nope"),
    pytest.param(_report_is_a_dir, "directory", id="report-is-a-directory"),
    pytest.param(_proc_report, "/proc/forbidden/x.json", id="report-unwritable-proc"),
    pytest.param(_report_below_a_file, "x.json", id="report-below-a-regular-file"),
]


@pytest.mark.parametrize(("make_args", "mentions"), _SIMULATE_ERRORS)
def test_simulate_bad_arguments_fail_fast_with_one_line(tmp_path: Path, make_args, mentions: str) -> None:
    data_dir = tmp_path / "sim-data"
    proc = run_cli("simulate", "--data-dir", str(data_dir), *make_args(tmp_path), guarded=True)
    line = assert_one_error_line(proc)
    assert mentions in line
    assert not data_dir.exists(), "work started: the data dir was created"
    assert proc.stdout.splitlines()[-1] == "IMPORTED:", proc.stdout  # no TensorFlow, no coordinator, no gRPC


def test_simulate_bad_arguments_in_process(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data_dir = tmp_path / "sim-data"
    assert main(["simulate", "--data-dir", str(data_dir), "--devices", "-3"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == "fedsync: error: --devices must be at least 1, got -3\n"
    assert not data_dir.exists()


def test_unguarded_module_entry_point_reports_one_line(tmp_path: Path) -> None:
    """The real `python -m fedsync.cli` path, without the test guard."""
    data_dir = tmp_path / "sim-data"
    proc = run_cli("simulate", "--data-dir", str(data_dir), "--partition", "nope")
    line = assert_one_error_line(proc)
    assert "nope" in line
    assert proc.stdout == ""
    assert not data_dir.exists()


# -- client status ------------------------------------------------------------------------------


def test_client_status_on_an_empty_home(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    proc = run_cli("client", "status", "--home", str(home))
    line = assert_one_error_line(proc)
    assert "journal.db" in line
    assert list(home.iterdir()) == []  # looking must not create a journal


def test_client_status_on_a_missing_home(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    home = tmp_path / "nowhere"
    assert main(["client", "status", "--home", str(home)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("fedsync: error:")
    assert not home.exists()


def test_client_status_reports_the_journal(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    home = tmp_path / "home"
    home.mkdir()
    journal = Journal(home / "journal.db")
    journal.append_events([(bytes([i]) * 32, i, 0.5, 0, 1.0) for i in range(5)])
    journal.ack_events(2)
    journal.append_delta(0, 5, "float32", "[]", b"payload", 0.1)
    journal.close()

    assert main(["client", "status", "--home", str(home)]) == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    status = json.loads(captured.out)
    assert status["model_version"] == 0
    assert status["installed_versions"] == []
    assert status["events_journaled"] == 5
    assert status["events_pending"] == 3
    assert status["deltas_pending"] == 1
    assert status["journal_integrity"] == "ok"
    assert status["storage"] == []


# -- coordinator serve on a taken port -----------------------------------------------------------


@pytest.fixture(scope="module")
def serve_on_taken_port(tmp_path_factory: pytest.TempPathFactory):
    data_dir = tmp_path_factory.mktemp("serve") / "coordinator"
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as held:
        held.bind(("127.0.0.1", 0))
        held.listen(1)
        port = held.getsockname()[1]
        proc = run_cli("coordinator", "serve", "--address", f"127.0.0.1:{port}", "--data-dir", str(data_dir))
    return proc, port, data_dir


def test_coordinator_serve_on_taken_port_fails_with_exit_2(serve_on_taken_port) -> None:
    proc, port, _ = serve_on_taken_port
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    ours = [line for line in proc.stderr.splitlines() if line.startswith("fedsync:")]
    assert len(ours) == 1, proc.stderr[-3000:]
    assert ours[0].startswith("fedsync: error:")
    assert f"127.0.0.1:{port}" in ours[0]
    assert proc.stderr.splitlines()[-1] == ours[0]
    assert "listening" not in proc.stdout


def test_coordinator_serve_on_taken_port_prints_only_one_line(serve_on_taken_port) -> None:
    proc, _, _ = serve_on_taken_port
    assert_one_error_line(proc)
