"""EdgeClient: local inference and fine-tuning that work offline, journaled durably, synced later."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import sqlite3
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from client.artifact_cache import ArtifactCache
from client.journal import Durability, Journal, create_tables
from client.litert_runtime import LiteRTClassifier, check_input, check_sample
from client.model_store import ModelStore
from client.predictions import PREDICTION_SCHEMA, PredictionCache
from client.process_stats import process_age_s, resident_memory_mb
from fedsync.manifest import KERAS, TFLITE_FLOAT32, TFLITE_INT8, TFLITE_TRAINABLE, TFLITE_TRAINABLE_HEAD, Manifest

if TYPE_CHECKING:
    # client.sync and fedsync.wire import grpc (~50 ms): a predict-only process never loads them.
    from client.background import BackgroundSync
    from client.sync import SyncReport
    from fedsync.wire import ClientTLS

_classifiers: dict[tuple[str, str], Classifier] = {}
_classifiers_lock = threading.Lock()
_first_prediction_done = False  # per process: the first prediction records the cold start
RSS_SAMPLE_EVERY = 100
INFERENCE_BACKENDS = {"float32": TFLITE_FLOAT32, "int8": TFLITE_INT8, "keras": KERAS}


class Classifier(Protocol):
    input_shape: tuple[int, ...]
    num_outputs: int

    def predict_proba(self, x: np.ndarray) -> np.ndarray: ...


# "keras": whole-model fine-tuning with TensorFlow. "litert": the whole model in LiteRT (hand-written
# backprop, no TensorFlow). "head": only the softmax head in LiteRT. None: inference only.
FINE_TUNING_PROFILES = ("keras", "litert", "head", None)
HEAD_VARIABLES = {"head_kernel": "head/kernel", "head_bias": "head/bias"}


class JournalFullError(OSError):
    """The journal's storage is full: the new event or delta was not journaled, nothing earlier was lost."""


@contextlib.contextmanager
def _journal_writes() -> Iterator[None]:
    try:
        yield
    except sqlite3.OperationalError as exc:
        if "full" in str(exc):
            raise JournalFullError(
                errno.ENOSPC, "journal storage is full: this write was rolled back, earlier entries are intact"
            ) from None
        raise


class NoModelError(RuntimeError):
    """No global model is installed yet: sync once with a coordinator first."""


@dataclass(frozen=True, slots=True)
class Prediction:
    label: int  # the label served: the coordinator's correction when there is one
    confidence: float
    model_label: int  # what the local model predicted
    model_version: int
    seq: int  # the journal event's sequence number
    cached: bool
    corrected: bool


def top1(classifier: Classifier, sample: np.ndarray) -> tuple[int, float]:
    """(label, confidence) of one sample checked by check_sample."""
    if isinstance(classifier, LiteRTClassifier):
        return classifier.top1(sample)
    probs = classifier.predict_proba(sample)[0]
    label = int(np.argmax(probs))
    return label, float(probs[label])


def load_classifier(kind: str, path: Path) -> Classifier:
    if kind == KERAS:
        from client.keras_backend import KerasClassifier

        return KerasClassifier(path)
    return LiteRTClassifier(path)


_trainers: OrderedDict[tuple[str, str], tuple[Any, dict[str, np.ndarray]]] = OrderedDict()
_trainers_lock = threading.Lock()
SHARED_TRAINERS = 4  # model versions whose LiteRT trainers stay loaded (clients train recent ones)


@contextlib.contextmanager
def shared_trainer(trainer_class: type, path: Path, sha256: str) -> Iterator[tuple[Any, dict[str, np.ndarray]]]:
    """A LiteRT trainer for this model file content and the file's own weights, shared by every
    client of the process: its weights are reset to the file's before each use, and the weights
    are its only state (plain SGD), so a shared trainer trains exactly as a fresh one would."""
    key = (trainer_class.__name__, sha256)
    with _trainers_lock:
        entry = _trainers.pop(key, None)
    if entry is None:
        trainer = trainer_class(path)
        entry = (trainer, trainer.get_weights())
    else:
        entry[0].set_weights(entry[1])
    try:
        yield entry
    finally:
        with _trainers_lock:  # back in the pool; one per key, so concurrent users never share one
            _trainers[key] = entry
            while len(_trainers) > SHARED_TRAINERS:
                _trainers.popitem(last=False)


