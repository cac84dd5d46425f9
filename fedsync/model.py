"""The reference digits model: a small MLP, and weights as ordered name -> array dicts.

Importing this module imports Keras (and TensorFlow); keep it off lean inference paths.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

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


def weight_shapes(model: keras.Model) -> dict[str, tuple[int, ...]]:
    return {weight_name(model, w): tuple(w.shape) for w in model.weights}


def check_weights(shapes: Mapping[str, tuple[int, ...]], weights: Mapping[str, np.ndarray]) -> None:
    """What loading `weights` into a model whose weights have `shapes` refuses: a missing tensor
    (KeyError) or one of another shape (ValueError)."""
    missing = set(shapes) - set(weights)
    if missing:
        raise KeyError(f"weights missing tensors: {sorted(missing)}")
    for name, shape in shapes.items():
        if np.shape(weights[name]) != shape:
            raise ValueError(f"weight {name!r} has shape {np.shape(weights[name])}, the model {shape}")


def set_weights(model: keras.Model, weights: Mapping[str, np.ndarray]) -> None:
    check_weights(weight_shapes(model), weights)
    for variable in model.weights:
        variable.assign(np.asarray(weights[weight_name(model, variable)], dtype=np.float32))


@dataclass(frozen=True)
class DenseStep:
    """One Dense layer of a model, by the names of its weights (see `dense_steps`)."""

    kernel: str
    bias: str | None
    activation: str  # linear | relu | softmax


def dense_steps(model: keras.Model) -> tuple[DenseStep, ...] | None:
    """The model as a stack of float32 Dense layers that `forward` can run, or None when it is
    something else (then only Keras computes it)."""
    activations = {
        keras.activations.linear: "linear",
        keras.activations.relu: "relu",
        keras.activations.softmax: "softmax",
    }
    steps = []
    for layer in model.layers:
        if (
            type(layer) is not keras.layers.Dense
            or layer.dtype_policy.name != "float32"
            or layer.activation not in activations
            or getattr(layer, "quantization_mode", None) is not None
            or getattr(layer, "lora_enabled", False)
        ):
            return None
        bias = weight_name(model, layer.bias) if layer.use_bias else None
        steps.append(DenseStep(weight_name(model, layer.kernel), bias, activations[layer.activation]))
    return tuple(steps) or None


def forward(steps: Sequence[DenseStep], weights: Mapping[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    """What `model(x)` returns for the model `steps` describe holding `weights`, in float32 numpy:
    equal to float32 rounding (the matmul's summation order and exp differ from TensorFlow's),
    without Keras's and TensorFlow's dispatch overhead."""
    out = np.asarray(x, dtype=np.float32)
    for step in steps:
        out = out @ np.asarray(weights[step.kernel], dtype=np.float32)
        if step.bias is not None:
            out += np.asarray(weights[step.bias], dtype=np.float32)
        if step.activation == "relu":
            np.maximum(out, np.float32(0.0), out=out)
        elif step.activation == "softmax":
            out -= out.max(axis=-1, keepdims=True)
            np.exp(out, out=out)
            out /= out.sum(axis=-1, keepdims=True)
    return out
