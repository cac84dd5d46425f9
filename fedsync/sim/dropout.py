"""Mid-sync dropouts over the real gRPC path.

A `LinkCutter` is a client interceptor that lets a drawn number of a sync session's messages
through and then drops the link: the call in flight is cancelled (the coordinator sees its stream
end abruptly, keeping what it committed) and the client gets UNAVAILABLE. The device resumes from
the coordinator's marks on its next sync, so nothing it journaled is lost or counted twice.

Messages are counted in an order that does not depend on thread timing: requests and responses of
unary and client-streaming calls, responses only of the bidirectional event stream (whose requests
gRPC sends from its own thread, interleaved with the acks at random).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import grpc

from fedsync.wire import channel_interceptors

if TYPE_CHECKING:
    from client import EdgeClient
    from client.sync import SyncReport

# A dropping link lasts a uniformly drawn 0 to MAX_CUT_MESSAGES - 1 messages: 0, the Hello never
# arrives; 1, it arrives (with the events and delta it carries) but its answer is lost; 2, the
# link drops after the Hello, while corrections or model files are pulled. A sync of a device
# with little pending is a Hello and its answer, and a model linked from the host's shared
# artifacts: one that finishes before its link drops is not cut.
MAX_CUT_MESSAGES = 3


class LinkDropped(grpc.RpcError):
    """The simulated link went down mid-sync."""

    def __init__(self, method: str, passed: int) -> None:
        super().__init__(f"link dropped during {method} after {passed} messages")
        self.method = method
        self.message = str(self.args[0])

    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.UNAVAILABLE

    def details(self) -> str:
        return self.message


class _RequestsCut(Exception):
    """Raised in gRPC's request-sending thread: gRPC cancels the call."""


class _QuietCuts(logging.Filter):
    """gRPC logs the exception that ended a request stream; ours is the simulated dropout."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and isinstance(record.exc_info[1], _RequestsCut))


logging.getLogger("grpc._channel").addFilter(_QuietCuts())


class LinkCutter(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Lets `cut_after` messages through, then drops the link for the rest of the session."""

    def __init__(self, cut_after: int) -> None:
        self.cut_after = cut_after
        self.passed = 0
        self.bytes = 0  # serialized size of the messages that got through, both directions
        self.tripped = False
        self._lock = threading.Lock()

    def _admit(self, message: Any, counted: bool = True) -> bool:
        with self._lock:
            if self.tripped:
                return False
            if counted:
                if self.passed >= self.cut_after:
                    self.tripped = True
                    return False
                self.passed += 1
            self.bytes += message.ByteSize()
            return True

    def _dropped(self, details: grpc.ClientCallDetails) -> LinkDropped:
        return LinkDropped(details.method, self.passed)

    def _requests(self, requests: Iterator[Any], counted: bool) -> Iterator[Any]:
        try:
            for message in requests:
                if not self._admit(message, counted):
                    raise _RequestsCut
                yield message
        finally:
            close = getattr(requests, "close", None)
            if close is not None:
                close()  # the caller's generator releases what it holds (journal readers)

    def intercept_unary_unary(self, continuation: Callable, details: grpc.ClientCallDetails, request: Any) -> Any:
        if not self._admit(request):
            raise self._dropped(details)
        outcome = continuation(details, request)
        if outcome.exception() is None and not self._admit(outcome.result()):
            raise self._dropped(details)  # the coordinator handled the call; its answer is lost
        return outcome

    def intercept_unary_stream(self, continuation: Callable, details: grpc.ClientCallDetails, request: Any) -> Any:
        if not self._admit(request):
            raise self._dropped(details)
        return _CutResponses(continuation(details, request), self, details)

    def intercept_stream_unary(self, continuation: Callable, details: grpc.ClientCallDetails, requests: Any) -> Any:
        outcome = continuation(details, self._requests(requests, counted=True))
        if self.tripped or (outcome.exception() is None and not self._admit(outcome.result())):
            raise self._dropped(details)
        return outcome

    def intercept_stream_stream(self, continuation: Callable, details: grpc.ClientCallDetails, requests: Any) -> Any:
        return _CutResponses(continuation(details, self._requests(requests, counted=False)), self, details)


class _CutResponses:
    """A response stream that ends in `LinkDropped` once the cutter trips."""

    def __init__(self, call: Any, cutter: LinkCutter, details: grpc.ClientCallDetails) -> None:
        self._call = call
        self._cutter = cutter
        self._details = details

    def __iter__(self) -> _CutResponses:
        return self

    def __next__(self) -> Any:
        try:
            message = next(self._call)
        except grpc.RpcError:
            if self._cutter.tripped:
                raise self._cutter._dropped(self._details) from None
            raise
        if not self._cutter._admit(message):
            self._call.cancel()
            raise self._cutter._dropped(self._details)
        return message

    def cancel(self) -> bool:
        return self._call.cancel()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._call, name)


@dataclass(frozen=True)
class SyncOutcome:
    """One device's sync attempt, as the simulation reports it."""

    device: int
    events_sent: int = 0
    deltas_sent: int = 0
    deltas_rejected: int = 0
    corrections_applied: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    bytes_shared: int = 0  # model bytes linked from the host's shared artifact cache, not downloaded
    dropout: bool = False  # the attempt's link was drawn to drop
    cut: bool = False  # and dropped before the sync was done
    cut_bytes: int = 0  # what crossed the link before a cut

    @classmethod
    def from_report(cls, device: int, report: SyncReport, events_acked: int, dropout: bool) -> SyncOutcome:
        return cls(
            device,
            events_acked,
            report.deltas_sent,
            report.deltas_rejected,
            report.corrections_applied,
            report.bytes_up,
            report.bytes_down,
            report.bytes_shared,
            dropout,
        )


def sync_device(
    client: EdgeClient, device: int, address: str, cut_after: int | None, *, timeout_s: float = 60.0
) -> SyncOutcome:
    """Sync one device; with `cut_after`, its link drops after that many messages (no retry: the
    device is gone until its next online period).

    Events count as synced when the device's journal marks them acknowledged, which also counts
    those acknowledged before a cut, or whose ack a cut lost and the next sync's Hello recovered."""
    acked_before = client.journal.events_acked()
    if cut_after is None:
        report = client.sync(address, timeout_s=timeout_s)
        return SyncOutcome.from_report(device, report, client.journal.events_acked() - acked_before, False)
    cutter = LinkCutter(cut_after)
    with channel_interceptors(cutter):
        try:
            report = client.sync(address, timeout_s=timeout_s, attempts=1)
        except LinkDropped:
            acked = client.journal.events_acked() - acked_before
            return SyncOutcome(device, events_sent=acked, dropout=True, cut=True, cut_bytes=cutter.bytes)
    return SyncOutcome.from_report(device, report, client.journal.events_acked() - acked_before, True)