_smoke_tested: set[tuple[str, str, tuple[int, ...]]] = set()  # (kind, sha256, input shape) that passed


def shared_classifier(kind: str, path: Path, sha256: str) -> Classifier:
    """One interpreter per model file content in this process, whatever the number of clients."""
    with _classifiers_lock:
        classifier = _classifiers.get((kind, sha256))
        if classifier is None:
            classifier = load_classifier(kind, path)
            _classifiers[(kind, sha256)] = classifier
        return classifier


class EdgeClient:
    """An edge device's runtime. All state lives under `home`.

    inference: "float32" or "int8" runs that .tflite with LiteRT and never imports TensorFlow;
    "keras" is the fallback backend for devices without LiteRT. fine_tuning: see FINE_TUNING_PROFILES.
    """

    def __init__(
        self,
        home: Path | str,
        device_id: str,
        *,
        inference: str = "float32",
        fine_tuning: str | None = "keras",
        durability: Durability = Durability.POWER,
        keep_versions: int = 3,
        credential: str | None = None,
        tls: ClientTLS | None = None,
        artifact_cache: ArtifactCache | None = None,
    ) -> None:
        if inference not in INFERENCE_BACKENDS:
            raise ValueError(f"inference must be one of {sorted(INFERENCE_BACKENDS)}, got {inference!r}")
        if fine_tuning not in FINE_TUNING_PROFILES:
            raise ValueError(f"fine_tuning must be one of {FINE_TUNING_PROFILES}, got {fine_tuning!r}")
        self.home = Path(home)
        self.home.mkdir(parents=True, exist_ok=True)
        self.device_id = device_id
        self.credential = credential
        self.tls = tls
        self.inference_kind = INFERENCE_BACKENDS[inference]
        self.fine_tuning = fine_tuning
        self.journal = Journal(self.home / "journal.db", durability)
        create_tables(self.journal, PREDICTION_SCHEMA)
        self.cache = PredictionCache(self.journal.conn, write_behind=True)
        # A PROCESS-durability device need not fsync its model files either (see client.model_store).
        self.models = ModelStore(
            self.home / "models",
            keep_versions=keep_versions,
            durable=durability is Durability.POWER,
            artifact_cache=artifact_cache,
        )
        self._lock = threading.RLock()
        self._serving: tuple[Classifier, int] | None = None
        self._predictions = 0

    # -- model -----------------------------------------------------------------------------

    @property
    def model_version(self) -> int:
        serving = self._serving
        return serving[1] if serving is not None else self.models.current_version()

    def reload_model(self) -> None:
        """Serve whatever the model store's CURRENT now points at (after an install or rollback)."""
        with self._lock:
            self._serving = None

    def wanted_artifact_kinds(self) -> list[str]:
        training = {
            "keras": [KERAS],
            "litert": [TFLITE_TRAINABLE],
            "head": [TFLITE_TRAINABLE_HEAD],
            None: [],
        }[self.fine_tuning]
        return [self.inference_kind, *training]

    def _classifier(self) -> tuple[Classifier, int]:
        serving = self._serving
        if serving is not None:
            return serving
        manifest = self.models.manifest()
        if manifest is None:
            raise NoModelError("no model installed yet: sync with a coordinator first")
        artifact = manifest.artifact(self.inference_kind)
        path = self.models.artifact_path(self.inference_kind)
        if artifact is None or path is None:
            raise NoModelError(f"model version {manifest.version} has no {self.inference_kind} artifact")
        self._serving = (shared_classifier(self.inference_kind, path, artifact.sha256), manifest.version)
        return self._serving

    def smoke_test(self, version_dir: Path, manifest: Manifest) -> None:
        """Load the new version and run one inference; raises when it cannot serve."""
        artifact = manifest.artifact(self.inference_kind)
        if artifact is None:
            raise ValueError(f"no {self.inference_kind} artifact")
        # The store has checked the file against this sha256: an interpreter already loaded from the
        # same bytes in this process is as good a test, and is the one predict() will then serve.
        classifier = shared_classifier(self.inference_kind, version_dir / artifact.name, artifact.sha256)
        expected = tuple(manifest.inputs[0].shape[1:])
        if tuple(classifier.input_shape[1:]) != expected:
            raise ValueError(f"model input shape {classifier.input_shape} does not match manifest {expected}")
        if classifier.num_outputs != len(manifest.labels):
            raise ValueError(
                f"model has {classifier.num_outputs} outputs but the manifest lists {len(manifest.labels)} labels"
            )
        # The inference is a function of the model's bytes alone: one that passed in this process
        # (another client installing the same version, say) passes again.
        key = (self.inference_kind, artifact.sha256, expected)
        if key in _smoke_tested:
            return
        probs = classifier.predict_proba(np.zeros((1, *expected), dtype=np.float32))
        if not np.all(np.isfinite(probs)):
            raise ValueError("smoke inference produced non-finite outputs")
        _smoke_tested.add(key)

    # -- inference -------------------------------------------------------------------------

    def predict(self, x: np.ndarray) -> Prediction:
        """Run the installed model on one sample and journal the event (works offline).

        The event is committed before this returns, one commit per call (no group commit): in the
        WAL under Durability.PROCESS (survives kill -9 of the process), fsynced under
        Durability.POWER (survives a power cut)."""
        start = time.perf_counter_ns()
        sample = check_sample(x)
        input_hash = hashlib.sha256(sample).digest()
        with self._lock:
            classifier, version = self._classifier()
            cached = self.cache.get(input_hash, version)
            if cached is not None:
                label, confidence, model_label, corrected = (
                    cached.label,
                    cached.confidence,
                    cached.label,
                    cached.corrected,
                )
            else:
                model_label, confidence = top1(classifier, sample)
                correction = self.cache.correction(input_hash)
                corrected = correction is not None and correction.label != model_label
                label = correction.label if correction is not None else model_label
            latency_us = (time.perf_counter_ns() - start) / 1e3
            with _journal_writes():
                if not (self._inference_stats_due() or self.cache.flush_due()):
                    # The common case: the event alone, one INSERT that is its own transaction.
                    seq = self.journal.append_event(input_hash, model_label, confidence, version, latency_us)
                    self._predictions += 1
                else:
                    with self.journal.transaction():
                        seq = self.journal.append_event(input_hash, model_label, confidence, version, latency_us)
                        self.cache.flush()
                        self._record_inference_stats(seq, latency_us)
            if cached is None:
                self.cache.put(input_hash, version, label, confidence, corrected)
        return Prediction(label, confidence, model_label, version, seq, cached is not None, corrected)

    def _inference_stats_due(self) -> bool:
        return not _first_prediction_done or self._predictions % RSS_SAMPLE_EVERY == 0

    def _record_inference_stats(self, seq: int, latency_us: float) -> None:
        """Cold start once per process; resident memory every RSS_SAMPLE_EVERY warm inferences."""
        global _first_prediction_done
        self._predictions += 1
        if not _first_prediction_done:
            _first_prediction_done = True
            cold_start_s = process_age_s()
            self.journal.record_inference_stats(seq, "cold", latency_us, resident_memory_mb(), cold_start_s)
        elif self._predictions % RSS_SAMPLE_EVERY == 1:
            self.journal.record_inference_stats(seq, "warm", latency_us, resident_memory_mb(), None)

    def corrected_labels(self, x: np.ndarray) -> np.ndarray:
        """The coordinator's resolved label for each sample, or -1 where there is no correction:
        pseudo-labels for fine-tuning on inputs the device got wrong."""
        batch = check_input(x)
        labels = np.full(len(batch), -1, dtype=np.int64)
        for i, sample in enumerate(batch):
            correction = self.cache.correction(hashlib.sha256(sample.tobytes()).digest())
            if correction is not None:
                labels[i] = correction.label
        return labels

    # -- fine-tuning -----------------------------------------------------------------------

    def fine_tune(
        self,
        x: np.ndarray,
        y: np.ndarray,
        *,
        epochs: int = 5,
        batch_size: int = 16,
        learning_rate: float = 0.05,
        codec: str = "float32",
        seed: int = 0,
    ) -> int:
        """Train the installed model locally and journal the weight delta; returns its seq."""
        x = check_input(x)
        y = np.asarray(y, dtype=np.int64).reshape(-1)
        if len(x) == 0 or len(x) != len(y):
            raise ValueError(f"fine_tune needs as many labels as samples and at least one: {len(x)} vs {len(y)}")
        with self._lock:
            manifest = self.models.manifest()
            if manifest is None:
                raise NoModelError("no model installed yet: sync with a coordinator first")
            if y.min() < 0 or y.max() >= len(manifest.labels):
                raise ValueError(f"labels must be in 0..{len(manifest.labels) - 1}")
            if self.fine_tuning is None:
                raise NoModelError("this client was created without a fine-tuning profile")
            kind = {"keras": KERAS, "litert": TFLITE_TRAINABLE, "head": TFLITE_TRAINABLE_HEAD}[self.fine_tuning]
            artifact = manifest.artifact(kind)
            path = self.models.artifact_path(kind)
            if artifact is None or path is None:
                raise NoModelError(f"model version {manifest.version} has no {kind} artifact to fine-tune")
            if self.fine_tuning == "keras":
                from client import keras_trainer

                result = keras_trainer.fine_tune(path, artifact.sha256, x, y, epochs, batch_size, learning_rate, seed)
                delta, loss = result.delta, result.loss
            else:
                delta, loss = self._fine_tune_lite(
                    self.fine_tuning, path, artifact.sha256, x, y, epochs, batch_size, learning_rate, seed
                )
            return self._journal_delta(manifest.version, delta, len(x), loss, codec)

    @staticmethod
    def _fine_tune_lite(
        profile: str,
        path: Path,
        sha256: str,
        x: np.ndarray,
        y: np.ndarray,
        epochs: int,
        batch_size: int,
        learning_rate: float,
        seed: int,
    ) -> tuple[dict[str, np.ndarray], float]:
        """Lean profiles, LiteRT training signatures and no TensorFlow: "litert" trains the whole
        model; "head" the softmax head only, and its delta covers the head's variables only."""
        from client.litert_training import LiteRTHeadTrainer, LiteRTTrainer

        trainer_class = LiteRTTrainer if profile == "litert" else LiteRTHeadTrainer
        names = {} if profile == "litert" else HEAD_VARIABLES
        with shared_trainer(trainer_class, path, sha256) as (trainer, base):
            losses = trainer.fit(x, y, lr=learning_rate, epochs=epochs, batch_size=batch_size, seed=seed)
            trained = trainer.get_weights()
        delta = {names.get(name, name): (trained[name] - base[name]).astype(np.float32) for name in base}
        return delta, float(losses[-1])

    def _journal_delta(
        self, base_version: int, delta: dict[str, np.ndarray], num_examples: int, loss: float, codec: str
    ) -> int:
        """Encode (with error feedback for lossy codecs) and journal the delta and the new residual
        in one transaction, so a crash can neither lose the residual nor apply it twice."""
        from fedsync.codecs import ErrorFeedback

        feedback = ErrorFeedback(codec)
        feedback.load_state(self.journal.codec_residuals())
        specs, payload = feedback.encode(delta)
        specs_json = json.dumps([{"name": s.name, "shape": list(s.shape), "dtype": s.dtype} for s in specs])
        with _journal_writes():
            return self.journal.append_delta(
                base_version,
                num_examples,
                codec,
                specs_json,
                payload,
                loss,
                extra_statements=self.journal.residual_statements(feedback.state()),
            )

    # -- sync ------------------------------------------------------------------------------

    def sync(self, address: str, *, timeout_s: float = 30.0, attempts: int = 3) -> SyncReport:
        """Send what is pending, pull corrections and the newest model (see client.sync)."""
        from client.sync import sync_with_retries

        return sync_with_retries(self, address, timeout_s=timeout_s, attempts=attempts)

    def sync_in_background(self, address: str, *, interval_s: float = 30.0) -> BackgroundSync:
        """Start a thread that syncs whenever the coordinator is reachable; stop() it when done."""
        from client.background import BackgroundSync

        return BackgroundSync(self, address, interval_s=interval_s).start()

    def before_sync(self) -> None:
        """Flush write-behind state, so a sync on another connection sees (and corrects) it."""
        with self._lock:
            if self.cache.has_pending():
                with self.journal.transaction():
                    self.cache.flush()

    def after_sync(self, corrections_applied: bool = True) -> None:
        """After a sync; `corrections_applied` False: it applied none, there is nothing to reload."""
        if corrections_applied:
            with self._lock:
                self.cache.reload_corrections()

    def close(self) -> None:
        with self._lock:
            if self.journal.conn is not None:
                with contextlib.suppress(sqlite3.Error), self.journal.transaction():
                    self.cache.flush()
        self.journal.close()
