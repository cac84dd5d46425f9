"""Installed global model versions: one folder each, a manifest, and an atomic CURRENT pointer.

Install = fetch into `.staging-vN/`, verify every sha256 and that the manifest fits the model,
fsync, rename to `vN/`, smoke-test, then switch CURRENT with an atomic rename. A crash at any
point leaves CURRENT on a complete, verified version; a failed verification or smoke test leaves
it where it was.

A store that is not `durable` (a client journaling with Durability.PROCESS) skips the fsyncs: the
renames alone keep every step atomic against a crash or kill -9 of the process. A power cut may
then leave the newest versions' files empty on disk, so such a store checks the current version's
files against their sha256s when it is opened and rolls back past any that are not intact (the
next sync fetches them again).
"""

from __future__ import annotations

import functools
import os
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from client.artifact_cache import ArtifactCache
from fedsync.manifest import (
    MANIFEST_NAME,
    Artifact,
    Manifest,
    ManifestError,
    fsync_path,
    sha256_file,
    write_atomically,
)

CURRENT = "CURRENT"
GOOD = "GOOD"  # versions that passed their smoke test, newest last

FetchArtifact = Callable[[Artifact, Path], None]  # writes (or resumes writing) the artifact at the path
SmokeTest = Callable[[Path, Manifest], None]  # raises when the installed version cannot serve


def _parse(manifest_json: bytes) -> Manifest:
    """Manifest.from_json, memoized by the bytes (a Manifest is never modified once parsed)."""
    return _parse_bytes(bytes(manifest_json))


@functools.lru_cache(maxsize=8)  # per process: the devices of a simulation install the same manifests
def _parse_bytes(manifest_json: bytes) -> Manifest:
    return Manifest.from_json(manifest_json)


_Scan = tuple[set[str], list[int], list[tuple[int, str]]]  # see ModelStore._scan


class InstallError(RuntimeError):
    """A version could not be installed; the store stays on the version it was on."""


@dataclass(frozen=True)
class StoredArtifact:
    version: int
    name: str
    kind: str
    size: int


