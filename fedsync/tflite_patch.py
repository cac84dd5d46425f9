"""Write new weights into an already converted .tflite flatbuffer, without TensorFlow.

Between two model versions only the weights change, and a converted model stores each weight as
the raw bytes of one constant buffer: as is, or transposed for a FULLY_CONNECTED kernel (the
converter folds Keras's ``x @ W`` into ``FC(x, W.T)``). Rewriting those bytes in place yields the
flatbuffer the converter would have produced for the new weights, every other byte unchanged.
Whether that holds for a given model is for the caller to check (see
:mod:`fedsync.tflite_templates`): this module only finds the buffers and overwrites them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from ai_edge_litert import schema_py_generated as schema


class WeightsNotFoundError(ValueError):
    """A weight's values are in none of the flatbuffer's buffers (folded, quantized or deduplicated)."""


@dataclass(frozen=True, slots=True)
class WeightSlot:
    name: str
    start: int  # byte offset of the buffer's data in the flatbuffer
    size: int
    transposed: bool


def _buffer_spans(flatbuffer: bytes) -> list[tuple[int, int]]:
    """(start, size) of every non-empty buffer: inline data, or data appended after the flatbuffer
    (a buffer's offset/size fields, used by models over 2 GB)."""
    model = schema.Model.GetRootAs(flatbuffer, 0)
    spans = []
    for i in range(model.BuffersLength()):
        buffer = model.Buffers(i)
        if buffer.Offset() > 1:
            spans.append((int(buffer.Offset()), int(buffer.Size())))
            continue
        field = buffer._tab.Offset(4)  # the generated code reads `data` from vtable slot 4 the same way
        if field and buffer.DataLength():
            spans.append((buffer._tab.Vector(field), buffer.DataLength()))
    return spans


def _layouts(array: np.ndarray) -> list[tuple[bool, bytes]]:
    values = np.asarray(array, dtype="<f4")
    layouts = [(False, values.tobytes())]
    if values.ndim == 2:
        layouts.append((True, np.ascontiguousarray(values.T).tobytes()))
    return layouts


def locate_weights(flatbuffer: bytes, weights: Mapping[str, np.ndarray]) -> tuple[WeightSlot, ...]:
    """Every buffer holding one of `weights` byte for byte, as is or transposed.

    Use weights with distinct random values, so that no buffer matches by accident. Raises
    WeightsNotFoundError when some weight is in no buffer.
    """
    data = memoryview(flatbuffer)
    slots = []
    for name, array in weights.items():
        layouts = _layouts(array)
        found = [
            WeightSlot(name, start, size, transposed)
            for start, size in _buffer_spans(flatbuffer)
            for transposed, raw in layouts
            if size == len(raw) and data[start : start + size] == raw
        ]
        if not found:
            raise WeightsNotFoundError(f"weight {name!r} is stored in none of the model's buffers")
        slots.extend(found)
    return tuple(slots)


def patch_weights(flatbuffer: bytes, slots: tuple[WeightSlot, ...], weights: Mapping[str, np.ndarray]) -> bytes:
    """A copy of `flatbuffer` with each slot's buffer overwritten by its weight's new values."""
    out = bytearray(flatbuffer)
    for slot in slots:
        values = np.asarray(weights[slot.name], dtype="<f4")
        raw = np.ascontiguousarray(values.T if slot.transposed else values).tobytes()
        if len(raw) != slot.size:
            raise ValueError(f"weight {slot.name!r} has {len(raw)} bytes, its buffer {slot.size}")
        out[slot.start : slot.start + slot.size] = raw
    return bytes(out)
