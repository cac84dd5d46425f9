"""`fedsync coordinator serve` runs a real coordinator with the chosen strategy, enrolls devices and
stops cleanly on SIGTERM."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
from pathlib import Path

from client import EdgeClient

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fedsync(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fedsync.cli", *args], capture_output=True, text=True, timeout=timeout, cwd=REPO
    )


def test_serve_enroll_sync_and_stop(tmp_path: Path) -> None:
    port = free_port()
    data = tmp_path / "coordinator"
    server = subprocess.Popen(
        [
            sys.executable, "-m", "fedsync.cli", "coordinator", "serve",
            "--data-dir", str(data), "--address", f"127.0.0.1:{port}",
            "--rule", "trimmed-mean", "--clip-norm", "10", "--conflict-policy", "vote",
            "--buffer-size", "4", "--server-momentum", "0.9", "--durability", "process",
        ],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
    )  # fmt: skip
    try:
        line = server.stdout.readline()  # type: ignore[union-attr]
        assert "listening on 127.0.0.1:" in line and "credentials required" in line, line
        assert "durable against a process crash" in line, line
        enrolled = fedsync("coordinator", "enroll", "--data-dir", str(data), "--device-id", "edge-1")
        assert enrolled.returncode == 0, enrolled.stderr
        token = enrolled.stdout.strip()
        assert len(token) >= 40

        client = EdgeClient(tmp_path / "edge-1", "edge-1", credential=token, fine_tuning=None)
        try:
            assert client.sync(f"127.0.0.1:{port}", attempts=1).installed_version == 1
        finally:
            client.close()
        refused = fedsync(
            "client", "sync", "--home", str(tmp_path / "edge-2"), "--device-id", "edge-2",
            "--address", f"127.0.0.1:{port}", "--credential", token,
        )  # fmt: skip
        assert refused.returncode == 1
        assert refused.stderr.strip().startswith("fedsync: error: PERMISSION_DENIED")
        assert refused.stderr.count("\n") == 1
    finally:
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=60) == 0
