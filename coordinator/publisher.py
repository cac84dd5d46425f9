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
    Manifest,
    TensorInfo,
    describe_artifact,
    fsync_path,
    write_atomically,
)
from fedsync.model import INPUT_NAME, LABELS, NUM_FEATURES, PREPROCESSING, Weights

if TYPE_CHECKING:
    import keras


@dataclass(frozen=True)
class EvaluationData:
    """The coordinator's own held-out set: evaluation and int8 calibration."""

    x: np.ndarray
    y: np.ndarray


WEIGHTS_FILE = "weights.npz"  # the coordinator's copy of a version's weights: not an artifact


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
        from fedsync.model import build_model

        self.models_dir = Path(models_dir)
        self.models_dir.mkdir(parents=True, exist_ok=True)
        self.evaluation = evaluation
        self.int8 = int8
        self.trainable_head = trainable_head
        self.trainable = trainable
        self.reuse_conversions = reuse_conversions
        self.durable = durable
        self.keras = keras
        # The int8 export depends on its calibration data as well as on the weights.
        self._calibration_id = hashlib.sha256(np.ascontiguousarray(evaluation.x, dtype=np.float32)).hexdigest()
        self.model = build_model(hidden_units)

    def initial_weights(self) -> Weights:
        from fedsync.model import get_weights

        return get_weights(self.model)

    def version_dir(self, version: int) -> Path:
        return self.models_dir / f"v{version}"

    def evaluate(self, weights: Weights) -> dict[str, float]:
        from fedsync.model import set_weights

        set_weights(self.model, weights)
        probs = self.model(self.evaluation.x, training=False).numpy()
        labels = np.asarray(self.evaluation.y)
        accuracy = float(np.mean(np.argmax(probs, axis=1) == labels))
        loss = float(-np.mean(np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-7, 1.0))))
        return {"accuracy": accuracy, "loss": loss}

    def publish(self, version: int, parent_version: int, weights: Weights) -> Manifest:
        from fedsync import tflite_export
        from fedsync._quiet import native_output_silenced

        metrics = self.evaluate(weights)  # also loads the weights into self.model
        staging = self.models_dir / f".staging-v{version}"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        np.savez(staging / WEIGHTS_FILE, **weights)
        if self.keras:
            self.model.save(staging / "model.keras")
        with native_output_silenced():
            float32 = self._export(TFLITE_FLOAT32, tflite_export.to_tflite_float32)
            int8 = (
                self._export(
                    f"{TFLITE_INT8}:{self._calibration_id}",
                    lambda model: tflite_export.to_tflite_int8(model, self.evaluation.x),
                )
                if self.int8
                else None
            )
            head = (
                self._export(TFLITE_TRAINABLE_HEAD, tflite_export.to_trainable_head_tflite)
                if self.trainable_head
                else None
            )
            whole = self._export(TFLITE_TRAINABLE, tflite_export.to_trainable_tflite) if self.trainable else None
        (staging / "model.tflite").write_bytes(float32)
        artifacts = [describe_artifact(staging / "model.tflite", TFLITE_FLOAT32)]
        if self.keras:
            artifacts.append(describe_artifact(staging / "model.keras", KERAS))
        if int8 is not None:
            (staging / "model-int8.tflite").write_bytes(int8)
            artifacts.append(describe_artifact(staging / "model-int8.tflite", TFLITE_INT8))
        if head is not None:
            (staging / "head-trainable.tflite").write_bytes(head)
            artifacts.append(describe_artifact(staging / "head-trainable.tflite", TFLITE_TRAINABLE_HEAD))
        if whole is not None:
            (staging / "model-trainable.tflite").write_bytes(whole)
            artifacts.append(describe_artifact(staging / "model-trainable.tflite", TFLITE_TRAINABLE))
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
        write_atomically(staging / MANIFEST_NAME, manifest.to_json(), durable=self.durable)
        if self.durable:
            for path in staging.iterdir():
                fsync_path(path)
        final = self.version_dir(version)
        shutil.rmtree(final, ignore_errors=True)  # a leftover of a crash before the version was committed
        staging.rename(final)
        if self.durable:
            fsync_path(self.models_dir)
        return manifest

    def _export(self, name: str, export: Callable[[keras.Model], bytes]) -> bytes:
        """`export` applied to self.model, which holds the version's weights."""
        if not self.reuse_conversions:
            return export(self.model)
        from fedsync.tflite_templates import shared_exporter

        return shared_exporter().export(name, self.model, export)

    def load_weights(self, version: int) -> Weights:
        path = self.version_dir(version) / WEIGHTS_FILE
        if path.exists():
            with np.load(path) as stored:
                return {name: stored[name] for name in stored.files}
        import keras  # a version published before weights.npz

        from fedsync.model import get_weights

        return get_weights(keras.models.load_model(self.version_dir(version) / "model.keras", compile=False))
