"""The generated code in fedsync/v1 must match proto/: regenerate and compare (run `make proto`)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
GENERATED = ("sync_pb2.py", "sync_pb2.pyi", "sync_pb2_grpc.py")


def test_generated_code_matches_the_proto_files(tmp_path: Path) -> None:
    pytest.importorskip("grpc_tools.protoc", reason="grpcio-tools is a dev dependency")
    # In a subprocess: protoc in a process that has loaded TensorFlow's protobuf bits can crash.
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-I{REPO / 'proto'}",
            f"--python_out={tmp_path}",
            f"--pyi_out={tmp_path}",
            f"--grpc_python_out={tmp_path}",
            str(REPO / "proto" / "fedsync" / "v1" / "sync.proto"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    for name in GENERATED:
        fresh = (tmp_path / "fedsync" / "v1" / name).read_text()
        committed = (REPO / "fedsync" / "v1" / name).read_text()
        assert fresh == committed, f"fedsync/v1/{name} is stale: run `make proto`"


def test_every_rpc_in_the_proto_is_served() -> None:
    from coordinator.service import SyncService
    from fedsync.v1 import sync_pb2

    service = sync_pb2.DESCRIPTOR.services_by_name["Sync"]
    for method in service.methods:
        assert method.name in SyncService.__dict__, f"SyncService does not implement {method.name}"
