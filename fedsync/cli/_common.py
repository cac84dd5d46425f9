"""What the commands share: the one-line error and argument checks."""

from __future__ import annotations

import socket
import tempfile
from pathlib import Path


class CommandError(Exception):
    """A user-facing error: printed as one line."""


def _writable_file(path: str) -> Path:
    target = Path(path)
    if target.is_dir():
        raise CommandError(f"report path {path} is a directory")
    existing = target.parent
    while not existing.exists():
        existing = existing.parent
    try:
        # os.access is no test: it says yes to root everywhere, and to a regular file "parent".
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as exc:
        raise CommandError(f"report path {path} is not writable: {exc.strerror or exc}") from None
    return target


def _check_address(address: str) -> None:
    """Fail before any work (and before gRPC logs its own error) when the address cannot be bound."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise CommandError(f"--address must be host:port, got {address!r}")
    host = host.strip("[]") or "0.0.0.0"
    try:
        infos = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
    except OSError as exc:
        raise CommandError(f"cannot listen on {address}: {exc}") from None
    family, _, _, _, sockaddr = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(sockaddr)
        except OSError as exc:
            raise CommandError(f"cannot listen on {address}: {exc.strerror or exc}") from None


# -- coordinator ------------------------------------------------------------------------------
