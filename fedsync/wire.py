"""Conventions shared by both ends of the wire that the .proto cannot express."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path

import grpc

DEVICE_METADATA_KEY = "x-fedsync-device"
AUTHORIZATION_METADATA_KEY = "authorization"
DEVICE_ID_PATTERN = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
# Larger than any single message we send (event batches and 1 MiB chunks), with headroom.
MAX_MESSAGE_BYTES = 16 * 1024 * 1024
INPUT_HASH_BYTES = 32
# Client interceptors added to the channels opened in this context (fault injection, e.g. the
# simulator's mid-sync dropouts). A ContextVar, so syncs on other threads are not affected.
_extra_interceptors: ContextVar[tuple[object, ...]] = ContextVar("fedsync_channel_interceptors", default=())
_channel_pool: ContextVar[ChannelPool | None] = ContextVar("fedsync_channel_pool", default=None)


def channel_options() -> list[tuple[str, int]]:
    return [
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        # Each channel its own connections: a fresh sync must not inherit another channel's
        # connection still in reconnect backoff after a cut link.
        ("grpc.use_local_subchannel_pool", 1),
        # A stream's flow-control window starts at 8 MiB instead of 64 KiB: a sender keeps a few
        # chunks of a delta or model in flight instead of waiting for window updates (~+15-30%
        # upload throughput on loopback); it bounds what a stream may buffer at the receiver.
        ("grpc.http2.lookahead_bytes", 8 << 20),
        # grpc.experimental.ChannelOptions.SingleThreadedUnaryStream, client side (servers ignore it):
        # a model download (unary-stream) runs on the calling thread instead of starting a thread per
        # call, which costs more than downloading a small model.
        ("SingleThreadedUnaryStream", 1),
    ]


def valid_device_id(device_id: str) -> bool:
    return bool(DEVICE_ID_PATTERN.match(device_id))


@dataclass(frozen=True)
class ClientTLS:
    """PEM files a client trusts the coordinator with; cert and key for mutual TLS."""

    ca: Path
    cert: Path | None = None
    key: Path | None = None

    def channel_credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca.read_bytes(),
            private_key=self.key.read_bytes() if self.key else None,
            certificate_chain=self.cert.read_bytes() if self.cert else None,
        )


@contextlib.contextmanager
def channel_interceptors(*interceptors: object) -> Iterator[None]:
    """Channels opened by `open_channel` in this context (thread) go through these interceptors."""
    token = _extra_interceptors.set(_extra_interceptors.get() + interceptors)
    try:
        yield
    finally:
        _extra_interceptors.reset(token)


def _new_channel(address: str, tls: ClientTLS | None) -> grpc.Channel:
    if tls is None:
        return grpc.insecure_channel(address, options=channel_options())
    return grpc.secure_channel(address, tls.channel_credentials(), options=channel_options())


def open_channel(address: str, tls: ClientTLS | None = None) -> grpc.Channel:
    pool = _channel_pool.get()
    channel = _new_channel(address, tls) if pool is None else pool.borrow(address, tls)
    interceptors = _extra_interceptors.get()
    return grpc.intercept_channel(channel, *interceptors) if interceptors else channel


class ChannelPool:
    """One channel per (address, TLS) shared by the clients of a host, as behind one gateway: what
    a connection costs (~0.5 ms a sync on loopback) is paid once, and every call still carries its
    own device's credentials. Used by `pooled_channels`; close() closes the channels."""

    def __init__(self) -> None:
        self._channels: dict[tuple[str, ClientTLS | None], grpc.Channel] = {}

    def borrow(self, address: str, tls: ClientTLS | None) -> grpc.Channel:
        channel = self._channels.get((address, tls))
        if channel is None:
            channel = self._channels[(address, tls)] = _new_channel(address, tls)
        return _Borrowed(channel)

    def close(self) -> None:
        channels, self._channels = self._channels, {}
        for channel in channels.values():
            channel.close()


@contextlib.contextmanager
def pooled_channels(pool: ChannelPool) -> Iterator[None]:
    """Channels opened by `open_channel` in this context come from `pool` (closing them is a no-op)."""
    token = _channel_pool.set(pool)
    try:
        yield
    finally:
        _channel_pool.reset(token)


class _Borrowed(grpc.Channel):
    """A pooled channel as its borrower sees it: closing it leaves it open for the next one."""

    def __init__(self, channel: grpc.Channel) -> None:
        self._channel = channel

    def subscribe(self, callback, try_to_connect=False):  # type: ignore[no-untyped-def]
        self._channel.subscribe(callback, try_to_connect=try_to_connect)

    def unsubscribe(self, callback):  # type: ignore[no-untyped-def]
        self._channel.unsubscribe(callback)

    def unary_unary(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        return self._channel.unary_unary(*args, **kwargs)

    def unary_stream(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        return self._channel.unary_stream(*args, **kwargs)

    def stream_unary(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        return self._channel.stream_unary(*args, **kwargs)

    def stream_stream(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        return self._channel.stream_stream(*args, **kwargs)

    def close(self) -> None:
        pass

    def __enter__(self) -> _Borrowed:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


def call_metadata(device_id: str, credential: str | None) -> tuple[tuple[str, str], ...]:
    if credential is None:
        return ((DEVICE_METADATA_KEY, device_id),)
    return ((DEVICE_METADATA_KEY, device_id), (AUTHORIZATION_METADATA_KEY, f"Bearer {credential}"))
