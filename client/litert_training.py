"""On-device training of fedsync's trainable ``.tflite`` models with LiteRT (no TensorFlow).

* :class:`LiteRTHeadTrainer` -- the trainable-head model with ``infer`` / ``train`` /
  ``get_weights`` / ``set_weights`` signatures (fine-tuning of the softmax head).
* :class:`LiteRTTrainer` -- the trainable whole-model MLP with the same signatures (both
  layers; weights keyed like ``fedsync.model.get_weights``).

The gradients are written out in builtin ops by :mod:`fedsync.tflite_export` (GradientTape
signatures need Flex ops that LiteRT lacks). Like :mod:`client.litert_runtime`, this module must
never import TensorFlow.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from client.litert_runtime import (
    _FULL_WEIGHT_TENSORS,
    HEAD_WEIGHT_NAMES,
    InputError,
    ModelFormatError,
    _new_interpreter,
    _one_line,
    _read_model,
    check_input,
)

__all__ = ["LiteRTHeadTrainer", "LiteRTTrainer"]


def _trainer_signatures(weight_tensors: tuple[str, ...]) -> dict[str, tuple[frozenset[str], frozenset[str]]]:
    weights = frozenset(weight_tensors)
    return {
        "infer": (frozenset({"x"}), frozenset({"probs"})),
        "train": (frozenset({"x", "y", "lr"}), frozenset({"loss"})),
        "get_weights": (frozenset(), weights),
        "set_weights": (weights, frozenset()),
    }


def _check_labels(y: Any, n: int, num_classes: int) -> np.ndarray:
    """Class indices as int32 of shape ``(n,)``; integer dtypes only."""
    arr = np.asarray(y)
    if arr.dtype.kind not in "iu":
        raise InputError(f"labels must be integer class indices, got dtype {arr.dtype} (use y.astype(np.int32))")
    if arr.ndim == 0:
        arr = arr.reshape(1)
    if arr.shape != (n,):
        raise InputError(f"labels must have shape ({n},) to match x, got {np.shape(y)}")
    if n and (arr.min() < 0 or arr.max() >= num_classes):
        raise InputError(f"labels must be in [0, {num_classes}), got min {int(arr.min())} max {int(arr.max())}")
    return np.ascontiguousarray(arr, dtype=np.int32)


def _check_lr(lr: Any) -> np.ndarray:
    try:
        value = float(lr)
    except (TypeError, ValueError):
        raise InputError(f"learning rate must be a real number, got {lr!r}") from None
    if not np.isfinite(value) or value < 0:
        raise InputError(f"learning rate must be finite and >= 0, got {value}")
    return np.asarray(value, dtype=np.float32)


class _Signature:
    """Runs one signature like LiteRT's SignatureRunner, which resizes every input and re-allocates
    the subgraph on each call: here that happens only when an input's shape differs from the last
    call's (the native calls are no-ops then, but their Python side costs more than a small Invoke)."""

    __slots__ = ("_inputs", "_outputs", "_shapes", "_subgraph", "_wrapper")

    def __init__(self, wrapper: Any, subgraph: int, inputs: Mapping[str, int], outputs: Mapping[str, int]) -> None:
        self._wrapper = wrapper
        self._subgraph = subgraph
        self._inputs = dict(inputs)
        self._outputs = tuple(outputs.items())
        self._shapes: dict[str, tuple[int, ...]] | None = None  # as allocated; None: allocate first

    @classmethod
    def wrap(cls, runner: Any) -> Callable[..., dict[str, np.ndarray]]:
        """The runner itself where this LiteRT's SignatureRunner lacks the internals used here."""
        try:
            return cls(runner._interpreter_wrapper, runner._subgraph_index, runner._inputs, dict(runner._outputs))
        except (AttributeError, TypeError):
            return runner

    def __call__(self, **inputs: np.ndarray) -> dict[str, np.ndarray]:
        wrapper, subgraph, indices = self._wrapper, self._subgraph, self._inputs
        shapes, ready = self._shapes, False
        if shapes is not None and len(inputs) == len(shapes):
            ready = True
            for name, value in inputs.items():
                if shapes.get(name) != value.shape:
                    ready = False
                    break
        try:
            if not ready:
                self._allocate(inputs)
            for name, value in inputs.items():
                wrapper.SetTensor(indices[name], value, subgraph)
            wrapper.Invoke(subgraph)
        except BaseException:
            self._shapes = None  # whatever state a failure left: the next call allocates again
            raise
        return {name: wrapper.GetTensor(index, subgraph) for name, index in self._outputs}

    def _allocate(self, inputs: Mapping[str, np.ndarray]) -> None:
        if inputs.keys() != self._inputs.keys():
            raise ValueError(f"signature inputs are {sorted(self._inputs)}, got {sorted(inputs)}")
        allocated, self._shapes = self._shapes, None
        for name, value in inputs.items():
            # Resizing an allocated input to its current shape is a no-op in LiteRT.
            if allocated is None or allocated[name] != value.shape:
                shape = np.array(value.shape, dtype=np.int32)
                self._wrapper.ResizeInputTensor(self._inputs[name], shape, False, self._subgraph)
        self._wrapper.AllocateTensors(self._subgraph)
        self._shapes = {name: value.shape for name, value in inputs.items()}


