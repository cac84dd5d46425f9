"""TLS material for fedsync deployments: a local CA, a server certificate, client certificates
for mutual TLS, and the gRPC credentials built from them.

Keys are EC P-256, signatures SHA-256. Private keys are written unencrypted with mode 0600;
certificates with mode 0644. Everything is done with the `cryptography` library (no openssl
subprocess).
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_CERT = "ca.pem"
CA_KEY = "ca.key"
SERVER_CERT = "server.pem"
SERVER_KEY = "server.key"
DEFAULT_HOSTNAMES = ("localhost", "127.0.0.1")
# Tolerate clocks that are slightly behind the issuer's.
_BACKDATE = datetime.timedelta(minutes=5)


@dataclass(frozen=True)
class CertificateFiles:
    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path


# -- files ---------------------------------------------------------------------------------------


def _write(path: Path, data: bytes, mode: int) -> None:
    """Write a file created with `mode` from the start (a key is never readable by others, even briefly)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.fchmod(fd, mode)  # O_CREAT's mode is masked by the umask and ignored for an existing file
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]
    finally:
        os.close(fd)


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    _write(path, pem, 0o600)


def _write_cert(path: Path, cert: x509.Certificate) -> None:
    _write(path, cert.public_bytes(serialization.Encoding.PEM), 0o644)


def _load_cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(Path(path).read_bytes())


def _load_key(path: Path) -> ec.EllipticCurvePrivateKey:
    key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{path}: expected an EC private key, got {type(key).__name__}")
    return key


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedsync"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _validity(days: int) -> tuple[datetime.datetime, datetime.datetime]:
    if days < 1:
        raise ValueError(f"days must be at least 1, got {days}")
    now = datetime.datetime.now(datetime.UTC)
    return now - _BACKDATE, now + datetime.timedelta(days=days)


