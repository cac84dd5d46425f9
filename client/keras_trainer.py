"""Whole-model fine-tuning with Keras (the TensorFlow profile). Imports TensorFlow on first use only.

Loaded models are shared per artifact sha256 across clients in one process (a simulated fleet
runs one Keras graph, not one per device): each fine-tune resets the shared model to the
version's base weights first.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

_lock = threading.Lock()
_models: dict[str, tuple[Any, dict[str, np.ndarray]]] = {}
_MAX_CACHED = 4


@dataclass(frozen=True)
class TrainResult:
    delta: dict[str, np.ndarray]
    num_examples: int
    loss: float


def _load(path: Path, sha256: str) -> tuple[Any, dict[str, np.ndarray]]:
    cached = _models.get(sha256)
    if cached is not None:
        return cached
    import keras

    from fedsync.model import compile_for_training, get_weights

    model = keras.models.load_model(path, compile=False)
    compile_for_training(model)
    entry = (model, get_weights(model))
    if len(_models) >= _MAX_CACHED:
        _models.pop(next(iter(_models)))
    _models[sha256] = entry
    return entry


def base_weights(path: Path, sha256: str) -> dict[str, np.ndarray]:
    with _lock:
        return _load(path, sha256)[1]


def fine_tune(
    path: Path,
    sha256: str,
    x: np.ndarray,
    y: np.ndarray,
    epochs: int = 5,
    batch_size: int = 16,
    learning_rate: float = 0.05,
    seed: int = 0,
) -> TrainResult:
    with _lock:
        import keras

        from fedsync.model import get_weights, set_weights

        model, base = _load(path, sha256)
        set_weights(model, base)
        model.optimizer.learning_rate.assign(learning_rate)
        keras.utils.set_random_seed(seed)
        history = model.fit(x, y, epochs=epochs, batch_size=batch_size, verbose=0, shuffle=True)
        trained = get_weights(model)
        delta = {name: (trained[name] - base[name]).astype(np.float32) for name in base}
        loss = float(history.history["loss"][-1])
    return TrainResult(delta=delta, num_examples=len(x), loss=loss)