class ModelStore:
    def __init__(
        self, root: Path, keep_versions: int = 3, *, durable: bool = True, artifact_cache: ArtifactCache | None = None
    ) -> None:
        """artifact_cache: verified artifacts shared with the other clients of this host (see
        client.artifact_cache); `shared_bytes` counts what installs linked from it instead of fetching."""
        if keep_versions < 1:
            raise ValueError("keep_versions must be at least 1")
        self.root = Path(root)
        self.keep_versions = keep_versions
        self.durable = durable
        self.artifact_cache = artifact_cache
        self.shared_bytes = 0
        self.root.mkdir(parents=True, exist_ok=True)
        # This object is the store's only writer: what it last read or wrote of CURRENT, GOOD and the
        # (immutable) manifests stays true until it changes them itself. Which folders exist is
        # always read from disk.
        self._current: int | None = None
        self._good: list[int] | None = None  # GOOD as written, before dropping versions that are gone
        self._manifests: dict[int, Manifest] = {}
        if not durable:
            self._roll_back_incomplete()

    # -- reading ------------------------------------------------------------------------------

    def current_version(self) -> int:
        if self._current is None:
            try:
                self._current = int((self.root / CURRENT).read_text().strip() or 0)
            except FileNotFoundError:
                self._current = 0
        return self._current

    def version_dir(self, version: int) -> Path:
        return self.root / f"v{version}"

    def manifest(self, version: int | None = None) -> Manifest | None:
        version = self.current_version() if version is None else version
        cached = self._manifests.get(version)
        if cached is not None:
            return cached
        path = self.version_dir(version) / MANIFEST_NAME
        if version == 0 or not path.exists():
            return None
        manifest = _parse(path.read_bytes())
        self._manifests[version] = manifest
        return manifest

    def artifact_path(self, kind: str, version: int | None = None) -> Path | None:
        manifest = self.manifest(version)
        if manifest is None:
            return None
        artifact = manifest.artifact(kind)
        if artifact is None:
            return None
        path = self.version_dir(manifest.version) / artifact.name
        return path if path.exists() else None

    def installed_versions(self) -> list[int]:
        return self._scan()[1]

    def good_versions(self) -> list[int]:
        return [v for v in self._good_listed() if self.version_dir(v).exists()]

    def _good_listed(self) -> list[int]:
        if self._good is None:
            try:
                text = (self.root / GOOD).read_text()
            except FileNotFoundError:
                text = ""
            self._good = [int(v) for v in text.split() if v.isdigit()]
        return self._good

    def _write_good(self, good: list[int]) -> None:
        self._good = None  # unknown until the write is through
        write_atomically(self.root / GOOD, " ".join(map(str, good)).encode(), durable=self.durable)
        self._good = good

    def _scan(self) -> _Scan:
        """One read of the store's folder: every name in it, the installed versions (sorted) and
        the staging folders (version, name)."""
        names, installed, staging = set(), [], []
        with os.scandir(self.root) as entries:
            for entry in entries:
                name = entry.name
                names.add(name)
                if name.startswith("v") and name[1:].isdigit() and entry.is_dir():
                    installed.append(int(name[1:]))
                elif name.startswith(".staging-v") and name[len(".staging-v") :].isdigit():
                    staging.append((int(name[len(".staging-v") :]), name))
        return names, sorted(installed), staging

    # -- installing ----------------------------------------------------------------------------

    def install(
        self,
        manifest_json: bytes,
        fetch: FetchArtifact,
        smoke_test: SmokeTest,
        kinds: Iterable[str],
    ) -> int:
        """Install the version the manifest describes, with the artifacts of the given kinds."""
        try:
            manifest = _parse(manifest_json)
        except ManifestError as exc:
            raise InstallError(str(exc)) from None
        wanted_kinds = set(kinds)
        wanted = [a for a in manifest.artifacts if a.kind in wanted_kinds]
        if not wanted:
            raise InstallError(f"version {manifest.version} has none of the artifact kinds {sorted(wanted_kinds)}")
        final = self.version_dir(manifest.version)
        installed = final.exists()
        if installed and not self.durable and not self._intact(manifest.version):
            self._remove(manifest.version)  # left incomplete by a power cut: fetch it again
            installed = False
        if not installed:
            try:
                self._stage(manifest, manifest_json, wanted, fetch, final)
            except OSError as exc:  # a full disk, say: the current version stays, the staged part may resume
                raise InstallError(f"could not store version {manifest.version}: {exc.strerror or exc}") from None
            self._manifests[manifest.version] = manifest  # the bytes just written there
        try:
            smoke_test(final, manifest)
        except Exception as exc:
            self._remove(manifest.version)
            raise InstallError(f"version {manifest.version} failed its smoke test: {exc}") from exc
        scan = self._scan()
        self._switch(manifest.version, scan[0])
        self._prune(self.keep_versions, scan)
        return manifest.version

    def _stage(
        self, manifest: Manifest, manifest_json: bytes, wanted: list[Artifact], fetch: FetchArtifact, final: Path
    ) -> None:
        staging = self.root / f".staging-v{manifest.version}"
        try:
            staging.mkdir()
            resumed = False
        except FileExistsError:  # an interrupted install of this version: what it holds may be resumed
            resumed = True
        unshared = []
        for artifact in wanted:
            path = staging / artifact.name
            if not self._obtain(artifact, path, fetch, resumed):
                unshared.append(artifact)
            if self.durable:
                fsync_path(path)
        # The bytes as published (they parsed into `manifest`), not a re-serialization: the same file
        # as the coordinator's, and encoding a manifest costs more than the rest of an install.
        # Written in place: only the rename of the whole folder below publishes it.
        with open(staging / MANIFEST_NAME, "wb") as f:
            f.write(manifest_json)
            if self.durable:
                f.flush()
                os.fsync(f.fileno())
        if self.durable:
            fsync_path(staging)
        staging.rename(final)
        if self.durable:
            fsync_path(self.root)
        if self.artifact_cache is not None:
            for artifact in unshared:
                self.artifact_cache.add(final / artifact.name, artifact.sha256)

    def _obtain(self, artifact: Artifact, path: Path, fetch: FetchArtifact, resumed: bool) -> bool:
        """The verified artifact at `path`: what staging already holds, a shared copy, or a fetch.
        True when it is the shared copy. A staging folder this install created holds nothing yet."""
        exists = resumed and path.exists()
        if exists and path.stat().st_size == artifact.size:
            self._verify(path, artifact)
            return False
        cache = self.artifact_cache
        if cache is not None and not exists and cache.link_into(artifact.sha256, artifact.size, path):
            try:
                self._verify(path, artifact)
            except InstallError:
                pass  # a damaged shared copy (now unlinked here): fetch this store's own
            else:
                self.shared_bytes += artifact.size
                return True
        fetch(artifact, path)
        self._verify(path, artifact)
        return False

    @staticmethod
    def _verify(path: Path, artifact: Artifact) -> None:
        size = path.stat().st_size
        if size != artifact.size:
            path.unlink()
            raise InstallError(f"{artifact.name}: size {size} does not match the manifest's {artifact.size}")
        digest = sha256_file(path)
        if digest != artifact.sha256:
            path.unlink()
            raise InstallError(f"{artifact.name}: sha256 {digest[:12]}… does not match the manifest")

    def _switch(self, version: int, names: set[str]) -> None:
        """`names`: what the store's folder holds (see _scan), for GOOD to keep only existing versions."""
        self._write_good([v for v in self._good_listed() if v != version and f"v{v}" in names] + [version])
        self._write_current(version)

    def _write_current(self, version: int) -> None:
        self._current = None
        write_atomically(self.root / CURRENT, str(version).encode(), durable=self.durable)
        self._current = version

    def _remove(self, version: int) -> None:
        self._manifests.pop(version, None)
        shutil.rmtree(self.version_dir(version), ignore_errors=True)

    def rollback(self, reason: str = "") -> int:
        """Go back to the newest good version before the current one; returns it (0: none left)."""
        current = self.current_version()
        good = [v for v in self.good_versions() if v != current]
        self._write_good(good)
        previous = good[-1] if good else 0
        self._write_current(previous)
        return previous

    def _intact(self, version: int) -> bool:
        """The version's manifest reads and each artifact file it has matches its size and sha256."""
        try:
            manifest = self.manifest(version)
        except ManifestError:
            return False
        if manifest is None:
            return False
        for artifact in manifest.artifacts:
            path = self.version_dir(version) / artifact.name
            if path.exists() and (path.stat().st_size != artifact.size or sha256_file(path) != artifact.sha256):
                return False
        return True

    def _roll_back_incomplete(self) -> None:
        while (version := self.current_version()) != 0 and not self._intact(version):
            self.rollback(f"version {version} was not intact on disk")

    def prune(self, keep_versions: int | None = None) -> list[int]:
        """Remove all but the newest good versions (and leftover staging folders); returns what went."""
        return self._prune(self.keep_versions if keep_versions is None else keep_versions, self._scan())

    def _prune(self, keep: int, scan: _Scan) -> list[int]:
        names, installed, staging = scan
        current = self.current_version()
        keep_set = set([v for v in self._good_listed() if f"v{v}" in names][-keep:]) | {current}
        removed = []
        for version in installed:
            if version not in keep_set:
                self._remove(version)
                removed.append(version)
        for version, name in staging:
            # Leftovers of installed versions, and partial downloads of versions older than the current
            # one (sync only installs newer versions, so those will never be resumed).
            if version in keep_set or version <= current:
                shutil.rmtree(self.root / name, ignore_errors=True)
        return removed

    def storage_report(self) -> list[StoredArtifact]:
        report = []
        for version in self.installed_versions():
            manifest = self.manifest(version)
            kinds = {a.name: a.kind for a in manifest.artifacts} if manifest else {}
            for path in sorted(self.version_dir(version).iterdir()):
                kind = "manifest" if path.name == MANIFEST_NAME else kinds.get(path.name, "other")
                report.append(StoredArtifact(version, path.name, kind, path.stat().st_size))
        return report
