"""Export .tflite artifacts for new weights without running the TFLite converter each time.

Coordinator side (imports TensorFlow). A model's architecture is fixed between versions; only its
weights change. So each export function is run once per architecture on random weights, and
later exports write the new weights into that template (:mod:`fedsync.tflite_patch`): under a
millisecond for a float model, some 30 ms for int8, instead of a SavedModel export and an MLIR
conversion (0.5-1 s each).

Two kinds of template, tried in this order:

* the converter's output itself, when the weights sit in it as raw float32 (float models,
  trainable models: their variables' initial values);
* the converter's graph before its last stage (quantization, buffer deduplication, conversion
  metadata), when the output's weights are transformed (int8 post-training quantization: scales
  and zero points depend on the weights). Rendering patches that graph and re-runs the same
  converter's last stage on it, so calibration and quantization are still TensorFlow's own.

A template is used only if, for a second set of random weights, rendering reproduces the
export function's own output byte for byte (and rendering the first set again still does, so the
last stage keeps no state between runs). Otherwise, or if rendering ever fails, the export
function runs as before.

Weights the converter treats specially are the one case where the bytes differ: it drops an
all-zero bias (a freshly initialised model's), while the template keeps that bias as a buffer of
zeros. The model computes the same function (tests/test_tflite_templates.py checks both cases).

Templates of final artifacts (float and trainable models) persist on disk between processes
(:mod:`fedsync._template_cache`), so a coordinator starting again on a known architecture runs no
converter: in ``$FEDSYNC_CACHE_DIR/tflite-templates/``, else ``$XDG_CACHE_HOME/fedsync/...`` or
``~/.cache/fedsync/...``; ``FEDSYNC_CACHE_DIR=`` (empty) turns that off. A template from disk is
checked against the Keras model (LiteRT outputs against what the model computes, in numpy for a
Dense stack; weight slots) instead of the converter.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import keras
import numpy as np
from tensorflow.lite.python import lite

from fedsync._template_cache import (
    TemplateCache,
    default_cache_dir,
    template_key,
    works_like,
)
from fedsync.model import Weights, get_weights, set_weights
from fedsync.tflite_patch import WeightSlot, WeightsNotFoundError, locate_weights, patch_weights

log = logging.getLogger(__name__)

Export = Callable[[keras.Model], bytes]


@dataclass(frozen=True)
class _LastStage:
    """One converter's last stage, as it ran: replayable on another graph of the same shape."""

    converter: Any  # a TFLiteConverterBase
    graph: bytes  # its input: the converted graph before quantization and deduplication
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    lock: threading.Lock = field(default_factory=threading.Lock, compare=False)  # one converter, one run at a time

    def run(self, graph: bytes) -> bytes:
        with self.lock:
            optimized = _ORIGINAL_OPTIMIZE(self.converter, graph, *self.args, **self.kwargs)
            # The converter's own wrapper around convert(): adds the conversion metadata (whose
            # model hash covers the structure only, not the weights).
            return bytes(self.converter._convert_and_export_metrics(lambda _converter: optimized))


_ORIGINAL_OPTIMIZE = lite.TFLiteConverterBase._optimize_tflite_model
_capture_lock = threading.Lock()


@contextmanager
def _last_stage_recorded() -> Iterator[list[_LastStage]]:
    """Record the last stage of every conversion this thread runs inside the block."""
    recorded: list[_LastStage] = []
    thread = threading.get_ident()

    def recording(self: Any, model: bytes, *args: Any, **kwargs: Any) -> Any:
        if threading.get_ident() == thread:
            recorded.append(_LastStage(self, bytes(model), args, kwargs))
        return _ORIGINAL_OPTIMIZE(self, model, *args, **kwargs)

    with _capture_lock:
        lite.TFLiteConverterBase._optimize_tflite_model = recording
        try:
            yield recorded
        finally:
            lite.TFLiteConverterBase._optimize_tflite_model = _ORIGINAL_OPTIMIZE


@dataclass(frozen=True)
class Template:
    base: bytes
    slots: tuple[WeightSlot, ...]
    last_stage: _LastStage | None = None  # None: `base` is the final artifact

    def render(self, weights: Weights) -> bytes:
        patched = patch_weights(self.base, self.slots, weights)
        return patched if self.last_stage is None else self.last_stage.run(patched)


def _random_weights(like: Weights, seed: int) -> Weights:
    rng = np.random.default_rng(seed)
    return {name: rng.standard_normal(array.shape).astype(np.float32) for name, array in like.items()}


