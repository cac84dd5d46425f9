"""validate_delta: one test per rejection reason, for plain and encoded deltas."""

from __future__ import annotations

import numpy as np
import pytest

from fedsync.aggregation import DeltaRejected, validate_delta
from fedsync.codecs import EncodedDelta, TensorSpec

REFERENCE = {
    "hidden/kernel": np.zeros((6, 4), np.float32),
    "hidden/bias": np.zeros(4, np.float32),
    "head/bias": np.zeros(3, np.float32),
}


def good_delta(value: float = 0.1) -> dict[str, np.ndarray]:
    return {name: np.full(ref.shape, value, np.float32) for name, ref in REFERENCE.items()}


def rejection(delta, max_norm: float | None = None) -> str:
    with pytest.raises(DeltaRejected) as info:
        validate_delta(delta, REFERENCE, max_norm=max_norm)
    assert str(info.value).startswith(info.value.reason)
    return info.value.reason


def test_valid_deltas_pass() -> None:
    validate_delta(good_delta(), REFERENCE, max_norm=10.0)
    validate_delta({k: v.astype(np.float64) for k, v in good_delta().items()}, REFERENCE)
    validate_delta({k: v.astype(np.float16) for k, v in good_delta().items()}, REFERENCE)
    for codec in ("float32", "int8", "topk:0.5"):
        validate_delta(EncodedDelta.encode(codec, good_delta()), REFERENCE, max_norm=10.0)


def test_unknown_and_missing_tensors() -> None:
    assert rejection({**good_delta(), "extra": np.zeros(1, np.float32)}) == "unknown_tensor"
    delta = good_delta()
    del delta["head/bias"]
    assert rejection(delta) == "missing_tensor"


def test_shape_mismatch() -> None:
    assert rejection({**good_delta(), "hidden/bias": np.zeros(5, np.float32)}) == "shape_mismatch"
    assert rejection({**good_delta(), "hidden/kernel": np.zeros((4, 6), np.float32)}) == "shape_mismatch"


@pytest.mark.parametrize("dtype", [np.int32, np.complex64, np.bool_, np.uint8])
def test_dtype_mismatch(dtype: type) -> None:
    assert rejection({**good_delta(), "head/bias": np.zeros(3, dtype)}) == "dtype_mismatch"


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite(bad: float) -> None:
    delta = good_delta()
    delta["hidden/kernel"][2, 3] = bad
    assert rejection(delta) == "non_finite"
    assert rejection(EncodedDelta.encode("float32", delta)) == "non_finite"


def test_float64_beyond_float32_range_is_non_finite() -> None:
    delta = {k: v.astype(np.float64) for k, v in good_delta().items()}
    delta["head/bias"][0] = 1e39
    assert rejection(delta) == "non_finite"


def test_huge_finite_float32_is_not_mistaken_for_non_finite() -> None:
    delta = good_delta()
    delta["hidden/kernel"][:] = 1e30  # squared norm overflows float32
    validate_delta(delta, REFERENCE)
    assert rejection(delta, max_norm=1e30) == "norm_too_large"


def test_norm_too_large() -> None:
    delta = good_delta(1.0)  # 24 + 4 + 3 ones: norm sqrt(31)
    validate_delta(delta, REFERENCE, max_norm=31**0.5 + 1e-4)
    assert rejection(delta, max_norm=31**0.5 - 1e-3) == "norm_too_large"
    assert rejection(EncodedDelta.encode("int8", delta), max_norm=5.0) == "norm_too_large"


def test_encoded_layout_errors() -> None:
    encoded = EncodedDelta.encode("int8", good_delta())
    assert rejection(EncodedDelta("zstd", encoded.specs, encoded.payload)) == "unknown_codec"
    assert rejection(EncodedDelta("int8", encoded.specs, encoded.payload[:-1])) == "corrupt_payload"
    bad_scale = np.array([-1.0], "<f4").tobytes() + encoded.payload[4:]
    assert rejection(EncodedDelta("int8", encoded.specs, bad_scale)) == "corrupt_payload"
    specs = list(encoded.specs)
    specs[1] = TensorSpec("hidden/bias", (2, 2))
    assert rejection(EncodedDelta("int8", specs, encoded.payload)) == "shape_mismatch"
    specs[1] = TensorSpec("hidden/bias", (4,), dtype="float16")
    assert rejection(EncodedDelta("int8", specs, encoded.payload)) == "dtype_mismatch"
    assert rejection(EncodedDelta("int8", encoded.specs[:2], encoded.payload)) == "missing_tensor"


def test_reason_attribute_and_message() -> None:
    error = DeltaRejected("stale", "staleness 9 > 4")
    assert error.reason == "stale"
    assert str(error) == "stale: staleness 9 > 4"
