"""Converted TFLite templates kept on disk, so a coordinator that starts again with an architecture
it has seen before runs no TFLite conversion at all (see :mod:`fedsync.tflite_templates`).

Location: ``$FEDSYNC_CACHE_DIR/tflite-templates/``, else ``$XDG_CACHE_HOME/fedsync/tflite-templates/``
or ``~/.cache/fedsync/tflite-templates/``. ``FEDSYNC_CACHE_DIR=`` (set, empty) turns the cache off.

A file is named by a sha256 over everything its bytes depend on besides the weight values (written
into the template at every export anyway): the template format, the TensorFlow and Keras versions,
the export's name (which carries its options, e.g. the int8 calibration data) and function, the
source of the module that defines it and of fedsync.tflite_export (converter options), and the
Keras model's config and weight shapes and dtypes. No eviction: an entry is some tens of KB.

Files are written to a temporary name and renamed into place, so readers see all of one or none.
A template from disk cannot be checked the way a fresh one is (against the converter's own output,
the converter being what the cache avoids). It is used only if its checksum holds, its weight slots
are exactly the flatbuffer's buffers and cover the model's weights with their sizes, and, written
with random weights, it loads in LiteRT, computes what Keras does on a few inputs and (trainable
models) returns those weights from its ``get_weights`` signature. Anything else, or an unreadable
or unwritable folder, means building the template as if there were no cache.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import keras
import numpy as np

from fedsync.model import Weights, dense_steps, forward, get_weights, set_weights, weight_name, weight_shapes
from fedsync.tflite_patch import WeightSlot, _buffer_spans, patch_weights

log = logging.getLogger(__name__)

ENV = "FEDSYNC_CACHE_DIR"
FORMAT = 1  # bump when a template's meaning or this file format changes
_MAGIC = b"fedsync-tflite-template\n"
_SUFFIX = ".template"
_warned: set[str] = set()  # folders: one warning each per process, the rest at debug level


def default_cache_dir() -> Path | None:
    """Where templates are cached, from the environment; None when FEDSYNC_CACHE_DIR is empty."""
    explicit = os.environ.get(ENV)
    if explicit is not None:
        return Path(explicit).expanduser() / "tflite-templates" if explicit else None
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    try:
        base = Path(xdg) if os.path.isabs(xdg) else Path.home() / ".cache"  # the XDG spec ignores relative paths
    except RuntimeError:  # no home directory to be found
        return None
    return base / "fedsync" / "tflite-templates"


@functools.cache
def _source_digest(path: str) -> str:
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError:
        return ""


def template_key(name: str, model: keras.Model, export: Callable[..., Any]) -> str:
    import tensorflow as tf

    from fedsync import tflite_export

    module = sys.modules.get(getattr(export, "__module__", None) or "")
    sources = {getattr(module, "__file__", None), tflite_export.__file__} - {None}
    payload = {
        "format": FORMAT,
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "export": name,
        "function": f"{getattr(export, '__module__', '')}.{getattr(export, '__qualname__', repr(type(export)))}",
        "sources": sorted(_source_digest(str(path)) for path in sources),
        "config": model.get_config(),
        "weights": {weight_name(model, w): [list(w.shape), str(w.dtype)] for w in model.weights},
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def _warn_once(folder: Path, what: str, exc: BaseException) -> None:
    level = logging.DEBUG if str(folder) in _warned else logging.WARNING
    _warned.add(str(folder))
    log.log(level, "template cache %s: %s (%s); building templates instead", folder, what, exc)


def _digest(slots: list[list[Any]], base: bytes) -> str:
    return hashlib.sha256(json.dumps(slots).encode() + b"\n" + base).hexdigest()


class TemplateCache:
    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)

    def path(self, key: str) -> Path:
        return self.folder / f"{key}{_SUFFIX}"

    def load(self, key: str) -> tuple[bytes, tuple[WeightSlot, ...]] | None:
        """The template stored under `key` if its file is intact, else None."""
        try:
            content = self.path(key).read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            _warn_once(self.folder, "unreadable", exc)
            return None
        try:
            if not content.startswith(_MAGIC):
                raise ValueError("not a template file")
            header_end = content.index(b"\n", len(_MAGIC))
            header = json.loads(content[len(_MAGIC) : header_end])
            base = content[header_end + 1 :]
            if header["format"] != FORMAT or header["key"] != key:
                raise ValueError("another format or key")
            if header["sha256"] != _digest(header["slots"], base):
                raise ValueError("checksum mismatch")
            slots = tuple(WeightSlot(str(n), int(s), int(z), bool(t)) for n, s, z, t in header["slots"])
        except (ValueError, KeyError, TypeError) as exc:
            _warn_once(self.folder, f"corrupt entry {key[:12]}", exc)
            return None
        return base, slots

    def store(self, key: str, base: bytes, slots: tuple[WeightSlot, ...]) -> None:
        rows = [[s.name, s.start, s.size, s.transposed] for s in slots]
        header = {"format": FORMAT, "key": key, "sha256": _digest(rows, base), "slots": rows}
        content = _MAGIC + json.dumps(header).encode() + b"\n" + base
        temporary = None
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            fd, temporary = tempfile.mkstemp(dir=self.folder, prefix=f".{key[:16]}-", suffix=".tmp")
            with os.fdopen(fd, "wb") as file:
                file.write(content)
            os.replace(temporary, self.path(key))
        except OSError as exc:
            _warn_once(self.folder, "unwritable", exc)
            if temporary is not None:
                Path(temporary).unlink(missing_ok=True)


def _slots_fit(base: bytes, slots: tuple[WeightSlot, ...], weights: Weights) -> bool:
    spans = set(_buffer_spans(base))
    if not slots or {s.name for s in slots} != set(weights) or len({s.start for s in slots}) != len(slots):
        return False
    for slot in slots:
        array = weights[slot.name]
        if (slot.start, slot.size) not in spans or slot.size != array.size * 4 or (slot.transposed and array.ndim != 2):
            return False
    return True


def _litert_outputs(content: bytes, x: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
    """The model's output for `x`, and what its get_weights signature returns (trainable models)."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_content=content)
    signatures = interpreter.get_signature_list()
    if "infer" in signatures:
        runner = interpreter.get_signature_runner("infer")
        (input_name,) = runner.get_input_details()
        (output,) = runner(**{input_name: x}).values()
    else:
        (inp,), (out,) = interpreter.get_input_details(), interpreter.get_output_details()
        interpreter.resize_tensor_input(inp["index"], x.shape)
        interpreter.allocate_tensors()
        interpreter.set_tensor(inp["index"], x)
        interpreter.invoke()
        output = interpreter.get_tensor(out["index"])
    stored = list(interpreter.get_signature_runner("get_weights")().values()) if "get_weights" in signatures else []
    return np.asarray(output), stored


