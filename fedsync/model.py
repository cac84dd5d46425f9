"""The reference digits model: a small MLP, and weights as ordered name -> array dicts.

Importing this module imports Keras (and TensorFlow); keep it off lean inference paths.
"""

from __future__ import annotations

from collections.abc import Mapping

import keras
import numpy as np

INPUT_NAME = "pixels"
NUM_FEATURES = 64
LABELS: tuple[str, ...] = tuple(str(d) for d in range(10))
PREPROCESSING = "digits 8x8 grayscale flattened to 64 float32 values, scaled from 0..16 to 0..1"

Weights = dict[str, np.ndarray]


def build_model(hidden_units: int = 32, seed: int = 0) -> keras.Model:
    """An MLP whose last layer ("head") is a softmax classifier over the digit labels."""
    keras.utils.set_random_seed(seed)
    model = keras.Sequential(
        [
            keras.Input((NUM_FEATURES,), name=INPUT_NAME),
            keras.layers.Dense(hidden_units, activation="relu", name="hidden"),
            keras.layers.Dense(len(LABELS), activation="softmax", name="head"),
        ],
        name="digits_mlp",
    )
    compile_for_training(model)
    return model


def compile_for_training(model: keras.Model, learning_rate: float = 0.05) -> None:
    model.compile(
        optimizer=keras.optimizers.SGD(learning_rate=learning_rate),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )


def weight_name(model: keras.Model, variable: keras.Variable) -> str:
    """The variable path ("hidden/kernel") without the model's own name, which differs between a
    freshly built and a reloaded model."""
    prefix = model.name + "/"
    return variable.path[len(prefix) :] if variable.path.startswith(prefix) else variable.path


def get_weights(model: keras.Model) -> Weights:
    return {weight_name(model, w): np.asarray(w.numpy(), dtype=np.float32) for w in model.weights}


def set_weights(model: keras.Model, weights: Mapping[str, np.ndarray]) -> None:
    names = [weight_name(model, w) for w in model.weights]
    missing = set(names) - set(weights)
    if missing:
        raise KeyError(f"weights missing tensors: {sorted(missing)}")
    for name, variable in zip(names, model.weights, strict=True):
        variable.assign(np.asarray(weights[name], dtype=np.float32))
