"""A delta larger than one chunk goes up as a PushDelta stream; cut mid-way, it resumes at the
coordinator's byte offset. Smaller deltas go up in one PushWholeDelta call."""

from __future__ import annotations

from pathlib import Path

import pytest

import client.sync as sync_module
from client import Durability, EdgeClient
from coordinator import Coordinator
from fedsync.aggregation import Strategy
from fedsync.sim.data import load_digits_split
from fedsync.sim.dropout import LinkCutter, LinkDropped
from fedsync.wire import channel_interceptors


def test_a_cut_chunked_delta_resumes_at_the_coordinators_offset(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    train, _ = load_digits_split(seed=0)
    coordinator = Coordinator(
        tmp_path / "coordinator", strategy=Strategy.fedbuff(buffer_size=100), auto_aggregate=False
    )
    coordinator.start("127.0.0.1:0")
    client = EdgeClient(tmp_path / "device", "device-0", durability=Durability.PROCESS, fine_tuning="head")
    try:
        client.sync(coordinator.address)
        client.fine_tune(train.x[:64], train.y[:64], epochs=1, learning_rate=0.5)
        small = client.sync(coordinator.address)  # one unary call
        assert small.deltas_sent == 1 and small.resumed_delta_bytes == 0

        client.fine_tune(train.x[64:128], train.y[64:128], epochs=1, learning_rate=0.5)
        size = client.journal.conn.execute("SELECT length(payload) FROM deltas WHERE seq = 2").fetchone()[0]
        chunk = 64
        monkeypatch.setattr(sync_module, "DELTA_CHUNK_BYTES", chunk)
        assert size > 16 * chunk
        # Hello (request, response), the header, twelve chunks: then the link drops. gRPC sends a
        # stream's messages from a thread of its own, so the coordinator may have stored fewer.
        with channel_interceptors(LinkCutter(2 + 1 + 12)), pytest.raises(LinkDropped) as cut:
            client.sync(coordinator.address, attempts=1)
        assert cut.value.method.endswith("/PushDelta")
        resumed = client.sync(coordinator.address)
        assert resumed.deltas_sent == 1
        assert 0 < resumed.resumed_delta_bytes <= 12 * chunk and resumed.resumed_delta_bytes % chunk == 0
        stored = coordinator.store.conn.execute("SELECT seq FROM deltas ORDER BY seq").fetchall()
        assert [seq for (seq,) in stored] == [1, 2]
        (delta,) = coordinator.store.iter_deltas([("device-0", 2)])
        payload = client.journal.conn.execute("SELECT payload FROM deltas WHERE seq = 2").fetchone()[0]
        assert delta.payload == payload
    finally:
        client.close()
        coordinator.stop()
