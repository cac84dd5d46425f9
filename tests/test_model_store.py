"""ModelStore: verified installs, the atomic CURRENT pointer, rollback, prune, resume, storage report."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest

from client.model_store import CURRENT, GOOD, InstallError, ModelStore, StoredArtifact
from fedsync.manifest import (
    KERAS,
    MANIFEST_NAME,
    TFLITE_FLOAT32,
    TFLITE_INT8,
    Artifact,
    Manifest,
    TensorInfo,
)

LABELS = ["cat", "dog", "eel"]


@dataclass
class Published:
    """One version as a coordinator would publish it: the manifest and the artifact bytes."""

    manifest: Manifest
    blobs: dict[str, bytes]

    @property
    def json(self) -> bytes:
        return self.manifest.to_json()


def publish(src: Path, version: int, kinds: tuple[str, ...] = (TFLITE_FLOAT32, KERAS), **overrides) -> Published:
    """Write small artifact files under src and describe them with their real sha256 and size."""
    folder = src / f"pub-v{version}"
    folder.mkdir(parents=True, exist_ok=True)
    artifacts, blobs = [], {}
    for i, kind in enumerate(kinds):
        name = f"model-{kind}.bin"
        data = f"v{version}:{kind}:".encode() + bytes(range(256)) * (i + 2)
        (folder / name).write_bytes(data)
        on_disk = (folder / name).read_bytes()
        artifacts.append(Artifact(name, kind, hashlib.sha256(on_disk).hexdigest(), len(on_disk)))
        blobs[name] = on_disk
    fields = dict(
        version=version,
        parent_version=version - 1,
        created_unix=1_700_000_000.0 + version,
        artifacts=artifacts,
        inputs=[TensorInfo("x", [-1, 8, 8], "float32")],
        outputs=[TensorInfo("probs", [-1, len(LABELS)], "float32")],
        labels=list(LABELS),
        preprocessing="scale:1/16",
        metrics={"accuracy": 0.5},
    )
    fields.update(overrides)
    return Published(Manifest(**fields), blobs)


@dataclass
class FakeFetch:
    """Copies bytes from a dict; appends from the existing length, as a resuming download does."""

    blobs: dict[str, bytes]
    corrupt: set[str] = field(default_factory=set)
    truncate: set[str] = field(default_factory=set)
    calls: list[tuple[str, Path, int]] = field(default_factory=list)  # (name, path, size when called)
    written: dict[str, int] = field(default_factory=dict)

    def __call__(self, artifact: Artifact, path: Path) -> None:
        existing = path.stat().st_size if path.exists() else 0
        self.calls.append((artifact.name, path, existing))
        data = self.blobs[artifact.name]
        if artifact.name in self.corrupt:
            data = data[:-1] + bytes([data[-1] ^ 0xFF])  # same size, different bytes
        if artifact.name in self.truncate:
            data = data[: len(data) // 2]
        with open(path, "ab") as f:
            f.write(data[existing:])
        self.written[artifact.name] = self.written.get(artifact.name, 0) + len(data[existing:])


@dataclass
class SmokeTest:
    fail: bool = False
    calls: list[tuple[Path, int, list[str]]] = field(default_factory=list)

    def __call__(self, version_dir: Path, manifest: Manifest) -> None:
        self.calls.append((version_dir, manifest.version, sorted(p.name for p in version_dir.iterdir())))
        if self.fail:
            raise ValueError("model produced NaN")


@pytest.fixture
def src(tmp_path: Path) -> Path:
    return tmp_path / "published"


@pytest.fixture
def store(tmp_path: Path) -> ModelStore:
    return ModelStore(tmp_path / "models", keep_versions=3)


def install(store: ModelStore, pub: Published, kinds=(TFLITE_FLOAT32, KERAS), **kw) -> int:
    return store.install(pub.json, kw.pop("fetch", FakeFetch(pub.blobs)), kw.pop("smoke", SmokeTest()), kinds)


def dir_names(store: ModelStore) -> set[str]:
    return {p.name for p in store.root.iterdir() if p.is_dir()}


# -- installing ---------------------------------------------------------------------------------


def test_empty_store(store: ModelStore) -> None:
    assert store.current_version() == 0
    assert store.manifest() is None
    assert store.artifact_path(TFLITE_FLOAT32) is None
    assert store.installed_versions() == []
    assert store.good_versions() == []
    assert store.storage_report() == []
    assert store.rollback() == 0


def test_keep_versions_must_be_positive(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        ModelStore(tmp_path / "m", keep_versions=0)


def test_install_verifies_and_switches_current(store: ModelStore, src: Path) -> None:
    pub = publish(src, 1)
    fetch, smoke = FakeFetch(pub.blobs), SmokeTest()
    assert store.install(pub.json, fetch, smoke, [TFLITE_FLOAT32, KERAS]) == 1

    assert store.current_version() == 1
    assert (store.root / CURRENT).read_text().strip() == "1"
    assert store.installed_versions() == [1]
    assert store.good_versions() == [1]
    assert dir_names(store) == {"v1"}  # the staging folder became v1
    for artifact in pub.manifest.artifacts:
        assert (store.version_dir(1) / artifact.name).read_bytes() == pub.blobs[artifact.name]
    assert store.manifest() == pub.manifest
    assert Manifest.from_json((store.version_dir(1) / MANIFEST_NAME).read_bytes()) == pub.manifest
    assert store.artifact_path(KERAS) == store.version_dir(1) / "model-keras.bin"
    # The smoke test ran on the final folder, holding every artifact and the manifest.
    assert smoke.calls == [(store.version_dir(1), 1, sorted([*pub.blobs, MANIFEST_NAME]))]
    assert sorted(name for name, _, _ in fetch.calls) == sorted(pub.blobs)


def test_install_fetches_only_the_wanted_kinds(store: ModelStore, src: Path) -> None:
    pub = publish(src, 1, kinds=(TFLITE_FLOAT32, TFLITE_INT8, KERAS))
    fetch = FakeFetch(pub.blobs)
    store.install(pub.json, fetch, SmokeTest(), [TFLITE_INT8])
    assert [name for name, _, _ in fetch.calls] == ["model-tflite-int8.bin"]
    assert store.artifact_path(TFLITE_INT8) is not None
    assert store.artifact_path(TFLITE_FLOAT32) is None  # listed in the manifest, not downloaded
    assert store.manifest().artifact(TFLITE_FLOAT32) is not None  # type: ignore[union-attr]


def test_install_accepts_any_iterable_of_kinds(store: ModelStore, src: Path) -> None:
    pub = publish(src, 1, kinds=(TFLITE_FLOAT32, KERAS))
    fetch = FakeFetch(pub.blobs)
    store.install(pub.json, fetch, SmokeTest(), (k for k in (TFLITE_FLOAT32, KERAS)))
    assert sorted(name for name, _, _ in fetch.calls) == sorted(pub.blobs)
    assert store.artifact_path(KERAS) is not None


def test_install_with_none_of_the_kinds_fails(store: ModelStore, src: Path) -> None:
    pub = publish(src, 1, kinds=(KERAS,))
    fetch = FakeFetch(pub.blobs)
    with pytest.raises(InstallError, match="none of the artifact kinds"):
        store.install(pub.json, fetch, SmokeTest(), [TFLITE_INT8])
    assert fetch.calls == []
    assert store.current_version() == 0


def test_corrupt_bytes_fail_and_leave_current(store: ModelStore, src: Path) -> None:
    install(store, publish(src, 1))
    pub2 = publish(src, 2)
    smoke = SmokeTest()
    bad = FakeFetch(pub2.blobs, corrupt={"model-keras.bin"})
    with pytest.raises(InstallError, match="sha256"):
        install(store, pub2, fetch=bad, smoke=smoke)
    assert smoke.calls == []  # never reached
    assert store.current_version() == 1
    assert store.installed_versions() == [1]
    assert store.good_versions() == [1]
    assert store.artifact_path(KERAS) == store.version_dir(1) / "model-keras.bin"
    assert not (store.root / ".staging-v2" / "model-keras.bin").exists()  # the bad file is not kept for resume

    good = FakeFetch(pub2.blobs)
    assert install(store, pub2, fetch=good) == 2
    assert store.current_version() == 2
    assert (store.version_dir(2) / "model-keras.bin").read_bytes() == pub2.blobs["model-keras.bin"]


def test_wrong_size_fails_and_leaves_current(store: ModelStore, src: Path) -> None:
    install(store, publish(src, 1))
    pub2 = publish(src, 2)
    with pytest.raises(InstallError, match="size"):
        install(store, pub2, fetch=FakeFetch(pub2.blobs, truncate={"model-tflite-float32.bin"}))
    assert store.current_version() == 1
    assert not store.version_dir(2).exists()


def test_manifest_hash_mismatch_against_real_file(store: ModelStore, src: Path) -> None:
    """The manifest, not the fetch, is the authority: a manifest with a wrong digest refuses good bytes."""
    pub = publish(src, 1)
    wrong = [replace(a, sha256="0" * 64) if a.kind == KERAS else a for a in pub.manifest.artifacts]
    bad = Published(replace(pub.manifest, artifacts=wrong), pub.blobs)
    with pytest.raises(InstallError):
        install(store, bad)
    assert store.current_version() == 0
    assert store.installed_versions() == []


def test_smoke_test_failure_removes_version_and_keeps_current(store: ModelStore, src: Path) -> None:
    install(store, publish(src, 1))
    pub2 = publish(src, 2)
    smoke = SmokeTest(fail=True)
    with pytest.raises(InstallError, match="smoke test") as info:
        install(store, pub2, smoke=smoke)
    assert isinstance(info.value.__cause__, ValueError)
    assert len(smoke.calls) == 1
    assert not store.version_dir(2).exists()
    assert not (store.root / ".staging-v2").exists()
    assert store.current_version() == 1
    assert store.good_versions() == [1]
    assert store.installed_versions() == [1]
    assert store.manifest().version == 1  # type: ignore[union-attr]


def test_smoke_test_failure_on_first_install(store: ModelStore, src: Path) -> None:
    with pytest.raises(InstallError):
        install(store, publish(src, 1), smoke=SmokeTest(fail=True))
    assert store.current_version() == 0
    assert store.installed_versions() == []
    assert not (store.root / CURRENT).exists()


def test_labels_not_matching_outputs_is_refused(store: ModelStore, src: Path) -> None:
    install(store, publish(src, 1))
    pub2 = publish(src, 2, labels=["cat", "dog"])  # the output still has 3 units
    fetch = FakeFetch(pub2.blobs)
    with pytest.raises(InstallError, match="labels"):
        install(store, pub2, fetch=fetch)
    assert fetch.calls == []
    assert store.current_version() == 1
    assert dir_names(store) == {"v1"}


@pytest.mark.parametrize(
    "manifest_json",
    [
        b"{not json",
        b"{}",
        json.dumps({"version": 1}).encode(),
    ],
)
def test_malformed_manifest_is_an_install_error(store: ModelStore, manifest_json: bytes) -> None:
    with pytest.raises(InstallError):
        store.install(manifest_json, FakeFetch({}), SmokeTest(), [TFLITE_FLOAT32])
    assert store.current_version() == 0


@pytest.mark.parametrize(
    "overrides",
    [
        {"outputs": []},
        {"version": 0},
        {"format": "fedsync.manifest/0"},
    ],
)
def test_inconsistent_manifest_is_refused(store: ModelStore, src: Path, overrides: dict) -> None:
    good = publish(src, 1)
    pub = Published(replace(good.manifest, **overrides), good.blobs)
    fetch = FakeFetch(pub.blobs)
    with pytest.raises(InstallError):
        install(store, pub, fetch=fetch)
    assert fetch.calls == []
    assert store.installed_versions() == []


@pytest.mark.parametrize("name", ["../escape.bin", ".hidden", "sub/dir.bin", ""])
def test_artifact_names_cannot_leave_the_version_folder(store: ModelStore, src: Path, name: str) -> None:
    pub = publish(src, 1, kinds=(TFLITE_FLOAT32,))
    (artifact,) = pub.manifest.artifacts
    evil = Published(replace(pub.manifest, artifacts=[replace(artifact, name=name)]), {name: b""})
    with pytest.raises(InstallError, match="plain file name"):
        install(store, evil, kinds=[TFLITE_FLOAT32])
    assert not (store.root.parent / "escape.bin").exists()


# -- resume -------------------------------------------------------------------------------------


def test_partial_staging_file_is_resumed_not_restarted(store: ModelStore, src: Path) -> None:
    pub = publish(src, 1)
    name = "model-keras.bin"
    blob = pub.blobs[name]
    staging = store.root / ".staging-v1"
    staging.mkdir()
    half = len(blob) // 2
    (staging / name).write_bytes(blob[:half])

    fetch = FakeFetch(pub.blobs)
    assert install(store, pub, fetch=fetch) == 1
    by_name = {n: (path, size) for n, path, size in fetch.calls}
    assert by_name[name] == (staging / name, half)  # handed the existing partial file
    assert fetch.written[name] == len(blob) - half  # only the rest was transferred
    assert (store.version_dir(1) / name).read_bytes() == blob


def test_complete_staging_file_is_not_fetched_again(store: ModelStore, src: Path) -> None:
    pub = publish(src, 1)
    staging = store.root / ".staging-v1"
    staging.mkdir()
    (staging / "model-keras.bin").write_bytes(pub.blobs["model-keras.bin"])
    fetch = FakeFetch(pub.blobs)
    install(store, pub, fetch=fetch)
    assert [n for n, _, _ in fetch.calls] == ["model-tflite-float32.bin"]
    assert (store.version_dir(1) / "model-keras.bin").read_bytes() == pub.blobs["model-keras.bin"]


def test_complete_but_wrong_staging_file_is_refused_then_refetched(store: ModelStore, src: Path) -> None:
    pub = publish(src, 1)
    name = "model-keras.bin"
    staging = store.root / ".staging-v1"
    staging.mkdir()
    (staging / name).write_bytes(b"\0" * len(pub.blobs[name]))  # right size, wrong bytes
    with pytest.raises(InstallError, match="sha256"):
        install(store, pub)
    assert store.current_version() == 0
    fetch = FakeFetch(pub.blobs)
    assert install(store, pub, fetch=fetch) == 1
    assert (name, staging / name, 0) in fetch.calls  # restarted from scratch
    assert (store.version_dir(1) / name).read_bytes() == pub.blobs[name]


def test_interrupted_fetch_resumes_on_the_next_install(store: ModelStore, src: Path) -> None:
    pub = publish(src, 1)
    name = "model-keras.bin"

    class Interrupted(Exception):
        pass

    def dropping_fetch(artifact: Artifact, path: Path) -> None:
        with open(path, "ab") as f:
            f.write(pub.blobs[artifact.name][:100])
        raise Interrupted

    with pytest.raises(Interrupted):
        store.install(pub.json, dropping_fetch, SmokeTest(), [KERAS])
    assert store.current_version() == 0
    assert (store.root / ".staging-v1" / name).stat().st_size == 100

    fetch = FakeFetch(pub.blobs)
    store.install(pub.json, fetch, SmokeTest(), [KERAS])
    assert fetch.calls == [(name, store.root / ".staging-v1" / name, 100)]
    assert (store.version_dir(1) / name).read_bytes() == pub.blobs[name]


# -- rollback and prune -------------------------------------------------------------------------


def test_successive_installs_switch_current(store: ModelStore, src: Path) -> None:
    for v in (1, 2, 3):
        assert install(store, publish(src, v)) == v
        assert store.current_version() == v
        assert store.manifest().version == v  # type: ignore[union-attr]
    assert store.good_versions() == [1, 2, 3]


def test_rollback_returns_to_previous_good_version(store: ModelStore, src: Path) -> None:
    for v in (1, 2, 3):
        install(store, publish(src, v))
    assert store.rollback("bad accuracy") == 2
    assert store.current_version() == 2
    assert store.good_versions() == [1, 2]
    assert store.artifact_path(KERAS) == store.version_dir(2) / "model-keras.bin"
    assert store.rollback() == 1
    assert store.current_version() == 1
    assert store.rollback() == 0
    assert store.current_version() == 0
    assert store.manifest() is None


def test_rollback_skips_a_good_version_whose_folder_is_gone(store: ModelStore, src: Path) -> None:
    for v in (1, 2, 3):
        install(store, publish(src, v))
    import shutil

    shutil.rmtree(store.version_dir(2))
    assert store.rollback() == 1
    assert store.current_version() == 1


def test_rolled_back_version_is_pruned(store: ModelStore, src: Path) -> None:
    for v in (1, 2):
        install(store, publish(src, v))
    store.rollback()
    assert store.prune() == [2]
    assert store.installed_versions() == [1]
    assert store.current_version() == 1


def test_prune_keeps_newest_good_versions(tmp_path: Path, src: Path) -> None:
    store = ModelStore(tmp_path / "models", keep_versions=2)
    for v in (1, 2, 3, 4):
        install(store, publish(src, v))
    assert store.installed_versions() == [3, 4]  # install prunes as it goes
    assert store.good_versions() == [3, 4]
    assert store.current_version() == 4
    assert store.prune(keep_versions=1) == [3]
    assert store.installed_versions() == [4]
    assert store.prune() == []


def test_prune_always_keeps_current(store: ModelStore, src: Path) -> None:
    for v in (1, 2, 3):
        install(store, publish(src, v))
    # As after a crash inside the switch: GOOD already lists 3, CURRENT still says 2.
    (store.root / CURRENT).write_text("2")
    store = ModelStore(store.root, keep_versions=store.keep_versions, durable=store.durable)  # the restarted client
    removed = store.prune(keep_versions=1)
    assert removed == [1]
    assert store.installed_versions() == [2, 3]
    assert store.current_version() == 2


def test_prune_removes_leftover_staging_of_installed_version(store: ModelStore, src: Path) -> None:
    install(store, publish(src, 1))
    leftover = store.root / ".staging-v1"
    leftover.mkdir()
    (leftover / "model-keras.bin").write_bytes(b"stale")
    pending = store.root / ".staging-v9"  # a newer version's partial download: kept for resume
    pending.mkdir()
    (pending / "model-keras.bin").write_bytes(b"partial")
    store.prune()
    assert not leftover.exists()
    assert (pending / "model-keras.bin").read_bytes() == b"partial"
    assert store.installed_versions() == [1]


def test_staging_of_a_skipped_older_version_is_pruned(store: ModelStore, src: Path) -> None:
    install(store, publish(src, 1))
    skipped = store.root / ".staging-v2"  # v2's download was interrupted, then the coordinator moved to v3
    skipped.mkdir()
    (skipped / "model-keras.bin").write_bytes(b"x" * 1000)
    install(store, publish(src, 3))
    assert store.current_version() == 3
    assert not skipped.exists()


# -- storage report -----------------------------------------------------------------------------


def test_storage_report_lists_artifacts_with_sizes_and_kinds(store: ModelStore, src: Path) -> None:
    pubs = [publish(src, v) for v in (1, 2)]
    for pub in pubs:
        install(store, pub)
    (store.version_dir(2) / "notes.txt").write_text("hello")
    report = store.storage_report()
    assert all(isinstance(a, StoredArtifact) for a in report)
    expected = set()
    for pub in pubs:
        v = pub.manifest.version
        for a in pub.manifest.artifacts:
            expected.add(StoredArtifact(v, a.name, a.kind, a.size))
        expected.add(
            StoredArtifact(v, MANIFEST_NAME, "manifest", (store.version_dir(v) / MANIFEST_NAME).stat().st_size)
        )
    expected.add(StoredArtifact(2, "notes.txt", "other", 5))
    assert set(report) == expected
    assert len(report) == len(expected)
    assert [a.version for a in report] == sorted(a.version for a in report)


def test_storage_report_ignores_staging_and_pointer_files(store: ModelStore, src: Path) -> None:
    install(store, publish(src, 1, kinds=(TFLITE_FLOAT32,)), kinds=[TFLITE_FLOAT32])
    (store.root / ".staging-v2").mkdir()
    (store.root / ".staging-v2" / "part").write_bytes(b"123")
    names = {(a.version, a.name) for a in store.storage_report()}
    assert names == {(1, "model-tflite-float32.bin"), (1, MANIFEST_NAME)}
    assert (store.root / GOOD).exists()


# -- stores that are not durable (Durability.PROCESS clients) -------------------------------------


def test_durable_store_fsyncs_and_a_process_durability_store_does_not(
    tmp_path: Path, src: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import os

    synced: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd))[1])
    pub = publish(src, 1)
    install(ModelStore(tmp_path / "durable"), pub)
    assert synced
    synced.clear()
    lean = ModelStore(tmp_path / "lean", durable=False)
    assert install(lean, pub) == 1 and lean.current_version() == 1
    assert synced == []


@pytest.mark.parametrize("lost", ["model-keras.bin", MANIFEST_NAME])
def test_reopened_store_rolls_back_a_version_a_power_cut_left_empty(tmp_path: Path, src: Path, lost: str) -> None:
    store = ModelStore(tmp_path / "models", durable=False)
    pubs = [publish(src, v) for v in (1, 2)]
    for pub in pubs:
        install(store, pub)
    (store.version_dir(2) / lost).write_bytes(b"")  # written, renamed, never flushed to disk

    reopened = ModelStore(tmp_path / "models", durable=False)
    assert reopened.current_version() == 1
    assert reopened.good_versions() == [1]
    fetch = FakeFetch(pubs[1].blobs)
    assert install(reopened, pubs[1], fetch=fetch) == 2  # fetched again, not trusted as installed
    assert sorted(name for name, _, _ in fetch.calls) == sorted(pubs[1].blobs)
    assert ModelStore(tmp_path / "models", durable=False).current_version() == 2


def test_reopened_store_with_every_version_lost_has_no_model(tmp_path: Path, src: Path) -> None:
    store = ModelStore(tmp_path / "models", durable=False)
    install(store, publish(src, 1))
    (store.version_dir(1) / "model-tflite-float32.bin").write_bytes(b"")
    assert ModelStore(tmp_path / "models", durable=False).current_version() == 0
    (store.root / CURRENT).write_bytes(b"")  # the pointer itself lost
    assert ModelStore(tmp_path / "models", durable=False).current_version() == 0


# -- what the store keeps in memory, and what it reads from disk each time ------------------------


def test_an_install_reads_which_versions_exist_from_disk(store: ModelStore, src: Path) -> None:
    for v in (1, 2):
        install(store, publish(src, v))
    import shutil

    shutil.rmtree(store.version_dir(1))  # gone behind the store's back
    leftover = store.root / ".staging-v2"  # and a leftover appears
    leftover.mkdir()
    install(store, publish(src, 3))
    assert store.good_versions() == [2, 3]
    assert (store.root / GOOD).read_text().split() == ["2", "3"]
    assert not leftover.exists()
    assert ModelStore(store.root).good_versions() == [2, 3]


def test_stores_sharing_artifacts_link_verify_and_share_once(tmp_path: Path, src: Path) -> None:
    from client.artifact_cache import ArtifactCache

    cache = ArtifactCache(tmp_path / "shared")
    stores = [ModelStore(tmp_path / f"models-{i}", durable=False, artifact_cache=cache) for i in range(3)]
    pub = publish(src, 1)
    fetches = [FakeFetch(pub.blobs) for _ in stores]
    for s, fetch in zip(stores, fetches, strict=True):
        assert install(s, pub, fetch=fetch) == 1
    assert [len(f.calls) for f in fetches] == [2, 0, 0]
    assert [s.shared_bytes for s in stores] == [0, *[sum(map(len, pub.blobs.values()))] * 2]
    # A staging folder left by an interrupted install still takes what it holds, and links the rest.
    pub2 = publish(src, 2)
    install(stores[0], pub2)
    staging = stores[1].root / ".staging-v2"
    staging.mkdir()
    (staging / "model-keras.bin").write_bytes(pub2.blobs["model-keras.bin"][:10])
    fetch = FakeFetch(pub2.blobs)
    assert install(stores[1], pub2, fetch=fetch) == 2
    assert [(name, size) for name, _, size in fetch.calls] == [("model-keras.bin", 10)]
    assert stores[1].manifest() == pub2.manifest
    assert (stores[1].version_dir(2) / MANIFEST_NAME).read_bytes() == pub2.json
