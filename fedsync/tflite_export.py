"""Export the reference digits model to TFLite flatbuffers for on-device clients.

Coordinator side only: this module imports TensorFlow. Clients load the produced bytes
with :mod:`client.litert_runtime`, which needs only numpy and ``ai_edge_litert``.

Three artifacts:

* :func:`to_tflite_float32` -- plain float32 inference model.
* :func:`to_tflite_int8` -- full-integer post-training quantization (int8 weights *and*
  activations, calibrated on a representative dataset) with **int8 input and output
  tensors**. The scale and zero point of each are in the model's tensor details;
  ``client.litert_runtime.LiteRTClassifier`` quantizes the same preprocessed float32 pixels
  (``digits / 16``) with them and dequantizes the probabilities, so clients see the float
  model's interface. Without the QUANTIZE/DEQUANTIZE ops and their float tensors in the
  graph the file is a little smaller (at hidden=32 this is what makes it 2x smaller than the
  float32 model, not 1.9x).
* :func:`to_trainable_head_tflite` -- on-device fine-tuning of the softmax head only, with
  the hidden layer frozen into constants. The gradient is written by hand so the model
  uses TFLite builtin ops only (``tf.GradientTape`` would pull in Flex ops, which the
  LiteRT runtime does not ship). Signatures:

  - ``infer``: ``x`` float32 ``[None, 64]`` -> ``{"probs": [None, 10]}``
  - ``train``: ``x`` float32 ``[None, 64]``, ``y`` int32 ``[None]`` (class indices, like
    the Keras model's ``sparse_categorical_crossentropy``), ``lr`` float32 scalar ->
    ``{"loss": scalar}`` (mean cross-entropy of the batch *before* the update). One
    plain SGD step on the head.
  - ``get_weights``: -> ``{"head_kernel": [H, 10], "head_bias": [10]}``
  - ``set_weights``: ``head_kernel``, ``head_bias`` -> ``{"ok": int32 scalar}`` (a dummy
    output; a signature without outputs is awkward to convert and to run).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable

import keras
import numpy as np
import tensorflow as tf

from fedsync.model import INPUT_NAME, NUM_FEATURES

HIDDEN_LAYER = "hidden"
HEAD_LAYER = "head"

# Signature names and tensor names of the trainable-head model; the client runtime
# hard-codes the same strings (it must not import this module).
INFER_SIGNATURE = "infer"
TRAIN_SIGNATURE = "train"
GET_WEIGHTS_SIGNATURE = "get_weights"
SET_WEIGHTS_SIGNATURE = "set_weights"
TRAINABLE_SIGNATURES = (INFER_SIGNATURE, TRAIN_SIGNATURE, GET_WEIGHTS_SIGNATURE, SET_WEIGHTS_SIGNATURE)

ConverterHook = Callable[[tf.lite.TFLiteConverter], None]


def _convert_keras(model: keras.Model, configure: ConverterHook | None = None) -> bytes:
    """Convert via a SavedModel export of the Keras model.

    ``TFLiteConverter.from_concrete_functions(..., trackable_obj=model)`` on a Keras 3
    model emits VAR_HANDLE/READ_VARIABLE ops with *no* initial values (a ~2.8 KB model
    without its weights), so we go through ``model.export`` + ``from_saved_model``, which
    freezes the weights into constants.
    """
    spec = tf.TensorSpec([None, model.input_shape[-1]], tf.float32, name=INPUT_NAME)
    with tempfile.TemporaryDirectory(prefix="fedsync_tflite_") as tmp:
        saved = os.path.join(tmp, "saved_model")
        model.export(saved, format="tf_saved_model", verbose=False, input_signature=[spec])
        converter = tf.lite.TFLiteConverter.from_saved_model(saved)
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
        if configure is not None:
            configure(converter)
        return bytes(converter.convert())


def to_tflite_float32(model: keras.Model) -> bytes:
    """The model as a float32 TFLite flatbuffer (builtin ops only)."""
    return _convert_keras(model)


def to_tflite_int8(model: keras.Model, representative_x: np.ndarray, max_samples: int = 200) -> bytes:
    """Full-integer (int8) post-training quantization, int8 input and output tensors included.

    ``representative_x`` is a ``(n, 64)`` array of preprocessed samples used to calibrate
    activation ranges; at most ``max_samples`` evenly spaced rows are used (100-200 is
    plenty for this model). Weights and activations are int8 (kernels per-channel, the
    converter's default). The input is quantized and the output dequantized by the client
    runtime with the scale/zero point in the tensor details (see the module docstring).
    """
    rep = np.asarray(representative_x, dtype=np.float32)
    if rep.ndim != 2 or rep.shape[1] != NUM_FEATURES or rep.shape[0] == 0:
        raise ValueError(f"representative_x must have shape (n>0, {NUM_FEATURES}), got {rep.shape}")
    if not np.isfinite(rep).all():
        raise ValueError("representative_x contains NaN or Inf")
    if len(rep) > max_samples:  # evenly spaced rows: robust to data sorted by class
        rep = rep[np.linspace(0, len(rep) - 1, max_samples).astype(np.int64)]

    def representative_dataset():
        for row in rep:
            yield [row[None, :]]

    def configure(converter: tf.lite.TFLiteConverter) -> None:
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = representative_dataset
        # INT8 builtins only: conversion fails instead of silently leaving float ops.
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        converter.inference_input_type = tf.int8
        converter.inference_output_type = tf.int8

    return _convert_keras(model, configure)


class _TrainableHead(tf.Module):
    """Frozen hidden layer (constants) + trainable softmax head (variables)."""

    def __init__(
        self, hidden_kernel: np.ndarray, hidden_bias: np.ndarray, head_kernel: np.ndarray, head_bias: np.ndarray
    ) -> None:
        super().__init__(name="trainable_head")
        num_features, hidden_units = hidden_kernel.shape
        num_classes = head_kernel.shape[1]
        self._num_classes = int(num_classes)
        self._hidden_kernel = tf.constant(hidden_kernel, dtype=tf.float32)
        self._hidden_bias = tf.constant(hidden_bias, dtype=tf.float32)
        self.head_kernel = tf.Variable(head_kernel, dtype=tf.float32, name="head_kernel")
        self.head_bias = tf.Variable(head_bias, dtype=tf.float32, name="head_bias")

        x_spec = tf.TensorSpec([None, num_features], tf.float32, name="x")
        self.infer = tf.function(self._infer, input_signature=[x_spec])
        self.train = tf.function(
            self._train,
            input_signature=[
                x_spec,
                tf.TensorSpec([None], tf.int32, name="y"),
                tf.TensorSpec([], tf.float32, name="lr"),
            ],
        )
        self.get_weights = tf.function(self._get_weights, input_signature=[])
        self.set_weights = tf.function(
            self._set_weights,
            input_signature=[
                tf.TensorSpec([hidden_units, num_classes], tf.float32, name="head_kernel"),
                tf.TensorSpec([num_classes], tf.float32, name="head_bias"),
            ],
        )

    def signatures(self) -> dict[str, tf.types.experimental.ConcreteFunction]:
        return {
            INFER_SIGNATURE: self.infer.get_concrete_function(),
            TRAIN_SIGNATURE: self.train.get_concrete_function(),
            GET_WEIGHTS_SIGNATURE: self.get_weights.get_concrete_function(),
            SET_WEIGHTS_SIGNATURE: self.set_weights.get_concrete_function(),
        }

    def _features(self, x: tf.Tensor) -> tf.Tensor:
        return tf.nn.relu(tf.matmul(x, self._hidden_kernel) + self._hidden_bias)

    def _logits(self, features: tf.Tensor) -> tf.Tensor:
        return tf.matmul(features, self.head_kernel) + self.head_bias

    def _infer(self, x: tf.Tensor) -> dict[str, tf.Tensor]:
        return {"probs": tf.nn.softmax(self._logits(self._features(x)))}

    def _train(self, x: tf.Tensor, y: tf.Tensor, lr: tf.Tensor) -> dict[str, tf.Tensor]:
        features = self._features(x)
        logits = self._logits(features)
        onehot = tf.one_hot(y, self._num_classes, dtype=tf.float32)
        batch = tf.cast(tf.shape(x)[0], tf.float32)
        # Mean cross-entropy, via LOG_SOFTMAX (stable, builtin) rather than log(softmax).
        loss = -tf.reduce_sum(onehot * tf.nn.log_softmax(logits)) / batch
        # Hand-written gradient of mean softmax cross-entropy: no GradientTape, no Flex ops.
        dlogits = (tf.nn.softmax(logits) - onehot) / batch
        d_kernel = tf.matmul(features, dlogits, transpose_a=True)
        d_bias = tf.reduce_sum(dlogits, axis=0)
        self.head_kernel.assign_sub(lr * d_kernel)
        self.head_bias.assign_sub(lr * d_bias)
        return {"loss": loss}

    def _get_weights(self) -> dict[str, tf.Tensor]:
        return {"head_kernel": tf.identity(self.head_kernel), "head_bias": tf.identity(self.head_bias)}

    def _set_weights(self, head_kernel: tf.Tensor, head_bias: tf.Tensor) -> dict[str, tf.Tensor]:
        self.head_kernel.assign(head_kernel)
        self.head_bias.assign(head_bias)
        return {"ok": tf.constant(1, dtype=tf.int32)}


def _dense_weights(model: keras.Model, name: str, activation: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        layer = model.get_layer(name)
    except ValueError as exc:
        raise ValueError(f"model has no layer named {name!r}; expected the fedsync.model MLP") from exc
    actual = getattr(getattr(layer, "activation", None), "__name__", None)
    if actual != activation or getattr(layer, "bias", None) is None:
        raise ValueError(f"layer {name!r} must be a Dense layer with bias and {activation} activation, got {actual}")
    kernel = np.asarray(layer.kernel.numpy(), dtype=np.float32)
    bias = np.asarray(layer.bias.numpy(), dtype=np.float32)
    return kernel, bias


def to_trainable_head_tflite(model: keras.Model) -> bytes:
    """A TFLite model that can fine-tune the softmax head on device (see module docstring).

    The hidden layer's current weights are baked in as constants; the head variables
    start from the Keras model's head weights. Converted with TFLite builtin ops only and
    resource variables enabled, so it runs on the plain LiteRT interpreter (no Flex
    delegate). Variable state lives in the interpreter instance: each new interpreter
    starts again from the exported head weights.
    """
    hidden_kernel, hidden_bias = _dense_weights(model, HIDDEN_LAYER, "relu")
    head_kernel, head_bias = _dense_weights(model, HEAD_LAYER, "softmax")
    module = _TrainableHead(hidden_kernel, hidden_bias, head_kernel, head_bias)
    with tempfile.TemporaryDirectory(prefix="fedsync_head_") as tmp:
        saved = os.path.join(tmp, "saved_model")
        tf.saved_model.save(module, saved, signatures=module.signatures())
        converter = tf.lite.TFLiteConverter.from_saved_model(saved, signature_keys=list(TRAINABLE_SIGNATURES))
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
        converter.experimental_enable_resource_variables = True
        return bytes(converter.convert())


# --------------------------------------------------------------------------- trainable full MLP

# Tensor names of the full-model weights inside the trainable .tflite (signature tensor
# names cannot contain "/"); the client maps them to fedsync.model's "hidden/kernel" etc.
FULL_WEIGHT_TENSORS = {
    "hidden/kernel": "hidden_kernel",
    "hidden/bias": "hidden_bias",
    "head/kernel": "head_kernel",
    "head/bias": "head_bias",
}


class _TrainableMLP(tf.Module):
    """Both Dense layers as variables, with a hand-written backward pass in builtin ops."""

    def __init__(
        self, hidden_kernel: np.ndarray, hidden_bias: np.ndarray, head_kernel: np.ndarray, head_bias: np.ndarray
    ) -> None:
        super().__init__(name="trainable_mlp")
        num_features, hidden_units = hidden_kernel.shape
        num_classes = head_kernel.shape[1]
        self._num_classes = int(num_classes)
        self.hidden_kernel = tf.Variable(hidden_kernel, dtype=tf.float32, name="hidden_kernel")
        self.hidden_bias = tf.Variable(hidden_bias, dtype=tf.float32, name="hidden_bias")
        self.head_kernel = tf.Variable(head_kernel, dtype=tf.float32, name="head_kernel")
        self.head_bias = tf.Variable(head_bias, dtype=tf.float32, name="head_bias")

        x_spec = tf.TensorSpec([None, num_features], tf.float32, name="x")
        self.infer = tf.function(self._infer, input_signature=[x_spec])
        self.train = tf.function(
            self._train,
            input_signature=[
                x_spec,
                tf.TensorSpec([None], tf.int32, name="y"),
                tf.TensorSpec([], tf.float32, name="lr"),
            ],
        )
        self.get_weights = tf.function(self._get_weights, input_signature=[])
        self.set_weights = tf.function(
            self._set_weights,
            input_signature=[
                tf.TensorSpec([num_features, hidden_units], tf.float32, name="hidden_kernel"),
                tf.TensorSpec([hidden_units], tf.float32, name="hidden_bias"),
                tf.TensorSpec([hidden_units, num_classes], tf.float32, name="head_kernel"),
                tf.TensorSpec([num_classes], tf.float32, name="head_bias"),
            ],
        )

    def signatures(self) -> dict[str, tf.types.experimental.ConcreteFunction]:
        return {
            INFER_SIGNATURE: self.infer.get_concrete_function(),
            TRAIN_SIGNATURE: self.train.get_concrete_function(),
            GET_WEIGHTS_SIGNATURE: self.get_weights.get_concrete_function(),
            SET_WEIGHTS_SIGNATURE: self.set_weights.get_concrete_function(),
        }

    def _forward(self, x: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        hidden = tf.nn.relu(tf.matmul(x, self.hidden_kernel) + self.hidden_bias)
        return hidden, tf.matmul(hidden, self.head_kernel) + self.head_bias

    def _infer(self, x: tf.Tensor) -> dict[str, tf.Tensor]:
        return {"probs": tf.nn.softmax(self._forward(x)[1])}

    def _train(self, x: tf.Tensor, y: tf.Tensor, lr: tf.Tensor) -> dict[str, tf.Tensor]:
        hidden, logits = self._forward(x)
        onehot = tf.one_hot(y, self._num_classes, dtype=tf.float32)
        batch = tf.cast(tf.shape(x)[0], tf.float32)
        loss = -tf.reduce_sum(onehot * tf.nn.log_softmax(logits)) / batch
        # Hand-written backprop of mean softmax cross-entropy (no GradientTape, no Flex ops).
        # Every gradient is computed from the pre-update weights before any variable changes.
        dlogits = (tf.nn.softmax(logits) - onehot) / batch
        d_head_kernel = tf.matmul(hidden, dlogits, transpose_a=True)
        d_head_bias = tf.reduce_sum(dlogits, axis=0)
        d_hidden = tf.matmul(dlogits, self.head_kernel, transpose_b=True)
        d_pre = d_hidden * tf.cast(tf.greater(hidden, 0.0), tf.float32)  # relu'(z) = [h > 0]
        d_hidden_kernel = tf.matmul(x, d_pre, transpose_a=True)
        d_hidden_bias = tf.reduce_sum(d_pre, axis=0)
        self.hidden_kernel.assign_sub(lr * d_hidden_kernel)
        self.hidden_bias.assign_sub(lr * d_hidden_bias)
        self.head_kernel.assign_sub(lr * d_head_kernel)
        self.head_bias.assign_sub(lr * d_head_bias)
        return {"loss": loss}

    def _get_weights(self) -> dict[str, tf.Tensor]:
        return {
            "hidden_kernel": tf.identity(self.hidden_kernel),
            "hidden_bias": tf.identity(self.hidden_bias),
            "head_kernel": tf.identity(self.head_kernel),
            "head_bias": tf.identity(self.head_bias),
        }

    def _set_weights(
        self, hidden_kernel: tf.Tensor, hidden_bias: tf.Tensor, head_kernel: tf.Tensor, head_bias: tf.Tensor
    ) -> dict[str, tf.Tensor]:
        self.hidden_kernel.assign(hidden_kernel)
        self.hidden_bias.assign(hidden_bias)
        self.head_kernel.assign(head_kernel)
        self.head_bias.assign(head_bias)
        return {"ok": tf.constant(1, dtype=tf.int32)}


def _convert_trainable(module: tf.Module, prefix: str) -> bytes:
    """SavedModel + ``from_saved_model`` (not ``from_concrete_functions``, which drops the
    variables' initial values), builtin ops only, resource variables enabled."""
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        saved = os.path.join(tmp, "saved_model")
        tf.saved_model.save(module, saved, signatures=module.signatures())
        converter = tf.lite.TFLiteConverter.from_saved_model(saved, signature_keys=list(TRAINABLE_SIGNATURES))
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
        converter.experimental_enable_resource_variables = True
        return bytes(converter.convert())


def to_trainable_tflite(model: keras.Model) -> bytes:
    """A TFLite model that fine-tunes the *whole* MLP (hidden and head layers) on device.

    Same four signatures as :func:`to_trainable_head_tflite` (``infer``, ``train``,
    ``get_weights``, ``set_weights``), but all four weight tensors are resource variables
    initialised from the Keras model's current weights: ``get_weights`` returns and
    ``set_weights`` takes ``hidden_kernel`` [64, H], ``hidden_bias`` [H], ``head_kernel``
    [H, 10] and ``head_bias`` [10] (the client runtime exposes them under the
    ``fedsync.model`` names ``"hidden/kernel"`` etc., see :data:`FULL_WEIGHT_TENSORS`).
    ``train`` does one plain SGD step on all four with a hand-written backward pass
    (relu mask as ``cast(h > 0)``), so the model uses TFLite builtin ops only and runs on
    the plain LiteRT interpreter. Variable state lives in the interpreter instance.
    """
    hidden_kernel, hidden_bias = _dense_weights(model, HIDDEN_LAYER, "relu")
    head_kernel, head_bias = _dense_weights(model, HEAD_LAYER, "softmax")
    if hidden_kernel.shape[0] != NUM_FEATURES or head_kernel.shape[0] != hidden_kernel.shape[1]:
        raise ValueError(
            f"expected hidden kernel ({NUM_FEATURES}, H) feeding head kernel (H, classes), "
            f"got {hidden_kernel.shape} and {head_kernel.shape}"
        )
    module = _TrainableMLP(hidden_kernel, hidden_bias, head_kernel, head_bias)
    return _convert_trainable(module, "fedsync_mlp_")