class _SignatureTrainer:
    """Shared runtime of the trainable models (``infer`` / ``train`` / ``get_weights`` /
    ``set_weights`` signatures, SGD state in TFLite resource variables).

    Subclasses set ``_KIND`` (error message prefix), ``_MODEL`` (what the file should be),
    ``_WEIGHTS`` (public weight name -> tensor name in the signatures), ``_CLASSES_FROM``
    (public name of the bias whose length is the class count) and ``_OTHER`` (tensor
    names that identify the *other* trainable kind, with the class to suggest instead).
    """

    _KIND: str
    _MODEL: str
    _WEIGHTS: Mapping[str, str]
    _CLASSES_FROM: str
    _OTHER: tuple[frozenset[str], str]

    def __init__(self, model_path_or_bytes: str | os.PathLike[str] | bytes, num_threads: int = 1) -> None:
        content = _read_model(model_path_or_bytes)
        self._lock = threading.Lock()
        self._interpreter = _new_interpreter(content, int(num_threads), self._KIND)
        try:
            available = self._interpreter.get_signature_list()
        except Exception as exc:
            raise ModelFormatError(f"{self._KIND}: cannot read signatures ({_one_line(exc)})") from exc
        signatures = _trainer_signatures(tuple(self._WEIGHTS.values()))
        problems = []
        for name, (want_in, want_out) in signatures.items():
            sig = available.get(name)
            if sig is None:
                problems.append(f"missing signature {name!r}")
                continue
            have_in, have_out = set(sig["inputs"]), set(sig["outputs"])
            if have_in != want_in or not want_out <= have_out:
                problems.append(
                    f"signature {name!r} has inputs {sorted(have_in)} / outputs {sorted(have_out)}, "
                    f"expected {sorted(want_in)} / {sorted(want_out)}"
                )
        if problems:
            other_tensors, other_class = self._OTHER
            hint = ""
            if set(available.get("set_weights", {}).get("inputs", ())) == other_tensors:
                hint = f"; use {other_class}"
            raise ModelFormatError(
                f"{self._KIND}: not a fedsync {self._MODEL} ({'; '.join(problems)}; "
                f"found signatures {sorted(available)}){hint}"
            )
        try:
            runners = {name: self._interpreter.get_signature_runner(name) for name in signatures}
            set_in = runners["set_weights"].get_input_details()
            infer_in = runners["infer"].get_input_details()
        except Exception as exc:
            raise ModelFormatError(f"{self._KIND}: cannot prepare signatures ({_one_line(exc)})") from exc
        self.weight_shapes: dict[str, tuple[int, ...]] = {
            name: tuple(int(d) for d in set_in[tensor]["shape_signature"]) for name, tensor in self._WEIGHTS.items()
        }
        self.num_classes: int = self.weight_shapes[self._CLASSES_FROM][0]
        self.input_shape: tuple[int, ...] = tuple(int(d) for d in infer_in["x"]["shape_signature"])
        self._feature_shape = self.input_shape[1:]
        self._runners: dict[str, Callable[..., dict[str, np.ndarray]]] = {
            name: _Signature.wrap(runner) for name, runner in runners.items()
        }

    def _run(self, name: str, **inputs: np.ndarray) -> dict[str, np.ndarray]:
        with self._lock:
            return self._runners[name](**inputs)

    def infer(self, x: Any) -> np.ndarray:
        """Class probabilities, float32 ``(n, classes)``."""
        batch = check_input(x, self._feature_shape)
        if len(batch) == 0:
            return np.empty((0, self.num_classes), dtype=np.float32)
        return np.asarray(self._run("infer", x=batch)["probs"], dtype=np.float32)

    def train_step(self, x: Any, y: Any, lr: float) -> float:
        """One SGD step; returns the batch's mean cross-entropy *before* the step.

        ``y`` holds integer class indices, shape ``(n,)``.
        """
        batch = check_input(x, self._feature_shape)
        if len(batch) == 0:
            raise InputError("cannot train on an empty batch")
        labels = _check_labels(y, len(batch), self.num_classes)
        return self._train(batch, labels, _check_lr(lr))

    def _train(self, x: np.ndarray, y: np.ndarray, lr: np.ndarray) -> float:
        return float(self._run("train", x=x, y=y, lr=lr)["loss"])

    def fit(
        self,
        x: Any,
        y: Any,
        lr: float = 0.1,
        epochs: int = 5,
        batch_size: int = 32,
        seed: int = 0,
    ) -> list[float]:
        """Mini-batch SGD over shuffled data; returns the mean training loss of each epoch.

        Each epoch reshuffles with ``np.random.default_rng(seed)`` (deterministic), uses every
        sample once (the last batch may be smaller), and reports the sample-weighted mean of
        the per-batch losses (each measured before its step).
        """
        data = check_input(x, self._feature_shape)
        n = len(data)
        if n == 0:
            raise InputError("cannot fit on an empty dataset")
        labels = _check_labels(y, n, self.num_classes)
        rate = _check_lr(lr)
        if int(epochs) < 0 or int(batch_size) < 1:
            raise ValueError(f"need epochs >= 0 and batch_size >= 1, got {epochs} and {batch_size}")
        rng = np.random.default_rng(seed)
        size = int(batch_size)
        train = self._runners["train"]
        history: list[float] = []
        with self._lock:
            for _ in range(int(epochs)):
                order = rng.permutation(n)
                # One gather per epoch; each batch is then a contiguous row slice of it.
                shuffled_x, shuffled_y = data[order], labels[order]
                total = 0.0
                for start in range(0, n, size):
                    x_batch = shuffled_x[start : start + size]
                    loss = train(x=x_batch, y=shuffled_y[start : start + size], lr=rate)["loss"]
                    total += float(loss) * len(x_batch)
                history.append(total / n)
        return history

    def get_weights(self) -> dict[str, np.ndarray]:
        """Copies of the current weights, keyed by the public weight names."""
        out = self._run("get_weights")
        return {name: np.array(out[tensor], dtype=np.float32, copy=True) for name, tensor in self._WEIGHTS.items()}

    def set_weights(self, weights: Mapping[str, np.ndarray]) -> None:
        """Replace all weights. Missing keys raise ``KeyError`` (like
        ``fedsync.model.set_weights``); unknown keys, wrong shapes or non-finite values raise
        :class:`InputError`. Nothing is changed unless every tensor is valid.
        """
        names = list(self._WEIGHTS)
        missing = [name for name in names if name not in weights]
        if missing:
            raise KeyError(f"weights missing tensors: {missing} (expected {names})")
        unknown = sorted(set(weights) - set(names))
        if unknown:
            raise InputError(f"unknown weight names {unknown}; expected {names}")
        arrays = {}
        for name, tensor in self._WEIGHTS.items():
            shape = self.weight_shapes[name]
            value = weights[name]
            arr = np.asarray(value)
            if arr.dtype.kind not in "iuf":
                raise InputError(f"{name}: dtype must be numeric, got {arr.dtype}")
            if arr.shape != shape:
                raise InputError(f"{name}: expected shape {shape}, got {arr.shape}")
            arr = np.ascontiguousarray(arr, dtype=np.float32)
            if not np.isfinite(arr).all():
                raise InputError(f"{name}: contains NaN or Inf")
            arrays[tensor] = arr
        self._run("set_weights", **arrays)