def works_like(base: bytes, slots: tuple[WeightSlot, ...], model: keras.Model) -> bool:
    """Whether a template read from disk fits `model` and computes what it computes (see the module
    docstring). What a Dense stack computes is worked out in numpy (fedsync.model.forward): no
    Keras call, whose first one in a process costs some 40 ms. Other models are run in Keras, and
    their weights restored afterwards."""
    steps = dense_steps(model)
    rng = np.random.default_rng(3)
    weights = {name: rng.standard_normal(shape).astype(np.float32) for name, shape in weight_shapes(model).items()}
    saved = get_weights(model) if steps is None else None
    try:
        if not _slots_fit(base, slots, weights):
            return False
        x = rng.uniform(0.0, 1.0, (8, model.input_shape[-1])).astype(np.float32)
        if steps is not None:
            expected = forward(steps, weights, x)
        else:
            set_weights(model, weights)
            expected = np.asarray(model(x, training=False))
        output, stored = _litert_outputs(patch_weights(base, slots, weights), x)
        if output.shape != expected.shape or not np.allclose(output, expected, rtol=1e-4, atol=1e-5):
            return False
        return all(any(np.array_equal(value, w) for w in weights.values()) for value in stored)
    except Exception:  # a template LiteRT cannot load or run is simply not used
        log.debug("cached template failed its check", exc_info=True)
        return False
    finally:
        if saved is not None:
            set_weights(model, saved)
