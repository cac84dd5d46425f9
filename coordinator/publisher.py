"""Publishing global model versions: Keras model, float32 and int8 .tflite, manifest with sha256s.

A version is written into `.staging-vN/` and renamed to `vN/` once complete, so a crash never
leaves a half-written version where clients could download it.
"""

from __future__ import annotations

import hashlib
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from fedsync.manifest import (
    KERAS,
    MANIFEST_NAME,
    TFLITE_FLOAT32,
    TFLITE_INT8,
    TFLITE_TRAINABLE,
    TFLITE_TRAINABLE_HEAD,
    Artifact,
    Manifest,
    TensorInfo,
    describe_artifact,
    fsync_path,
    write_atomically,
)
from fedsync.model import (
    INPUT_NAME,
    LABELS,
    NUM_FEATURES,
    PREPROCESSING,
    Weights,
    build_model,
    check_weights,
    dense_steps,
    forward,
    get_weights,
    set_weights,
    weight_shapes,
)

if TYPE_CHECKING:
    import keras


@dataclass(frozen=True)
class EvaluationData:
    """The coordinator's own held-out set: evaluation and int8 calibration."""

    x: np.ndarray
    y: np.ndarray


WEIGHTS_FILE = "weights.npz"  # the coordinator's copy of a version's weights: not an artifact


def _write_artifact(path: Path, content: bytes, kind: str) -> Artifact:
    """Write an artifact and describe it (as describe_artifact would, without reading it back)."""
    path.write_bytes(content)
    return Artifact(name=path.name, kind=kind, sha256=hashlib.sha256(content).hexdigest(), size=len(content))


