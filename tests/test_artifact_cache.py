"""Clients on one host share downloaded model artifacts by content (client.artifact_cache)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from client import Durability, EdgeClient
from client.artifact_cache import ArtifactCache
from coordinator import Coordinator
from fedsync.aggregation import Strategy
from fedsync.sim.data import load_digits_split


def _client(tmp_path: Path, name: str, cache: ArtifactCache) -> EdgeClient:
    return EdgeClient(tmp_path / name, name, durability=Durability.PROCESS, fine_tuning="litert", artifact_cache=cache)


def test_the_second_client_links_what_the_first_downloaded_and_a_damaged_copy_is_not_used(tmp_path: Path) -> None:
    coordinator = Coordinator(tmp_path / "coordinator", strategy=Strategy.fedbuff(buffer_size=1), auto_aggregate=False)
    coordinator.start("127.0.0.1:0")
    cache = ArtifactCache(tmp_path / "shared")
    clients = [_client(tmp_path, f"device-{i}", cache) for i in range(3)]
    try:
        first = clients[0].sync(coordinator.address)
        assert first.bytes_down > 0 and first.bytes_shared == 0
        manifest = clients[0].models.manifest()
        assert manifest is not None
        wanted = [a for a in manifest.artifacts if a.kind in clients[0].wanted_artifact_kinds()]
        second = clients[1].sync(coordinator.address)
        assert second.bytes_shared == sum(a.size for a in wanted)
        assert second.bytes_down < first.bytes_down - second.bytes_shared + 1
        for a in wanted:
            one = clients[0].models.version_dir(manifest.version) / a.name
            two = clients[1].models.version_dir(manifest.version) / a.name
            assert os.stat(one).st_ino == os.stat(two).st_ino  # one file on disk
        # Both serve the model.
        train, _ = load_digits_split(seed=0)
        assert clients[1].predict(train.x[0]).model_version == manifest.version

        # A shared copy damaged on disk: the third client downloads its own and installs fine.
        damaged = cache.root / wanted[0].sha256
        os.unlink(damaged)
        damaged.write_bytes(b"\0" * wanted[0].size)
        third = clients[2].sync(coordinator.address)
        assert third.install_error is None and clients[2].model_version == manifest.version
        assert third.bytes_shared == sum(a.size for a in wanted[1:])
        assert np.isfinite(clients[2].predict(train.x[1]).confidence)
    finally:
        for c in clients:
            c.close()
        coordinator.stop()


def test_a_miss_or_an_impossible_link_falls_back_to_downloading(tmp_path: Path) -> None:
    cache = ArtifactCache(tmp_path / "shared")
    target = tmp_path / "model.tflite"
    assert not cache.link_into("ab" * 32, 10, target)
    source = tmp_path / "file"
    source.write_bytes(b"x" * 10)
    cache.add(source, "cd" * 32)
    assert not cache.link_into("cd" * 32, 11, target)  # size differs from the manifest's
    assert cache.link_into("cd" * 32, 10, target) and target.read_bytes() == b"x" * 10
    assert not cache.link_into("cd" * 32, 10, target)  # the target exists already


def test_clients_sharing_a_litert_trainer_get_the_delta_a_fresh_trainer_gives(tmp_path: Path) -> None:
    """Clients of a process share one LiteRT trainer per model file; each use starts from the file's weights."""
    coordinator = Coordinator(tmp_path / "coordinator", strategy=Strategy.fedbuff(buffer_size=1), auto_aggregate=False)
    coordinator.start("127.0.0.1:0")
    cache = ArtifactCache(tmp_path / "shared")
    clients = [_client(tmp_path, f"device-{i}", cache) for i in range(2)]
    train, _ = load_digits_split(seed=0)
    try:
        for c in clients:
            c.sync(coordinator.address)
        for c in clients:
            c.fine_tune(train.x[:40], train.y[:40], epochs=3, learning_rate=0.5, seed=7)
        payloads = [c.journal.conn.execute("SELECT payload FROM deltas WHERE seq = 1").fetchone()[0] for c in clients]
        assert payloads[0] == payloads[1]
        clients[0].fine_tune(train.x[40:80], train.y[40:80], epochs=3, learning_rate=0.5, seed=8)
        third = clients[0].journal.conn.execute("SELECT payload FROM deltas WHERE seq = 2").fetchone()[0]
        assert third != payloads[0]
    finally:
        for c in clients:
            c.close()
        coordinator.stop()
