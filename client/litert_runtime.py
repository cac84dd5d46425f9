"""Lean on-device runtime for fedsync's TFLite models: numpy + ``ai_edge_litert`` only.

This module must never import TensorFlow or Keras (directly or through ``fedsync.model``
/ ``fedsync.tflite_export``); a test enforces it. The models it runs are produced on the
coordinator by :mod:`fedsync.tflite_export`:

* :class:`LiteRTClassifier` -- a float32 or int8 classifier (``[n, 64] -> [n, 10]``).
* the trainable models, in :mod:`client.litert_training`.

Inputs are validated by :func:`check_input` (preprocessed digits: 64 float32 pixels scaled
to [0, 1]). Corrupt or unexpected model files raise :class:`ModelFormatError`; bad inputs
raise :class:`InputError`. Both subclass ``ValueError``.

Interpreters are not thread-safe; each object serializes its own calls with a lock.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping
from typing import Any

import numpy as np
from ai_edge_litert.interpreter import Interpreter

__all__ = [
    "InputError",
    "LiteRTClassifier",
    "ModelFormatError",
    "check_input",
    "check_sample",
]

NUM_FEATURES = 64

# Signature / tensor names of the trainable models (kept in sync with
# fedsync.tflite_export, which this module must not import).
HEAD_WEIGHT_NAMES = ("head_kernel", "head_bias")
# Whole-model weights: fedsync.model names -> tensor names in the signatures ("/" is not
# allowed in signature tensor names).
FULL_WEIGHT_NAMES = ("hidden/kernel", "hidden/bias", "head/kernel", "head/bias")
_FULL_WEIGHT_TENSORS: dict[str, str] = {name: name.replace("/", "_") for name in FULL_WEIGHT_NAMES}


_TFLITE_IDENTIFIER = b"TFL3"  # flatbuffer file identifier, bytes 4..8 of every .tflite


class ModelFormatError(ValueError):
    """The model bytes are not a usable TFLite model of the expected kind."""


class InputError(ValueError):
    """An input array has the wrong shape, dtype or non-finite values."""


# --------------------------------------------------------------------------- inputs


def check_input(x: Any, expected_shape_tail: tuple[int, ...] = (NUM_FEATURES,)) -> np.ndarray:
    """Validate ``x`` and return it as a C-contiguous float32 batch ``(n, *expected_shape_tail)``.

    * A single sample of shape ``expected_shape_tail`` gets a leading batch axis of 1.
    * Integer, unsigned and float (16/32/64-bit) dtypes are accepted and converted to
      float32 (float64 loses precision beyond ~7 digits, irrelevant for pixels in [0, 1]).
      Bool, complex, object, string/bytes and datetime dtypes are rejected: they are never
      valid preprocessed pixels and silently casting them would hide a caller bug.
    * NaN or +/-Inf (including float64 values that overflow float32) are rejected.
    * An empty batch ``(0, *tail)`` is allowed here; callers decide what it means.

    Value range is *not* checked (preprocessing is the caller's contract).
    """
    tail = tuple(int(d) for d in expected_shape_tail)
    if isinstance(x, np.ndarray):
        arr = x
    else:
        try:
            arr = np.asarray(x)
        except (ValueError, TypeError) as exc:  # ragged nested lists etc.
            raise InputError(f"input is not a rectangular numeric array: {exc}") from None
    kind = arr.dtype.kind
    if kind not in "iuf":
        what = {
            "b": "bool",
            "c": "complex",
            "O": "object",
            "U": "string",
            "S": "bytes",
            "V": "structured/void",
            "M": "datetime",
            "m": "timedelta",
        }.get(kind, str(arr.dtype))
        raise InputError(f"input dtype must be a real number type (int/uint/float), got {what} ({arr.dtype})")
    if arr.ndim == len(tail):
        arr = arr[np.newaxis, ...]
    if arr.ndim != len(tail) + 1 or tuple(arr.shape[1:]) != tail:
        expected = ", ".join(str(d) for d in tail)
        raise InputError(f"input shape must be (n, {expected}) or ({expected},), got {tuple(np.shape(x))}")
    if arr.dtype == np.float32:
        out = np.ascontiguousarray(arr)
    else:
        # float64 values beyond float32's range become Inf and are reported below.
        with np.errstate(over="ignore"):
            out = np.ascontiguousarray(arr, dtype=np.float32)
    if kind in "iu":  # integers are finite and fit float32's range
        return out
    finite = np.isfinite(out)
    if not finite.all():
        n_nan = int(np.isnan(out).sum())
        n_inf = int(out.size - finite.sum()) - n_nan
        rows = np.flatnonzero(~finite.reshape(len(out), -1).all(axis=1))
        raise InputError(
            f"input contains {n_nan} NaN and {n_inf} Inf value(s) after conversion to float32 "
            f"(first bad sample index {int(rows[0])})"
        )
    return out


_FLOAT32 = np.dtype(np.float32)
_SAMPLE_SHAPES = ((NUM_FEATURES,), (1, NUM_FEATURES))


def check_sample(x: Any) -> np.ndarray:
    """One sample, ``(64,)`` or ``(1, 64)``, validated like :func:`check_input` and returned as it
    returns it: a ``(1, 64)`` C-contiguous float32 array.

    What callers usually pass (a C-contiguous float32 ndarray) takes a fast path: attribute
    compares and one ``np.isfinite``, no conversion. Anything else, and a non-finite sample for
    its error message, goes through :func:`check_input`.
    """
    if (
        type(x) is np.ndarray
        and x.dtype == _FLOAT32
        and x.shape in _SAMPLE_SHAPES
        and x.flags.c_contiguous
        and np.isfinite(x).all()
    ):
        return x.reshape(1, NUM_FEATURES)
    batch = check_input(x)
    if len(batch) != 1:
        raise InputError(f"predict takes one sample, got a batch of {len(batch)}")
    return batch


# --------------------------------------------------------------------------- model loading


def _read_model(model_path_or_bytes: str | os.PathLike[str] | bytes | bytearray | memoryview) -> bytes:
    if isinstance(model_path_or_bytes, (bytes, bytearray, memoryview)):
        content = bytes(model_path_or_bytes)
        source = "model bytes"
    elif isinstance(model_path_or_bytes, (str, os.PathLike)):
        # Missing/unreadable files raise the usual OSError: that is not a format problem.
        with open(model_path_or_bytes, "rb") as fh:
            content = fh.read()
        source = os.fspath(model_path_or_bytes)
    else:
        raise TypeError(f"expected a path or bytes, got {type(model_path_or_bytes).__name__}")
    if len(content) < 8:
        raise ModelFormatError(f"{source}: not a TFLite model ({len(content)} bytes, truncated or empty)")
    if content[4:8] != _TFLITE_IDENTIFIER:
        raise ModelFormatError(f"{source}: not a TFLite model (missing 'TFL3' flatbuffer identifier)")
    return content


def _new_interpreter(content: bytes, num_threads: int, what: str) -> Interpreter:
    try:
        return Interpreter(model_content=content, num_threads=num_threads)
    except Exception as exc:  # the native loader raises ValueError/RuntimeError/...
        raise ModelFormatError(f"{what}: invalid or truncated TFLite model ({_one_line(exc)})") from exc


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text[:200] or type(exc).__name__


def _signature_names(interpreter: Interpreter) -> list[str]:
    try:
        return sorted(interpreter.get_signature_list())
    except Exception:
        return []


def _is_full_trainable(interpreter: Interpreter) -> bool:
    try:
        inputs = interpreter.get_signature_list()["set_weights"]["inputs"]
    except Exception:
        return False
    return set(inputs) == set(_FULL_WEIGHT_TENSORS.values())


def _quant_params(details: Mapping[str, Any]) -> tuple[float, int] | None:
    """(scale, zero_point) for a per-tensor quantized int tensor, else None."""
    if np.dtype(details["dtype"]).kind == "f":
        return None
    scale, zero_point = details["quantization"]
    if not scale:
        return None
    return float(scale), int(zero_point)


# --------------------------------------------------------------------------- classifier


class _Slot:
    """One interpreter allocated for one batch size."""

    __slots__ = ("batch", "input_index", "interpreter", "output_index")

    def __init__(self, interpreter: Interpreter, input_index: int, output_index: int, batch: int) -> None:
        self.interpreter = interpreter
        self.input_index = input_index
        self.output_index = output_index
        self.batch = batch


class LiteRTClassifier:
    """Runs a float32 or int8 ``.tflite`` classifier mapping ``(n, 64)`` to ``(n, classes)``.

    Two interpreters are kept: one allocated once for single samples (the fast path:
    ``set_tensor`` / ``invoke`` / ``get_tensor``, never re-allocated, so interleaving
    single-sample and batch calls costs nothing extra) and one created lazily for batches,
    resized with ``resize_tensor_input`` + ``allocate_tensors`` only when the batch size
    differs from the previous batch call.

    Models whose input/output tensors are themselves quantized (int8/uint8 I/O, as produced
    by ``fedsync.tflite_export.to_tflite_int8``) take the same float32 inputs: they are
    quantized here with the input tensor's scale and zero point, and outputs dequantized.

    Attributes:
        input_shape: the model's input shape signature, e.g. ``(-1, 64)``; -1 = dynamic.
        input_dtype: dtype of the model's input tensor (float32 for fedsync exports).
        num_outputs: number of classes (last output dimension).
    """

    def __init__(self, model_path_or_bytes: str | os.PathLike[str] | bytes, num_threads: int = 1) -> None:
        if int(num_threads) < 1:
            raise ValueError(f"num_threads must be >= 1, got {num_threads}")
        self._content = _read_model(model_path_or_bytes)
        self._num_threads = int(num_threads)
        self._lock = threading.Lock()
        interpreter = _new_interpreter(self._content, self._num_threads, "classifier")
        try:
            inputs = interpreter.get_input_details()
            outputs = interpreter.get_output_details()
        except Exception as exc:
            raise ModelFormatError(f"classifier: cannot read model tensors ({_one_line(exc)})") from exc
        if len(inputs) != 1 or len(outputs) != 1:
            hint = ""
            if "train" in _signature_names(interpreter):
                hint = " (this looks like a trainable-head model: use LiteRTHeadTrainer)"
                if _is_full_trainable(interpreter):
                    hint = " (this looks like a trainable whole-model model: use LiteRTTrainer)"
            raise ModelFormatError(
                f"classifier: expected 1 input and 1 output tensor, got {len(inputs)} and {len(outputs)}" + hint
            )
        in_sig = tuple(int(d) for d in inputs[0]["shape_signature"])
        out_sig = tuple(int(d) for d in outputs[0]["shape_signature"])
        if len(in_sig) < 2 or len(out_sig) != 2 or out_sig[1] <= 0 or any(d <= 0 for d in in_sig[1:]):
            raise ModelFormatError(
                f"classifier: expected input (batch, features...) and output (batch, classes), "
                f"got {in_sig} and {out_sig}"
            )
        self.input_shape: tuple[int, ...] = in_sig
        self.input_dtype: np.dtype = np.dtype(inputs[0]["dtype"])
        self._plain_float_input = self.input_dtype == np.float32
        self.num_outputs: int = out_sig[1]
        self._feature_shape = in_sig[1:]
        self._dynamic_batch = in_sig[0] == -1
        self._fixed_batch = None if self._dynamic_batch else in_sig[0]
        self._in_quant = _quant_params(inputs[0])
        self._out_quant = _quant_params(outputs[0])
        if self.input_dtype.kind != "f" and self._in_quant is None:
            raise ModelFormatError(f"classifier: unsupported non-quantized input dtype {self.input_dtype}")
        if self._in_quant is not None:
            info = np.iinfo(self.input_dtype)
            self._in_range = (float(info.min), float(info.max))
        self._single = self._allocate(interpreter, inputs[0]["index"], outputs[0]["index"], 1)
        self._batch: _Slot | None = None

    # -- internals

    def _allocate(self, interpreter: Interpreter, input_index: int, output_index: int, n: int) -> _Slot:
        try:
            if self._dynamic_batch or n != self._fixed_batch:
                interpreter.resize_tensor_input(input_index, [n, *self._feature_shape])
            interpreter.allocate_tensors()
        except Exception as exc:
            raise ModelFormatError(f"classifier: cannot allocate tensors ({_one_line(exc)})") from exc
        return _Slot(interpreter, input_index, output_index, n)

    def _batch_slot(self, n: int) -> _Slot:
        slot = self._batch
        if slot is None:
            interpreter = _new_interpreter(self._content, self._num_threads, "classifier")
            slot = self._batch = self._allocate(interpreter, self._single.input_index, self._single.output_index, n)
        elif slot.batch != n:
            self._batch = self._allocate(slot.interpreter, slot.input_index, slot.output_index, n)
            slot = self._batch
        return slot

    def _to_model_input(self, x: np.ndarray) -> np.ndarray:
        if self._in_quant is None:
            return x if self.input_dtype == np.float32 else x.astype(self.input_dtype)
        scale, zero_point = self._in_quant
        low, high = self._in_range
        # In place on one temporary: np.clip and fresh arrays per step cost more than the model.
        q = np.rint(x / np.float32(scale))
        q += zero_point
        np.minimum(q, high, out=q)
        np.maximum(q, low, out=q)
        return q.astype(self.input_dtype)

    def _from_model_output(self, y: np.ndarray) -> np.ndarray:
        if self._out_quant is None:
            return y.astype(np.float32, copy=False)
        scale, zero_point = self._out_quant
        return ((y.astype(np.float32) - zero_point) * scale).astype(np.float32)

    # -- API

    def predict_proba(self, x: Any) -> np.ndarray:
        """Class probabilities, float32 ``(n, num_outputs)``, for ``x`` of shape (n, 64) or (64,)."""
        batch = check_input(x, self._feature_shape)
        n = len(batch)
        if n == 0:
            return np.empty((0, self.num_outputs), dtype=np.float32)
        if self._fixed_batch is not None and n != self._fixed_batch:
            raise InputError(f"model has a fixed batch size {self._fixed_batch}, got {n} samples")
        model_in = self._to_model_input(batch)
        with self._lock:
            slot = self._single if n == 1 else self._batch_slot(n)
            slot.interpreter.set_tensor(slot.input_index, model_in)
            slot.interpreter.invoke()
            out = slot.interpreter.get_tensor(slot.output_index)
        return self._from_model_output(out)

    def predict(self, x: Any) -> np.ndarray:
        """Most likely class index per sample, int64 ``(n,)``."""
        return np.argmax(self.predict_proba(x), axis=1)

    def top1(self, sample: np.ndarray) -> tuple[int, float]:
        """(class, probability) of the most likely class of one sample that :func:`check_input`
        would return unchanged: shape ``(1, *features)``, float32, C-contiguous, finite.

        The per-call path of ``EdgeClient.predict``: no re-validation, and a quantized output is
        dequantized only at the winning class (the scale is positive, so the argmax, first index
        on ties, is the same as on the dequantized probabilities)."""
        if self._fixed_batch not in (None, 1):
            raise InputError(f"model has a fixed batch size {self._fixed_batch}, got 1 sample")
        model_in = sample if self._plain_float_input else self._to_model_input(sample)
        slot = self._single
        with self._lock:
            slot.interpreter.set_tensor(slot.input_index, model_in)
            slot.interpreter.invoke()
            out = slot.interpreter.get_tensor(slot.output_index)[0]
        label = int(out.argmax())
        value = out.item(label)
        if self._out_quant is not None:
            scale, zero_point = self._out_quant
            # float32 like _from_model_output, so both paths report the same confidence.
            value = np.float32((np.float32(value) - np.float32(zero_point)) * np.float32(scale))
        return label, float(value)
