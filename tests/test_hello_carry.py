"""A Hello that carries the client's pending events and delta: a whole sync in one round trip.

The coordinator applies what a Hello carries under exactly the rules of PushEvents and
PushWholeDelta, and what fails a transfer check stays unapplied (the regular call reports it).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

import client.sync as client_sync
from client import Durability, EdgeClient
from coordinator import Coordinator
from fedsync.sim.data import load_digits_split
from fedsync.sim.dropout import LinkCutter, LinkDropped
from fedsync.v1 import sync_pb2 as pb
from fedsync.v1.sync_pb2_grpc import SyncStub
from fedsync.wire import channel_interceptors, channel_options
from tests.test_service_errors import (
    TIMEOUT_S,
    Code,
    as_rows,
    batch,
    delta_header,
    delta_rows,
    event,
    expect_status,
    input_hash,
    md,
    new_device,
    push_events,
    small_delta,
    start_coordinator,
    stop_within,
    stored_events,
    stored_payload,
)


@pytest.fixture(scope="module")
def coordinator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Coordinator]:
    coordinator = start_coordinator(tmp_path_factory.mktemp("coordinator"))
    yield coordinator
    assert stop_within(coordinator, 10)


@pytest.fixture(scope="module")
def stub(coordinator: Coordinator) -> Iterator[SyncStub]:
    with grpc.insecure_channel(coordinator.address, options=channel_options()) as channel:
        yield SyncStub(channel)


def carrying_hello(stub: SyncStub, device: str, **carried: Any) -> pb.HelloResponse:
    request = pb.HelloRequest(model_version=1, **carried)
    return stub.Hello(request, metadata=md(device), timeout=TIMEOUT_S)


def test_events_and_a_delta_ride_the_hello_and_take_effect_once(stub: SyncStub, coordinator: Coordinator) -> None:
    device = new_device("carry")
    events = [event(1, input_hash(device, 1), label=2), event(2, input_hash(device, 2), label=7)]
    header, payload = delta_header(1, small_delta(coordinator, 1))
    carried = {"events": batch(*events), "delta": pb.WholeDelta(header=header, payload=payload)}

    first = carrying_hello(stub, device, **carried)
    assert (first.events_ack.high_water, first.events_ack.accepted, first.events_ack.duplicates) == (2, 2, 0)
    assert (first.delta_ack.seq, first.delta_ack.status, first.delta_ack.deltas_high_water) == (
        1,
        pb.DeltaAck.ACCEPTED,
        1,
    )
    assert (first.events_high_water, first.deltas_high_water) == (2, 1)  # the marks after what it carried
    assert stored_events(coordinator, device) == as_rows(events)
    assert stored_payload(coordinator, device, 1) == payload

    # The answer was lost, say: the same Hello again is acknowledged and changes nothing.
    again = carrying_hello(stub, device, **carried)
    assert (again.events_ack.accepted, again.events_ack.duplicates) == (0, 2)
    assert again.delta_ack.status == pb.DeltaAck.DUPLICATE
    assert (again.events_high_water, again.deltas_high_water) == (2, 1)
    assert stored_events(coordinator, device) == as_rows(events)
    assert delta_rows(coordinator, device) == [(1, "buffered", True)]

    plain = carrying_hello(stub, device)  # nothing carried, nothing acknowledged
    assert not plain.HasField("events_ack") and not plain.HasField("delta_ack")
    assert (plain.events_high_water, plain.deltas_high_water) == (2, 1)


def test_what_fails_a_transfer_check_is_left_for_the_regular_call(stub: SyncStub, coordinator: Coordinator) -> None:
    device = new_device("carry-bad")
    header, payload = delta_header(1, small_delta(coordinator, 1))
    forged = pb.WholeDelta(header=header, payload=bytes(len(payload)))  # sha256 mismatch
    gap = batch(event(3, input_hash(device, 3)))  # events 1 and 2 never came
    short_hashes = batch(event(1, input_hash(device, 1)))
    short_hashes.input_hashes = short_hashes.input_hashes[:-1]
    carrying_hello(stub, device)  # registers the device
    before = coordinator.store.counts()

    for carried in ({"events": gap, "delta": forged}, {"events": short_hashes}):
        answer = carrying_hello(stub, device, **carried)
        assert not answer.HasField("events_ack") and not answer.HasField("delta_ack")
        assert (answer.events_high_water, answer.deltas_high_water) == (0, 0)
    assert coordinator.store.counts() == before

    # The regular calls report the precise error, and accept the right content.
    expect_status(lambda: stub.PushWholeDelta(forged, metadata=md(device)), Code.DATA_LOSS, "sha256")
    assert push_events(stub, device, gap)[1].code() == Code.FAILED_PRECONDITION
    right = carrying_hello(
        stub, device, events=batch(event(1, input_hash(device, 1))), delta=pb.WholeDelta(header=header, payload=payload)
    )
    assert (right.events_high_water, right.deltas_high_water) == (1, 1)


def test_a_carried_delta_refused_for_its_content_is_recorded_and_acknowledged_as_rejected(
    stub: SyncStub, coordinator: Coordinator
) -> None:
    device = new_device("carry-nan")
    tensors = small_delta(coordinator, 1)
    first = next(iter(tensors))
    tensors[first].flat[0] = np.nan
    header, payload = delta_header(1, tensors)
    whole = pb.WholeDelta(header=header, payload=payload)

    answer = carrying_hello(stub, device, delta=whole)
    assert answer.delta_ack.status == pb.DeltaAck.REJECTED and "delta 1 rejected" in answer.delta_ack.reason
    assert answer.deltas_high_water == 1
    assert delta_rows(coordinator, device) == [(1, "rejected", False)]
    # A retransmission by the regular call gets the same answer.
    replay = stub.PushWholeDelta(whole, metadata=md(device), timeout=TIMEOUT_S)
    assert replay.status == pb.DeltaAck.REJECTED


class CallLog(grpc.UnaryUnaryClientInterceptor, grpc.StreamStreamClientInterceptor, grpc.UnaryStreamClientInterceptor):
    """The methods a session calls, in order."""

    def __init__(self) -> None:
        self.methods: list[str] = []

    def _log(self, details: grpc.ClientCallDetails) -> None:
        self.methods.append(details.method.rsplit("/", 1)[-1])

    def intercept_unary_unary(self, continuation: Any, details: grpc.ClientCallDetails, request: Any) -> Any:
        self._log(details)
        return continuation(details, request)

    def intercept_unary_stream(self, continuation: Any, details: grpc.ClientCallDetails, request: Any) -> Any:
        self._log(details)
        return continuation(details, request)

    def intercept_stream_stream(self, continuation: Any, details: grpc.ClientCallDetails, requests: Any) -> Any:
        self._log(details)
        return continuation(details, requests)


@pytest.fixture
def device(tmp_path: Path) -> Iterator[EdgeClient]:
    device = EdgeClient(tmp_path / "device", "device-carry", durability=Durability.PROCESS, fine_tuning="head")
    try:
        yield device
    finally:
        device.close()


@pytest.mark.parametrize("carried", [True, False], ids=["carried", "regular-calls"])
def test_a_client_syncs_its_pending_work_in_one_round_trip(
    tmp_path: Path, device: EdgeClient, monkeypatch: pytest.MonkeyPatch, carried: bool
) -> None:
    monkeypatch.setattr(client_sync, "HELLO_CARRIES_PENDING", carried)
    coordinator = Coordinator(tmp_path / "coordinator", auto_aggregate=False, publish_int8=False)
    coordinator.start("127.0.0.1:0")
    train, _ = load_digits_split(seed=0)
    try:
        device.sync(coordinator.address)  # installs version 1
        for x in train.x[:5]:
            device.predict(x)
        device.fine_tune(train.x[:32], train.y[:32], epochs=1, learning_rate=0.5)
        calls = CallLog()
        with channel_interceptors(calls):
            report = device.sync(coordinator.address)
        assert calls.methods == (["Hello"] if carried else ["Hello", "PushEvents", "PushWholeDelta"])
        assert (report.events_sent, report.deltas_sent) == (5, 1)
        assert device.journal.events_acked() == 5 and device.journal.pending_delta_count() == 0
        assert coordinator.store.counts()["events"] == 5 and coordinator.store.counts()["deltas_buffered"] == 1
    finally:
        coordinator.stop()


def test_a_lost_hello_answer_costs_a_retransmission_not_a_duplicate(tmp_path: Path, device: EdgeClient) -> None:
    coordinator = Coordinator(tmp_path / "coordinator", auto_aggregate=False, publish_int8=False)
    coordinator.start("127.0.0.1:0")
    train, _ = load_digits_split(seed=0)
    try:
        device.sync(coordinator.address)
        for x in train.x[:3]:
            device.predict(x)
        device.fine_tune(train.x[:32], train.y[:32], epochs=1, learning_rate=0.5)
        with channel_interceptors(LinkCutter(1)), pytest.raises(LinkDropped):  # the Hello arrives, its answer doesn't
            device.sync(coordinator.address, attempts=1)
        assert coordinator.store.counts()["events"] == 3 and coordinator.store.counts()["deltas_buffered"] == 1
        assert device.journal.events_acked() == 0 and device.journal.pending_delta_count() == 1

        report = device.sync(coordinator.address)
        assert (report.events_sent, report.events_duplicates, report.deltas_sent) == (0, 3, 0)  # acknowledged again
        assert device.journal.events_acked() == 3 and device.journal.pending_delta_count() == 0
        assert coordinator.store.counts()["events"] == 3 and coordinator.store.counts()["deltas_buffered"] == 1
    finally:
        coordinator.stop()
