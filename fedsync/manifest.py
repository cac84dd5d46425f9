"""A published model version's manifest: what it holds and how to check it (JSON on disk and wire)."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

MANIFEST_FORMAT = "fedsync.manifest/1"
MANIFEST_NAME = "manifest.json"

# Artifact kinds a version may carry.
TFLITE_FLOAT32 = "tflite-float32"
TFLITE_INT8 = "tflite-int8"
TFLITE_TRAINABLE_HEAD = "tflite-trainable-head"
TFLITE_TRAINABLE = "tflite-trainable"  # the whole model, trainable in LiteRT
KERAS = "keras"


class ManifestError(ValueError):
    """A manifest that is malformed or does not fit its model."""


@dataclass(frozen=True)
class Artifact:
    name: str
    kind: str
    sha256: str
    size: int


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: list[int]  # -1 for a batch dimension
    dtype: str


@dataclass(frozen=True)
class Manifest:
    version: int
    parent_version: int
    created_unix: float
    artifacts: list[Artifact]
    inputs: list[TensorInfo]
    outputs: list[TensorInfo]
    labels: list[str]
    preprocessing: str
    metrics: dict[str, float] = field(default_factory=dict)
    weights: list[TensorInfo] = field(default_factory=list)
    format: str = MANIFEST_FORMAT

    def artifact(self, kind: str) -> Artifact | None:
        return next((a for a in self.artifacts if a.kind == kind), None)

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), indent=1, sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes | str) -> Manifest:
        try:
            raw: dict[str, Any] = json.loads(data)
            manifest = cls(
                version=int(raw["version"]),
                parent_version=int(raw["parent_version"]),
                created_unix=float(raw["created_unix"]),
                artifacts=[Artifact(**a) for a in raw["artifacts"]],
                inputs=[TensorInfo(**t) for t in raw["inputs"]],
                outputs=[TensorInfo(**t) for t in raw["outputs"]],
                labels=[str(label) for label in raw["labels"]],
                preprocessing=str(raw["preprocessing"]),
                metrics={k: float(v) for k, v in raw.get("metrics", {}).items()},
                weights=[TensorInfo(**t) for t in raw.get("weights", [])],
                format=str(raw.get("format", "")),
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise ManifestError(f"malformed manifest: {exc}") from None
        manifest.check_self_consistent()
        return manifest

    def check_self_consistent(self) -> None:
        if self.format != MANIFEST_FORMAT:
            raise ManifestError(f"unsupported manifest format {self.format!r}")
        if self.version < 1:
            raise ManifestError(f"manifest version must be >= 1, got {self.version}")
        if not self.outputs or self.outputs[0].shape[-1] != len(self.labels):
            raise ManifestError(
                f"manifest declares {len(self.labels)} labels but the output has shape "
                f"{self.outputs[0].shape if self.outputs else None}"
            )
        for artifact in self.artifacts:
            if "/" in artifact.name or artifact.name.startswith(".") or not artifact.name:
                raise ManifestError(f"artifact name {artifact.name!r} is not a plain file name")
            if len(artifact.sha256) != 64 or artifact.size < 0:
                raise ManifestError(f"artifact {artifact.name!r} has a bad sha256 or size")


def sha256_file(path: Path, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def describe_artifact(path: Path, kind: str) -> Artifact:
    return Artifact(name=path.name, kind=kind, sha256=sha256_file(path), size=path.stat().st_size)


def fsync_path(path: Path) -> None:
    """fsync a file or a directory (a directory's entry list must be synced after a rename)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomically(path: Path, data: bytes, *, durable: bool = True) -> None:
    """Replace `path` with `data` in one rename. durable=False skips the fsyncs: still atomic against
    a crash of the process, but after a power cut the file may be left empty."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        if durable:
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, path)
    if durable:
        fsync_path(path.parent)