class LiteRTHeadTrainer(_SignatureTrainer):
    """On-device fine-tuning of the softmax head via the trainable-head model's signatures.

    The head weights live in TFLite resource variables inside this interpreter: they start
    from the values exported by the coordinator and change with :meth:`train_step` /
    :meth:`fit` / :meth:`set_weights`. A new ``LiteRTHeadTrainer`` on the same file starts
    again from the exported values; persist :meth:`get_weights` to keep progress.

    Weight names are ``"head_kernel"`` (hidden_units, classes) and ``"head_bias"``
    (classes,), not the variable names used by ``fedsync.model.get_weights``
    (``"head/kernel"`` / ``"head/bias"``).
    """

    _KIND = "trainable head"
    _MODEL = "trainable-head model"
    _WEIGHTS: Mapping[str, str] = {name: name for name in HEAD_WEIGHT_NAMES}
    _CLASSES_FROM = "head_bias"
    _OTHER = (frozenset(_FULL_WEIGHT_TENSORS.values()), "LiteRTTrainer")


class LiteRTTrainer(_SignatureTrainer):
    """On-device training of the *whole* MLP (hidden and head layers) with LiteRT only.

    Runs the model produced by ``fedsync.tflite_export.to_trainable_tflite``: its ``train``
    signature does one SGD step on all four weight tensors with a hand-written backward
    pass in TFLite builtin ops (no Flex delegate, no TensorFlow on the client).

    Weights are keyed like ``fedsync.model.get_weights``: ``"hidden/kernel"`` (64, H),
    ``"hidden/bias"`` (H,), ``"head/kernel"`` (H, classes), ``"head/bias"`` (classes,), so
    deltas computed from :meth:`get_weights` aggregate with Keras clients' deltas. State
    lives in this interpreter: a new ``LiteRTTrainer`` on the same file starts again from
    the exported weights.
    """

    _KIND = "trainable model"
    _MODEL = "trainable (whole-model) model"
    _WEIGHTS = _FULL_WEIGHT_TENSORS
    _CLASSES_FROM = "head/bias"
    _OTHER = (frozenset(HEAD_WEIGHT_NAMES), "LiteRTHeadTrainer")
