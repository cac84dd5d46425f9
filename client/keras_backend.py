"""Keras inference: the fallback backend for devices without LiteRT. Imports TensorFlow."""

from __future__ import annotations

from pathlib import Path

import numpy as np


class KerasClassifier:
    def __init__(self, path: Path) -> None:
        import keras

        self.model = keras.models.load_model(path, compile=False)
        shape = self.model.inputs[0].shape
        self.input_shape = (-1, *shape[1:])
        self.num_outputs = int(self.model.outputs[0].shape[-1])

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        # Calling the model directly avoids model.predict's per-call setup (tens of ms).
        return np.asarray(self.model(x, training=False), dtype=np.float32)
