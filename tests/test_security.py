"""Device credentials checked by a server interceptor, streams bound to their device, health and
reflection served: against a real coordinator on loopback."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from client import EdgeClient
from coordinator import Coordinator
from fedsync.aggregation import Strategy
from fedsync.v1 import sync_pb2 as pb
from fedsync.v1.sync_pb2_grpc import SyncStub
from fedsync.wire import call_metadata


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Coordinator]:
    coordinator = Coordinator(
        tmp_path_factory.mktemp("secured"),
        strategy=Strategy.fedbuff(buffer_size=10),
        auto_aggregate=False,
        publish_int8=False,
        publish_trainable_head=False,
        require_credentials=True,
    )
    coordinator.start("127.0.0.1:0")
    yield coordinator
    coordinator.stop()


def hello(coordinator: Coordinator, metadata: tuple[tuple[str, str], ...]) -> pb.HelloResponse:
    with grpc.insecure_channel(coordinator.address) as channel:
        return SyncStub(channel).Hello(pb.HelloRequest(), metadata=metadata, timeout=10)


def status_of(call: Callable[[], object]) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code()


def test_only_the_stored_hash_of_a_credential_is_kept(secured: Coordinator) -> None:
    token = secured.enroll("device-hash")
    stored = secured.store.conn.execute(
        "SELECT token_sha256 FROM credentials WHERE device_id = 'device-hash'"
    ).fetchone()[0]
    assert len(stored) == 32 and token.encode() not in stored
    dump = "\n".join(secured.store.conn.iterdump())
    assert token not in dump


def test_enrolled_device_syncs_and_others_are_refused(secured: Coordinator, tmp_path: Path) -> None:
    token = secured.enroll("device-ok")
    client = EdgeClient(tmp_path / "ok", "device-ok", credential=token, fine_tuning=None)
    try:
        assert client.sync(secured.address, attempts=1).installed_version == 1
    finally:
        client.close()
    assert status_of(lambda: hello(secured, (("x-fedsync-device", "device-ok"),))) == grpc.StatusCode.UNAUTHENTICATED
    wrong = call_metadata("device-ok", "not-a-token")
    assert status_of(lambda: hello(secured, wrong)) == grpc.StatusCode.UNAUTHENTICATED
    unknown = call_metadata("never-enrolled", "whatever")
    assert status_of(lambda: hello(secured, unknown)) == grpc.StatusCode.UNAUTHENTICATED


def test_a_device_cannot_act_as_another(secured: Coordinator) -> None:
    alice = secured.enroll("alice")
    secured.enroll("bob")
    as_bob = call_metadata("bob", alice)
    assert status_of(lambda: hello(secured, as_bob)) == grpc.StatusCode.PERMISSION_DENIED

    def push_as_bob() -> None:
        with grpc.insecure_channel(secured.address) as channel:
            batch = pb.EventBatch(
                seq=[1],
                input_hashes=b"x" * 32,
                labels=[1],
                confidences=[0.5],
                model_versions=[1],
                latencies_us=[1.0],
                times_unix_ns=[1],
            )
            list(SyncStub(channel).PushEvents(iter([batch]), metadata=as_bob, timeout=10))

    assert status_of(push_as_bob) == grpc.StatusCode.PERMISSION_DENIED
    assert secured.store.high_waters("bob") == (0, 0)
    # Re-enrolling replaces the credential: the old token stops working.
    new_alice = secured.enroll("alice")
    assert hello(secured, call_metadata("alice", new_alice)).current_model_version == 1
    assert status_of(lambda: hello(secured, call_metadata("alice", alice))) == grpc.StatusCode.UNAUTHENTICATED


def test_health_and_reflection_are_served_without_credentials(secured: Coordinator) -> None:
    with grpc.insecure_channel(secured.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "fedsync.v1.Sync"):
            response = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert response.status == health_pb2.HealthCheckResponse.SERVING
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        (response,) = list(reflection.ServerReflectionInfo(iter([request]), timeout=10))
        names = {s.name for s in response.list_services_response.service}
        assert "fedsync.v1.Sync" in names and "grpc.health.v1.Health" in names
