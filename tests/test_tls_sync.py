"""Sync over TLS and mutual TLS with certificates from `fedsync certs`, against a real coordinator."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from client import EdgeClient
from coordinator import Coordinator
from coordinator.server import ServerTLS
from fedsync.aggregation import Strategy
from fedsync.certs import generate_all, generate_client_certificate
from fedsync.cli import main
from fedsync.wire import ClientTLS


def tls_coordinator(data_dir: Path, tls: ServerTLS) -> Coordinator:
    coordinator = Coordinator(
        data_dir,
        strategy=Strategy.fedbuff(buffer_size=10),
        auto_aggregate=False,
        publish_int8=False,
        publish_trainable_head=False,
        require_credentials=True,
        tls=tls,
    )
    coordinator.start("127.0.0.1:0")
    return coordinator


def test_tls_with_credentials(tmp_path: Path) -> None:
    files = generate_all(tmp_path / "certs")
    coordinator = tls_coordinator(tmp_path / "coordinator", ServerTLS(files.server_cert, files.server_key))
    token = coordinator.enroll("tls-device")
    try:
        client = EdgeClient(
            tmp_path / "device", "tls-device", credential=token, tls=ClientTLS(files.ca_cert), fine_tuning=None
        )
        try:
            assert client.sync(coordinator.address, attempts=1).installed_version == 1
        finally:
            client.close()
        # Plaintext against a TLS port, or trusting another CA, does not get through.
        other = generate_all(tmp_path / "other-certs")
        for tls in (None, ClientTLS(other.ca_cert)):
            stranger = EdgeClient(tmp_path / f"x-{tls is None}", "tls-device", credential=token, tls=tls)
            try:
                with pytest.raises(grpc.RpcError) as info:
                    stranger.sync(coordinator.address, attempts=1, timeout_s=5)
                assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            finally:
                stranger.close()
    finally:
        coordinator.stop()


def test_mutual_tls_requires_a_client_certificate(tmp_path: Path) -> None:
    files = generate_all(tmp_path / "certs")
    cert, key = generate_client_certificate(tmp_path / "certs", files.ca_cert, files.ca_key, "mtls-device")
    coordinator = tls_coordinator(
        tmp_path / "coordinator", ServerTLS(files.server_cert, files.server_key, client_ca=files.ca_cert)
    )
    token = coordinator.enroll("mtls-device")
    try:
        with_cert = EdgeClient(
            tmp_path / "a", "mtls-device", credential=token, tls=ClientTLS(files.ca_cert, cert, key), fine_tuning=None
        )
        without = EdgeClient(tmp_path / "b", "mtls-device", credential=token, tls=ClientTLS(files.ca_cert))
        try:
            assert with_cert.sync(coordinator.address, attempts=1).installed_version == 1
            with pytest.raises(grpc.RpcError) as info:
                without.sync(coordinator.address, attempts=1, timeout_s=5)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        finally:
            with_cert.close()
            without.close()
    finally:
        coordinator.stop()


def test_certs_cli_writes_files_and_refuses_to_overwrite(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "certs"
    assert main(["certs", "--out", str(out)]) == 0
    assert {p.name for p in out.iterdir()} >= {"ca.pem", "ca.key", "server.pem", "server.key"}
    assert main(["certs", "--out", str(out), "--client", "device-9"]) == 0
    assert (out / "device-9.pem").exists()
    capsys.readouterr()
    assert main(["certs", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fedsync: error:") and err.count("\n") == 1
