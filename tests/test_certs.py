"""fedsync.certs: generated CA, server and client certificates work with a real gRPC server over TLS."""

from __future__ import annotations

import ipaddress
import stat
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedsync.certs import (
    CertificateFiles,
    channel_credentials,
    generate_all,
    generate_ca,
    generate_client_certificate,
    server_credentials,
)

ECHO = "/fedsync.test.Echo/Echo"
TIMEOUT_S = 10.0


def _identity(data: bytes) -> bytes:
    return data


def start_echo_server(credentials: grpc.ServerCredentials) -> tuple[grpc.Server, int]:
    handler = grpc.method_handlers_generic_handler(
        "fedsync.test.Echo",
        {
            "Echo": grpc.unary_unary_rpc_method_handler(
                lambda request, context: request, request_deserializer=_identity, response_serializer=_identity
            )
        },
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2), handlers=[handler])
    port = server.add_secure_port("127.0.0.1:0", credentials)
    assert port != 0
    server.start()
    return server, port


def echo(port: int, credentials: grpc.ChannelCredentials, payload: bytes = b"ping") -> bytes:
    # Dial the loopback address but verify the certificate as "localhost" (one of its SANs).
    options = [("grpc.ssl_target_name_override", "localhost")]
    with grpc.secure_channel(f"127.0.0.1:{port}", credentials, options=options) as channel:
        call = channel.unary_unary(ECHO, request_serializer=_identity, response_deserializer=_identity)
        return call(payload, timeout=TIMEOUT_S, wait_for_ready=False)


@pytest.fixture
def pki(tmp_path: Path) -> CertificateFiles:
    return generate_all(tmp_path / "pki")


@pytest.fixture
def tls_server(pki: CertificateFiles) -> Iterator[int]:
    server, port = start_echo_server(server_credentials(pki))
    yield port
    server.stop(None).wait()


@pytest.fixture
def mtls_server(pki: CertificateFiles) -> Iterator[int]:
    server, port = start_echo_server(server_credentials(pki, require_client_cert=True))
    yield port
    server.stop(None).wait()


def test_client_trusting_the_ca_gets_the_echo(pki: CertificateFiles, tls_server: int) -> None:
    assert echo(tls_server, channel_credentials(pki.ca_cert), b"hello over tls") == b"hello over tls"


def test_localhost_without_override_verifies_against_the_dns_san(pki: CertificateFiles, tls_server: int) -> None:
    with grpc.secure_channel(f"localhost:{tls_server}", channel_credentials(pki.ca_cert)) as channel:
        call = channel.unary_unary(ECHO, request_serializer=_identity, response_deserializer=_identity)
        try:
            assert call(b"x", timeout=TIMEOUT_S) == b"x"
        except grpc.RpcError as exc:  # "localhost" may resolve to ::1 only where the server is not listening
            if exc.code() != grpc.StatusCode.UNAVAILABLE or "certificate" in (exc.details() or "").lower():
                raise
            pytest.skip(f"localhost does not reach 127.0.0.1 here: {exc.details()}")


def test_client_trusting_another_ca_is_refused(tmp_path: Path, tls_server: int) -> None:
    other_ca, _ = generate_ca(tmp_path / "other", common_name="some other CA")
    with pytest.raises(grpc.RpcError) as caught:
        echo(tls_server, channel_credentials(other_ca))
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


def test_mutual_tls_requires_a_client_certificate_signed_by_the_ca(
    tmp_path: Path, pki: CertificateFiles, mtls_server: int
) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        echo(mtls_server, channel_credentials(pki.ca_cert))
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE

    cert, key = generate_client_certificate(tmp_path / "device", pki.ca_cert, pki.ca_key, "device-7")
    assert echo(mtls_server, channel_credentials(pki.ca_cert, cert, key), b"mutual") == b"mutual"

    # A client certificate from another CA is refused even though the client trusts the server.
    rogue_ca, rogue_key = generate_ca(tmp_path / "rogue")
    rogue_cert, rogue_cert_key = generate_client_certificate(tmp_path / "rogue", rogue_ca, rogue_key, "device-7")
    with pytest.raises(grpc.RpcError) as caught:
        echo(mtls_server, channel_credentials(pki.ca_cert, rogue_cert, rogue_cert_key))
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


def test_generate_all_refuses_to_overwrite(tmp_path: Path) -> None:
    files = generate_all(tmp_path)
    before = files.ca_cert.read_bytes()
    with pytest.raises(FileExistsError) as caught:
        generate_all(tmp_path)
    assert "\n" not in str(caught.value) and "overwrite" in str(caught.value)
    assert files.ca_cert.read_bytes() == before
    # Even one leftover file is enough to refuse.
    files.ca_cert.unlink()
    with pytest.raises(FileExistsError):
        generate_all(tmp_path)
    again = generate_all(tmp_path, overwrite=True)
    assert again == files and again.ca_cert.read_bytes() != before


def test_key_files_are_private(tmp_path: Path, pki: CertificateFiles) -> None:
    cert, key = generate_client_certificate(tmp_path / "device", pki.ca_cert, pki.ca_key, "device-1")
    for path in (pki.ca_key, pki.server_key, key):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    for path in (pki.ca_cert, pki.server_cert, cert):
        assert stat.S_IMODE(path.stat().st_mode) & 0o077 == 0o044, path


def test_certificate_contents(tmp_path: Path, pki: CertificateFiles) -> None:
    ca = x509.load_pem_x509_certificate(pki.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(pki.server_cert.read_bytes())
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["localhost"]
    assert sans.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    assert server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value == x509.ExtendedKeyUsage(
        [ExtendedKeyUsageOID.SERVER_AUTH]
    )
    assert server.issuer == ca.subject
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert not server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    for cert in (ca, server):
        assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
        assert cert.public_key().curve.name == "secp256r1"
        assert cert.signature_hash_algorithm is not None and cert.signature_hash_algorithm.name == "sha256"
    server.verify_directly_issued_by(ca)

    client_cert, _ = generate_client_certificate(tmp_path, pki.ca_cert, pki.ca_key, "edge-42")
    client = x509.load_pem_x509_certificate(client_cert.read_bytes())
    assert client.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "edge-42"
    assert client.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value == x509.ExtendedKeyUsage(
        [ExtendedKeyUsageOID.CLIENT_AUTH]
    )
    client.verify_directly_issued_by(ca)


def test_custom_hostnames_and_bad_device_ids(tmp_path: Path) -> None:
    files = generate_all(tmp_path, hostnames=("coordinator.example", "10.0.0.5", "::1"))
    server = x509.load_pem_x509_certificate(files.server_cert.read_bytes())
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["coordinator.example"]
    assert sans.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.0.0.5"), ipaddress.ip_address("::1")]
    with pytest.raises(ValueError):
        generate_client_certificate(tmp_path, files.ca_cert, files.ca_key, "not a device id!")
    with pytest.raises(ValueError):
        channel_credentials(files.ca_cert, client_cert=files.server_cert)
