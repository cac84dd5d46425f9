"""Device credentials: enrollment issues a random token, the coordinator keeps only its sha256, and a
server interceptor checks every call so that a caller can only act as the device it enrolled as.

Metadata on every call: "x-fedsync-device: <device id>" and "authorization: Bearer <token>".
A missing or unknown credential is UNAUTHENTICATED; a valid credential of another device is
PERMISSION_DENIED. Health checking and reflection stay open, for load balancers and tooling.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable
from typing import Any

import grpc

from fedsync.wire import AUTHORIZATION_METADATA_KEY, DEVICE_METADATA_KEY, valid_device_id

OPEN_SERVICES = ("/grpc.health.v1.Health/", "/grpc.reflection.")
SCHEMA = """
CREATE TABLE IF NOT EXISTS credentials (
    device_id TEXT PRIMARY KEY,
    token_sha256 BLOB NOT NULL UNIQUE,
    created_ns INTEGER NOT NULL
);
"""


def token_digest(token: str) -> bytes:
    # Tokens are 256 random bits, so one sha256 is enough (no password-style stretching needed).
    return hashlib.sha256(token.encode()).digest()


class CredentialStore:
    def __init__(self, conn: sqlite3.Connection, lock: threading.RLock) -> None:
        self.conn = conn
        self.lock = lock
        with self.lock:
            self.conn.executescript(SCHEMA)

    def enroll(self, device_id: str) -> str:
        """Issue a new credential for the device (replacing any earlier one); returns the token."""
        if not valid_device_id(device_id):
            raise ValueError(f"device id {device_id!r} must be 1-64 of A-Z a-z 0-9 . _ -")
        token = secrets.token_urlsafe(32)
        with self.lock:
            self.conn.execute(
                "INSERT INTO credentials VALUES (?, ?, ?) ON CONFLICT(device_id) DO UPDATE SET "
                "token_sha256 = excluded.token_sha256, created_ns = excluded.created_ns",
                (device_id, token_digest(token), time.time_ns()),
            )
        return token

    def revoke(self, device_id: str) -> bool:
        with self.lock:
            return self.conn.execute("DELETE FROM credentials WHERE device_id = ?", (device_id,)).rowcount > 0

    def owner_of(self, token: str) -> str | None:
        with self.lock:
            row = self.conn.execute(
                "SELECT device_id FROM credentials WHERE token_sha256 = ?", (token_digest(token),)
            ).fetchone()
        return None if row is None else str(row[0])

    def check(self, device_id: str, token: str) -> tuple[grpc.StatusCode, str] | None:
        """None when the token is this device's credential, else the status to refuse with."""
        owner = self.owner_of(token)
        if owner is None:
            return grpc.StatusCode.UNAUTHENTICATED, "unknown or revoked credential"
        if not hmac.compare_digest(owner, device_id):
            return grpc.StatusCode.PERMISSION_DENIED, f"this credential does not belong to device {device_id!r}"
        return None


def _refusal(handler: grpc.RpcMethodHandler, code: grpc.StatusCode, message: str) -> grpc.RpcMethodHandler:
    def refuse(_request: Any, context: grpc.ServicerContext) -> Any:
        context.abort(code, message)

    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(refuse)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(refuse)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(refuse)
    return grpc.unary_unary_rpc_method_handler(refuse)


class CredentialInterceptor(grpc.ServerInterceptor):
    def __init__(self, credentials: CredentialStore) -> None:
        self.credentials = credentials

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(OPEN_SERVICES):
            return handler
        metadata = dict(handler_call_details.invocation_metadata or ())
        device_id = metadata.get(DEVICE_METADATA_KEY, "")
        authorization = metadata.get(AUTHORIZATION_METADATA_KEY, "")
        if not isinstance(device_id, str) or not valid_device_id(device_id):
            return _refusal(handler, grpc.StatusCode.UNAUTHENTICATED, f"missing or malformed '{DEVICE_METADATA_KEY}'")
        if not isinstance(authorization, str) or not authorization.startswith("Bearer "):
            return _refusal(handler, grpc.StatusCode.UNAUTHENTICATED, "missing 'authorization: Bearer <token>'")
        refusal = self.credentials.check(device_id, authorization.removeprefix("Bearer "))
        if refusal is not None:
            return _refusal(handler, *refusal)
        return handler