def _candidates(output: bytes, stages: list[_LastStage], weights: Weights) -> list[Template]:
    bases: list[tuple[bytes, _LastStage | None]] = [(output, None)]
    if len(stages) == 1:  # an export that ran several conversions cannot be replayed from one
        bases.append((stages[0].graph, stages[0]))
    candidates = []
    for base, stage in bases:
        try:
            candidates.append(Template(base, locate_weights(base, weights), stage))
        except WeightsNotFoundError:
            continue
        except Exception:  # not a flatbuffer this schema reads
            log.debug("cannot read the converted model's buffers", exc_info=True)
    return candidates


def build_template(model: keras.Model, export: Export) -> Template | None:
    """A verified template of `export` for `model`'s architecture, or None. The model's weights
    are restored afterwards."""
    saved = get_weights(model)
    first, second = _random_weights(saved, 1), _random_weights(saved, 2)
    try:
        set_weights(model, first)
        with _last_stage_recorded() as stages:
            first_output = export(model)
        set_weights(model, second)
        second_output = export(model)
        for template in _candidates(first_output, stages, first):
            try:
                if template.render(second) == second_output and template.render(first) == first_output:
                    return template
            except Exception:  # a converter internal that changed: this kind of template is out
                log.debug("template rendering failed", exc_info=True)
        return None
    finally:
        set_weights(model, saved)


def architecture_key(model: keras.Model) -> str:
    config = json.dumps(model.get_config(), sort_keys=True, default=str)
    shapes = json.dumps({name: list(array.shape) for name, array in get_weights(model).items()})
    return hashlib.sha256((config + shapes).encode()).hexdigest()


class TemplateExporter:
    """Templates per (export name, architecture), built on first use; thread-safe.

    `name` must identify everything the export depends on besides the weights (for int8, the
    calibration data). `cache`: where built templates persist between processes
    (:mod:`fedsync._template_cache`); by default the folder the environment names at each build,
    None for none. Templates that replay a converter's last stage (int8) live in memory only: that
    stage is a live converter object.
    """

    def __init__(self, cache: TemplateCache | Literal["environment"] | None = "environment") -> None:
        self._templates: dict[tuple[str, str], Template | None] = {}
        self._lock = threading.Lock()
        self._cache = cache

    def export(self, name: str, model: keras.Model, export: Export, architecture: str | None = None) -> bytes:
        """`export(model)`, from a template when one is verified. `architecture`: the model's
        architecture_key, when the caller knows it (it costs a get_config)."""
        key = (name, architecture or architecture_key(model))
        with self._lock:
            if key not in self._templates:
                self._templates[key] = self._template(name, model, export)
                if self._templates[key] is None:
                    log.warning("%s: no verified template, every version runs the TFLite converter", name)
            template = self._templates[key]
        if template is None:
            return export(model)
        try:
            return template.render(get_weights(model))
        except Exception:
            log.warning("%s: template rendering failed, running the TFLite converter", name, exc_info=True)
            with self._lock:
                self._templates[key] = None
            return export(model)

    def render(self, name: str, architecture: str, weights: Weights) -> bytes | None:
        """What `export` returns for a model of `architecture` holding `weights` (every tensor of
        the model, with its shape), when a verified template is ready: without touching the model.
        None when there is none yet or it no longer renders: then call `export`."""
        key = (name, architecture)
        with self._lock:
            template = self._templates.get(key)
        if template is None:
            return None
        try:
            return template.render(weights)
        except Exception:
            log.warning("%s: template rendering failed, running the TFLite converter", name, exc_info=True)
            with self._lock:
                self._templates[key] = None
            return None

    def _template(self, name: str, model: keras.Model, export: Export) -> Template | None:
        cache = self._cache
        if cache == "environment":
            folder = default_cache_dir()
            cache = TemplateCache(folder) if folder is not None else None
        disk_key = template_key(name, model, export) if cache is not None else ""
        if cache is not None and (stored := cache.load(disk_key)) is not None:
            if works_like(*stored, model):
                return Template(*stored)
            log.warning("%s: the cached template does not fit the model, building it again", name)
        try:
            template = build_template(model, export)
        except Exception:  # the converter failing on random weights: it may still take real ones
            log.warning("%s: building a template failed", name, exc_info=True)
            return None
        if cache is not None and template is not None and template.last_stage is None:
            cache.store(disk_key, template.base, template.slots)
        return template


_shared = TemplateExporter()


def shared_exporter() -> TemplateExporter:
    """One per process: coordinators of the same architecture (a --compare run, a test suite)
    build each template once."""
    return _shared