class ModelPublisher:
    def __init__(
        self,
        models_dir: Path,
        evaluation: EvaluationData,
        hidden_units: int = 32,
        int8: bool = True,
        trainable_head: bool = True,
        trainable: bool = True,
        reuse_conversions: bool = True,
        durable: bool = True,
        keras: bool = True,
    ) -> None:
        """reuse_conversions: convert once per architecture and write each version's weights into
        that template (see fedsync.tflite_templates) instead of running the converter per version;
        the templates persist across processes under $FEDSYNC_CACHE_DIR (empty: not at all).
        durable=False skips the fsyncs (a version still appears atomically, by rename): for a
        coordinator whose writes need survive only a crash of its process, not a power cut.
        keras=False leaves out the Keras artifact (saving it is most of a publish) for fleets that
        never fetch it; the coordinator's own copy of the weights (weights.npz) is always written."""
        self.models_dir = Path(models_dir)
        self.models_dir.mkdir(parents=True, exist_ok=True)
        self.evaluation = evaluation
        self.int8 = int8
        self.trainable_head = trainable_head
        self.trainable = trainable
        self.reuse_conversions = reuse_conversions
        self.durable = durable
        self.keras = keras
        self._x = np.ascontiguousarray(evaluation.x, dtype=np.float32)
        self._labels = np.asarray(evaluation.y)
        # The int8 export depends on its calibration data as well as on the weights.
        self._calibration_id = hashlib.sha256(self._x).hexdigest()
        self.model = build_model(hidden_units)
        # Evaluation runs the model in numpy when it is a Dense stack, and exports render their
        # templates from the weights: self.model is loaded with a version's weights only when
        # something needs Keras itself (the .keras artifact, a converter run).
        self._steps = dense_steps(self.model)
        self._shapes = weight_shapes(self.model)
        self._loaded: Weights | None = None  # what self.model holds, during a publish
        self._architecture: str | None = None

    def initial_weights(self) -> Weights:
        return get_weights(self.model)

    def version_dir(self, version: int) -> Path:
        return self.models_dir / f"v{version}"

    def evaluate(self, weights: Weights) -> dict[str, float]:
        check_weights(self._shapes, weights)
        if self._steps is not None:
            probs = forward(self._steps, weights, self._x)
        else:
            set_weights(self.model, weights)
            self._loaded = weights
            probs = self.model(self._x, training=False).numpy()
        labels = self._labels
        accuracy = float(np.mean(np.argmax(probs, axis=1) == labels))
        loss = float(-np.mean(np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-7, 1.0))))
        return {"accuracy": accuracy, "loss": loss}

    def _holding(self, weights: Weights) -> keras.Model:
        """self.model, loaded with `weights`."""
        if self._loaded is not weights:
            set_weights(self.model, weights)
            self._loaded = weights
        return self.model

    def publish(self, version: int, parent_version: int, weights: Weights) -> Manifest:
        return self.publish_with_json(version, parent_version, weights)[0]

    def publish_with_json(self, version: int, parent_version: int, weights: Weights) -> tuple[Manifest, bytes]:
        """publish(), and the manifest's JSON as written (Manifest.to_json())."""
        self._loaded = None  # the caller may have changed the arrays since the last publish
        try:
            return self._publish(version, parent_version, weights)
        finally:
            self._loaded = None

    def _publish(self, version: int, parent_version: int, weights: Weights) -> tuple[Manifest, bytes]:
        from fedsync import tflite_export
        from fedsync._quiet import native_output_silenced

        metrics = self.evaluate(weights)
        staging = self.models_dir / f".staging-v{version}"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        np.savez(staging / WEIGHTS_FILE, **weights)
        if self.keras:
            self._holding(weights).save(staging / "model.keras")
        with native_output_silenced():
            float32 = self._export(TFLITE_FLOAT32, tflite_export.to_tflite_float32, weights)
            int8 = (
                self._export(
                    f"{TFLITE_INT8}:{self._calibration_id}",
                    lambda model: tflite_export.to_tflite_int8(model, self.evaluation.x),
                    weights,
                )
                if self.int8
                else None
            )
            head = (
                self._export(TFLITE_TRAINABLE_HEAD, tflite_export.to_trainable_head_tflite, weights)
                if self.trainable_head
                else None
            )
            whole = (
                self._export(TFLITE_TRAINABLE, tflite_export.to_trainable_tflite, weights) if self.trainable else None
            )
        artifacts = [_write_artifact(staging / "model.tflite", float32, TFLITE_FLOAT32)]
        if self.keras:
            artifacts.append(describe_artifact(staging / "model.keras", KERAS))
        if int8 is not None:
            artifacts.append(_write_artifact(staging / "model-int8.tflite", int8, TFLITE_INT8))
        if head is not None:
            artifacts.append(_write_artifact(staging / "head-trainable.tflite", head, TFLITE_TRAINABLE_HEAD))
        if whole is not None:
            artifacts.append(_write_artifact(staging / "model-trainable.tflite", whole, TFLITE_TRAINABLE))
        manifest = Manifest(
            version=version,
            parent_version=parent_version,
            created_unix=time.time(),
            artifacts=artifacts,
            inputs=[TensorInfo(INPUT_NAME, [-1, NUM_FEATURES], "float32")],
            outputs=[TensorInfo("probs", [-1, len(LABELS)], "float32")],
            labels=list(LABELS),
            preprocessing=PREPROCESSING,
            metrics=metrics,
            weights=[TensorInfo(name, list(array.shape), "float32") for name, array in weights.items()],
        )
        manifest_json = manifest.to_json()
        if self.durable:
            write_atomically(staging / MANIFEST_NAME, manifest_json, durable=True)
            for path in staging.iterdir():
                fsync_path(path)
        else:  # nobody sees the staging folder before its rename: no need to write the manifest by one
            (staging / MANIFEST_NAME).write_bytes(manifest_json)
        final = self.version_dir(version)
        shutil.rmtree(final, ignore_errors=True)  # a leftover of a crash before the version was committed
        staging.rename(final)
        if self.durable:
            fsync_path(self.models_dir)
        return manifest, manifest_json

    def _export(self, name: str, export: Callable[[keras.Model], bytes], weights: Weights) -> bytes:
        """`export` applied to self.model holding `weights`."""
        if not self.reuse_conversions:
            return export(self._holding(weights))
        from fedsync.tflite_templates import architecture_key, shared_exporter

        exporter = shared_exporter()
        if self._architecture is None:
            self._architecture = architecture_key(self.model)
        rendered = exporter.render(name, self._architecture, weights)
        if rendered is not None:
            return rendered
        return exporter.export(name, self._holding(weights), export, self._architecture)

    def load_weights(self, version: int) -> Weights:
        path = self.version_dir(version) / WEIGHTS_FILE
        if path.exists():
            with np.load(path) as stored:
                return {name: stored[name] for name in stored.files}
        import keras  # a version published before weights.npz

        return get_weights(keras.models.load_model(self.version_dir(version) / "model.keras", compile=False))