def _subject_alt_names(hostnames: Sequence[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for host in hostnames:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


# -- generation ----------------------------------------------------------------------------------


def generate_ca(out_dir: Path, common_name: str = "fedsync local CA", days: int = 3650) -> tuple[Path, Path]:
    """A self-signed CA that may sign leaf certificates only; returns (ca.pem, ca.key)."""
    out_dir = Path(out_dir)
    key = _new_key()
    not_before, not_after = _validity(days)
    name = _name(common_name)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = out_dir / CA_CERT, out_dir / CA_KEY
    _write_key(key_path, key)
    _write_cert(cert_path, cert)
    return cert_path, key_path


def _leaf(
    ca_cert: Path,
    ca_key: Path,
    common_name: str,
    usage: x509.ObjectIdentifier,
    days: int,
    hostnames: Sequence[str] = (),
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    issuer = _load_cert(ca_cert)
    issuer_key = _load_key(ca_key)
    if issuer.public_key().public_numbers() != issuer_key.public_key().public_numbers():
        raise ValueError(f"{ca_key} is not the key of {ca_cert}")
    key = _new_key()
    not_before, not_after = _validity(days)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(issuer.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(min(not_after, issuer.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=True,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), critical=False)
    )
    if hostnames:
        builder = builder.add_extension(_subject_alt_names(hostnames), critical=False)
    return builder.sign(issuer_key, hashes.SHA256()), key


def generate_server_certificate(
    out_dir: Path,
    ca_cert: Path,
    ca_key: Path,
    hostnames: Sequence[str] = DEFAULT_HOSTNAMES,
    days: int = 825,
) -> tuple[Path, Path]:
    """A serverAuth certificate for `hostnames` (DNS names and IP addresses) signed by the CA;
    returns (server.pem, server.key)."""
    hostnames = list(hostnames)
    if not hostnames:
        raise ValueError("a server certificate needs at least one hostname or IP address")
    cert, key = _leaf(ca_cert, ca_key, hostnames[0], ExtendedKeyUsageOID.SERVER_AUTH, days, hostnames)
    out_dir = Path(out_dir)
    cert_path, key_path = out_dir / SERVER_CERT, out_dir / SERVER_KEY
    _write_key(key_path, key)
    _write_cert(cert_path, cert)
    return cert_path, key_path


def generate_client_certificate(
    out_dir: Path, ca_cert: Path, ca_key: Path, device_id: str, days: int = 825
) -> tuple[Path, Path]:
    """A clientAuth certificate with CN=device_id for mutual TLS; returns (<device_id>.pem, <device_id>.key)."""
    from fedsync.wire import valid_device_id

    if not valid_device_id(device_id):
        raise ValueError(f"invalid device id {device_id!r} (1-64 of A-Z a-z 0-9 . _ -)")
    cert, key = _leaf(ca_cert, ca_key, device_id, ExtendedKeyUsageOID.CLIENT_AUTH, days)
    out_dir = Path(out_dir)
    cert_path, key_path = out_dir / f"{device_id}.pem", out_dir / f"{device_id}.key"
    _write_key(key_path, key)
    _write_cert(cert_path, cert)
    return cert_path, key_path


def generate_all(
    out_dir: Path, hostnames: Sequence[str] = DEFAULT_HOSTNAMES, *, overwrite: bool = False
) -> CertificateFiles:
    """A new CA and a server certificate it signed, in `out_dir`. Refuses to replace existing
    files (a new CA would invalidate every certificate the old one signed) unless overwrite=True."""
    out_dir = Path(out_dir)
    files = CertificateFiles(out_dir / CA_CERT, out_dir / CA_KEY, out_dir / SERVER_CERT, out_dir / SERVER_KEY)
    if not overwrite:
        existing = [p.name for p in (files.ca_cert, files.ca_key, files.server_cert, files.server_key) if p.exists()]
        if existing:
            raise FileExistsError(
                f"{out_dir} already holds {', '.join(existing)}: refusing to overwrite (pass overwrite=True)"
            )
    ca_cert, ca_key = generate_ca(out_dir)
    generate_server_certificate(out_dir, ca_cert, ca_key, hostnames)
    return files


# -- gRPC credentials ----------------------------------------------------------------------------


def server_credentials(
    files: CertificateFiles | None = None,
    *,
    server_cert: Path | None = None,
    server_key: Path | None = None,
    ca_cert: Path | None = None,
    require_client_cert: bool = False,
) -> grpc.ServerCredentials:
    """Server TLS credentials from a CertificateFiles or explicit paths. With
    require_client_cert=True, clients must present a certificate signed by `ca_cert` (mutual TLS)."""
    if files is not None:
        server_cert = server_cert or files.server_cert
        server_key = server_key or files.server_key
        ca_cert = ca_cert or files.ca_cert
    if server_cert is None or server_key is None:
        raise ValueError("server_credentials needs a server certificate and key")
    if require_client_cert and ca_cert is None:
        raise ValueError("require_client_cert=True needs the CA certificate that signs client certificates")
    pair = (Path(server_key).read_bytes(), Path(server_cert).read_bytes())
    roots = Path(ca_cert).read_bytes() if ca_cert is not None and require_client_cert else None
    return grpc.ssl_server_credentials([pair], root_certificates=roots, require_client_auth=require_client_cert)


def channel_credentials(
    ca_cert: Path, client_cert: Path | None = None, client_key: Path | None = None
) -> grpc.ChannelCredentials:
    """Client TLS credentials trusting `ca_cert`; with a client certificate and key for mutual TLS."""
    if (client_cert is None) != (client_key is None):
        raise ValueError("pass both client_cert and client_key, or neither")
    return grpc.ssl_channel_credentials(
        root_certificates=Path(ca_cert).read_bytes(),
        private_key=Path(client_key).read_bytes() if client_key is not None else None,
        certificate_chain=Path(client_cert).read_bytes() if client_cert is not None else None,
    )
