"""Checks a received delta against the global model before it is buffered."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import numpy as np

from fedsync.codecs import CodecError, EncodedDelta, get_codec

from ._update import squared_norm

#: Floating dtypes accepted in a plain (non-encoded) delta; all are cast to
#: float32 when aggregated. Integers, bools, complex and longdouble are not.
ACCEPTED_DTYPES = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))


class DeltaRejected(Exception):
    """A delta the coordinator refuses; ``reason`` is a short machine-friendly code.

    Reasons: ``stale``, ``invalid_staleness``, ``unknown_tensor``,
    ``missing_tensor``, ``shape_mismatch``, ``dtype_mismatch``,
    ``unknown_codec``, ``corrupt_payload``, ``non_finite``, ``norm_too_large``.
    """

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def validate_delta(
    delta: Mapping[str, np.ndarray] | EncodedDelta,
    reference: Mapping[str, np.ndarray],
    max_norm: float | None = None,
) -> None:
    """Raise :class:`DeltaRejected` unless ``delta`` fits ``reference``.

    ``delta`` must have exactly the reference's tensor names and shapes, a
    dtype in :data:`ACCEPTED_DTYPES` (encoded deltas always decode to
    float32), only finite values once cast to float32, and, if ``max_norm``
    is given, a global L2 norm (all tensors as one vector) of at most
    ``max_norm``. Checks run cheapest first; an encoded payload is only
    decoded, one tensor at a time, after its specs and length check out.
    """
    if max_norm is not None and not max_norm > 0:
        raise ValueError(f"max_norm must be > 0, got {max_norm}")
    if isinstance(delta, EncodedDelta):
        _check_layout(delta, reference)
        tensors: Iterable[tuple[str, np.ndarray]] = delta.iter_decode()
    else:
        _check_names(delta.keys(), reference)
        _check_plain_tensors(delta, reference)
        tensors = delta.items()

    total = 0.0
    for name, tensor in tensors:
        if isinstance(tensor, np.ndarray) and tensor.dtype == np.float32:
            as_float32 = tensor  # what every codec decodes to
        else:
            # dtype was checked above, so this copies only float16/float64 input;
            # float64 values beyond the float32 range become inf and are rejected.
            with np.errstate(over="ignore"):
                as_float32 = np.asarray(tensor, dtype=np.float32)
        sq = squared_norm(as_float32)
        if not math.isfinite(sq):
            raise DeltaRejected("non_finite", f"tensor {name!r} has non-finite values")
        total += sq
    if max_norm is not None and math.sqrt(total) > max_norm:
        raise DeltaRejected("norm_too_large", f"global L2 norm {math.sqrt(total):.6g} exceeds {max_norm:g}")


def _check_names(names: Iterable[str], reference: Mapping[str, np.ndarray]) -> None:
    present = set(names)
    unknown = sorted(present - reference.keys())
    if unknown:
        raise DeltaRejected("unknown_tensor", f"not in the model: {unknown}")
    missing = [name for name in reference if name not in present]
    if missing:
        raise DeltaRejected("missing_tensor", f"missing from the delta: {missing}")


def _check_shape(name: str, shape: tuple[int, ...], reference: Mapping[str, np.ndarray]) -> None:
    expected = np.shape(reference[name])
    if shape != expected:
        raise DeltaRejected("shape_mismatch", f"tensor {name!r} is {shape}, model has {expected}")


def _check_plain_tensors(delta: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray]) -> None:
    for name, tensor in delta.items():
        _check_shape(name, np.shape(tensor), reference)
        dtype = np.asarray(tensor).dtype
        if dtype not in ACCEPTED_DTYPES:
            raise DeltaRejected("dtype_mismatch", f"tensor {name!r} has dtype {dtype}, expected float32")


def _check_layout(delta: EncodedDelta, reference: Mapping[str, np.ndarray]) -> None:
    try:
        get_codec(delta.codec_name)
    except CodecError as exc:
        raise DeltaRejected("unknown_codec", str(exc)) from None
    _check_names([spec.name for spec in delta.specs], reference)
    for spec in delta.specs:
        _check_shape(spec.name, spec.shape, reference)
        if spec.dtype != "float32":
            raise DeltaRejected("dtype_mismatch", f"tensor {spec.name!r} has dtype {spec.dtype}, expected float32")
    try:
        delta.check()
    except CodecError as exc:
        raise DeltaRejected("corrupt_payload", str(exc)) from None
