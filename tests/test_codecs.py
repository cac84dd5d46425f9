"""Codec round trips, payload layout, corrupt payloads and error feedback."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedsync.codecs import CodecError, EncodedDelta, ErrorFeedback, TensorSpec, add_scaled, get_codec

ALL_CODECS = ["float32", "float16", "int8", "int8-channel", "topk:0.1"]


def tensors(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "hidden/kernel": rng.standard_normal((64, 32)).astype(np.float32),
        "hidden/bias": rng.standard_normal(32).astype(np.float32) * 0.01,
        "head/kernel": rng.standard_normal((32, 10)).astype(np.float32) * 5,
        "scalar": np.float32(-2.5),
        "empty": np.zeros((0, 3), np.float32),
    }


def roundtrip(codec_name: str, data: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    codec = get_codec(codec_name)
    specs, payload = codec.encode(data)
    assert isinstance(payload, bytes)
    assert [s.name for s in specs] == list(data)
    assert [s.shape for s in specs] == [np.shape(t) for t in data.values()]
    decoded = codec.decode(specs, payload)
    assert all(t.dtype == np.float32 and t.flags.writeable for t in decoded.values())
    return decoded


def test_float32_roundtrip_is_exact_including_specials() -> None:
    data = tensors()
    data["hidden/bias"][:3] = [np.nan, np.inf, -0.0]
    decoded = roundtrip("float32", data)
    for name, tensor in data.items():
        np.testing.assert_array_equal(decoded[name], tensor)


def test_float16_error_is_bounded() -> None:
    data = tensors()
    decoded = roundtrip("float16", data)
    for name, tensor in data.items():
        np.testing.assert_allclose(decoded[name], tensor, rtol=2**-11, atol=6e-8, err_msg=name)


@pytest.mark.parametrize("codec", ["int8", "int8-channel"])
def test_int8_error_is_within_half_a_step(codec: str) -> None:
    data = tensors()
    decoded = roundtrip(codec, data)
    for name, tensor in data.items():
        tensor = np.asarray(tensor)
        if tensor.size == 0:
            continue
        if codec == "int8":
            step = np.abs(tensor).max() / 127
        else:
            step = np.abs(tensor.reshape(-1, tensor.shape[-1] if tensor.ndim else 1)).max(axis=0) / 127
        error = np.abs(decoded[name] - tensor).reshape(-1, np.size(step))
        assert (error <= step / 2 * (1 + 1e-5) + 1e-12).all(), name
    assert np.abs(decoded["hidden/kernel"] - data["hidden/kernel"]).max() > 0


def test_int8_channel_beats_per_tensor_on_mixed_scales() -> None:
    rng = np.random.default_rng(3)
    kernel = rng.standard_normal((100, 4)).astype(np.float32) * np.array([100, 1, 0.01, 0.0001], np.float32)
    per_tensor = roundtrip("int8", {"k": kernel})["k"]
    per_channel = roundtrip("int8-channel", {"k": kernel})["k"]
    assert np.abs(per_channel - kernel)[:, 3].max() < 1e-6
    assert np.abs(per_tensor - kernel)[:, 3].max() == pytest.approx(np.abs(kernel[:, 3]).max())


def test_topk_keeps_exactly_the_k_largest_magnitudes() -> None:
    rng = np.random.default_rng(4)
    values = rng.permutation(np.arange(1, 1001, dtype=np.float32)) * rng.choice([-1, 1], 1000)
    data = {"v": values.reshape(40, 25)}
    decoded = roundtrip("topk:0.01", data)["v"].reshape(-1)
    kept = np.flatnonzero(decoded)
    assert set(kept) == set(np.flatnonzero(np.abs(values) > 990))
    np.testing.assert_array_equal(decoded[kept], values[kept])
    assert get_codec("topk:0.01").keep_count(1000) == 10
    assert get_codec("topk:0.001").keep_count(10) == 1


def test_topk_of_all_is_lossless() -> None:
    data = tensors()
    decoded = roundtrip("topk:1", data)
    for name, tensor in data.items():
        np.testing.assert_array_equal(decoded[name], tensor)


def test_payload_layout_is_little_endian_and_headerless() -> None:
    data = {"a": np.array([1.0, -2.0], np.float32), "b": np.array([[0.5]], np.float32)}
    _, payload = get_codec("float32").encode(data)
    assert payload == np.array([1.0, -2.0, 0.5], "<f4").tobytes()
    _, payload = get_codec("int8").encode({"a": np.array([1.27, -0.635], np.float32)})
    assert payload[:4] == np.array([0.01], "<f4").tobytes()
    assert payload[4:] == np.array([127, -64], "i1").tobytes()
    _, payload = get_codec("topk:0.5").encode({"a": np.array([0.1, -3.0, 2.0, 0.0], np.float32)})
    assert payload == (np.array([2, 1, 2], "<u4").tobytes() + np.array([-3.0, 2.0], "<f4").tobytes())


def test_int8_is_at_least_3_9x_smaller_for_1m_params() -> None:
    rng = np.random.default_rng(5)
    delta = {f"layer{i}/kernel": rng.standard_normal((512, 512)).astype(np.float32) * 0.01 for i in range(4)}
    _, f32 = get_codec("float32").encode(delta)
    _, i8 = get_codec("int8").encode(delta)
    _, i8c = get_codec("int8-channel").encode(delta)
    assert len(f32) == 4 * 512 * 512 * 4
    assert len(f32) / len(i8) >= 3.9
    assert len(f32) / len(i8c) >= 3.9


@pytest.mark.parametrize("codec_name", ALL_CODECS)
@pytest.mark.parametrize("weight", [1.0, 0.37, -2.0])
def test_accumulate_into_adds_weighted_decoded(codec_name: str, weight: float) -> None:
    codec = get_codec(codec_name)
    data = tensors()
    specs, payload = codec.encode(data)
    decoded = codec.decode(specs, payload)
    start = tensors(seed=9)
    acc = {name: np.array(t, dtype=np.float32) for name, t in start.items()}
    codec.accumulate_into(specs, memoryview(payload), weight, acc)
    for name in data:
        np.testing.assert_allclose(acc[name], start[name] + weight * decoded[name], rtol=1e-6, atol=1e-6, err_msg=name)


def test_add_scaled_matches_axpy_across_chunks_and_dtypes() -> None:
    rng = np.random.default_rng(6)
    size = 600_001  # spans several chunks, ragged end
    acc = rng.standard_normal(size).astype(np.float32)
    for x in (rng.standard_normal(size).astype(np.float32), rng.integers(-127, 128, size).astype(np.int8)):
        expected = acc.astype(np.float64) + 0.25 * x.astype(np.float64)
        add_scaled(acc, x, 0.25)
        np.testing.assert_allclose(acc, expected, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError):
        add_scaled(acc[::2], acc[::2].copy(), 1.0)


@pytest.mark.parametrize("name", ["gzip", "topk", "topk:0", "topk:1.5", "topk:abc", "topk:nan", "INT8"])
def test_unknown_codec_names(name: str) -> None:
    with pytest.raises(CodecError):
        get_codec(name)


def corrupt_cases() -> list[tuple[str, list[TensorSpec], bytes, str]]:
    specs = [TensorSpec("a", (2, 3)), TensorSpec("b", (4,))]
    f32 = np.zeros(10, "<f4").tobytes()
    int8 = np.array([0.5], "<f4").tobytes() + bytes(6) + np.array([0.5], "<f4").tobytes() + bytes(4)
    chan = np.ones(3, "<f4").tobytes() + bytes(6) + np.ones(4, "<f4").tobytes() + bytes(4)
    nan_scale = np.array([np.nan], "<f4").tobytes()
    topk_a = np.array([1, 5], "<u4").tobytes() + np.ones(1, "<f4").tobytes()
    topk_b = np.array([0], "<u4").tobytes()
    return [
        ("float32", specs, f32[:-1], "too short"),
        ("float32", specs, f32 + b"\0", "specs describe"),
        ("float32", [TensorSpec("a", (2, 3), dtype="int32")], f32[:24], "dtype"),
        ("float32", [specs[0], TensorSpec("a", (4,))], f32, "duplicate"),
        ("float16", specs, bytes(19), "too short"),
        ("int8", specs, int8[:-2], "too short"),
        ("int8", specs, nan_scale + int8[4:], "bad int8 scale"),
        ("int8", specs, int8[:10] + np.array([-1.0], "<f4").tobytes() + int8[14:], "bad int8 scale"),
        ("int8-channel", specs, np.array([1, np.inf, 1], "<f4").tobytes() + chan[12:], "bad int8 scale"),
        ("int8-channel", specs, chan + b"\0", "specs describe"),
        ("topk:0.5", specs, topk_a + topk_b, ""),
        ("topk:0.5", specs, topk_a + np.array([7], "<u4").tobytes(), "exceeds"),
        ("topk:0.5", specs, np.array([1, 6], "<u4").tobytes() + bytes(4) + topk_b, "out of range"),
        (
            "topk:0.5",
            specs,
            np.array([2, 3, 1], "<u4").tobytes() + bytes(8) + topk_b,
            "strictly increasing",
        ),
        ("topk:0.5", specs, topk_a, "truncated"),
    ]


@pytest.mark.parametrize(("codec_name", "specs", "payload", "message"), corrupt_cases())
def test_corrupt_payloads_raise_codec_error(
    codec_name: str, specs: list[TensorSpec], payload: bytes, message: str
) -> None:
    codec = get_codec(codec_name)
    if not message:  # the well-formed control case
        assert set(codec.decode(specs, payload)) == {"a", "b"}
        return
    acc = {"a": np.zeros((2, 3), np.float32), "b": np.zeros(4, np.float32)}
    with pytest.raises(CodecError, match=message):
        codec.decode(specs, payload)
    with pytest.raises(CodecError, match=message):
        codec.accumulate_into(specs, payload, 1.0, acc)
    assert not any(t.any() for t in acc.values()), "a bad payload must not touch the accumulator"


@pytest.mark.parametrize("codec_name", ["float16", "int8", "int8-channel"])
def test_lossy_codecs_refuse_unencodable_input(codec_name: str) -> None:
    with pytest.raises(CodecError, match="'x'"):
        get_codec(codec_name).encode({"x": np.array([1.0, np.nan], np.float32)})
    with pytest.raises(CodecError):
        get_codec("float32").encode({"x": np.array(["a"])})
    with pytest.raises(CodecError, match="float16 range"):
        get_codec("float16").encode({"x": np.array([1e6], np.float32)})


def test_encoded_delta_helpers() -> None:
    data = tensors()
    encoded = EncodedDelta.encode("int8", data)
    assert encoded.codec is get_codec("int8")
    assert encoded.shapes() == {name: np.shape(t) for name, t in data.items()}
    assert encoded.nbytes == len(encoded.payload)
    encoded.check()
    assert set(encoded.decode()) == set(data)
    assert "payload" not in repr(encoded)


@pytest.mark.parametrize("codec_name", ["int8", "topk:0.05"])
def test_error_feedback_bounds_accumulated_error(codec_name: str) -> None:
    rng = np.random.default_rng(7)
    delta = {"w": rng.standard_normal((50, 20)).astype(np.float32), "b": rng.standard_normal(20).astype(np.float32)}
    codec = get_codec(codec_name)
    feedback = ErrorFeedback(codec)
    rounds = 100
    sent_plain = {name: np.zeros_like(t, dtype=np.float64) for name, t in delta.items()}
    sent_feedback = {name: np.zeros_like(t, dtype=np.float64) for name, t in delta.items()}
    for _ in range(rounds):
        specs, payload = codec.encode(delta)
        for name, t in codec.decode(specs, payload).items():
            sent_plain[name] += t
        specs, payload = feedback.encode(delta)
        for name, t in codec.decode(specs, payload).items():
            sent_feedback[name] += t

    def error(sent: dict[str, np.ndarray]) -> float:
        return math.sqrt(sum(float(np.sum((sent[n] - rounds * delta[n]) ** 2)) for n in delta))

    assert error(sent_feedback) < error(sent_plain) / 5
    # What was not sent yet is exactly the residual.
    residual = feedback.state()
    for name in delta:
        np.testing.assert_allclose(
            sent_feedback[name] + residual[name], rounds * delta[name].astype(np.float64), rtol=1e-4, atol=1e-3
        )


def test_error_feedback_state_roundtrip() -> None:
    delta = tensors()
    first = ErrorFeedback("int8")
    first.encode(delta)
    second = ErrorFeedback("int8")
    second.load_state(first.state())
    assert first.encode(delta)[1] == second.encode(delta)[1]
    assert any(np.abs(r).max(initial=0) > 0 for r in first.state().values())
    # A residual whose shape no longer fits the model is dropped, not applied.
    third = ErrorFeedback("int8")
    third.load_state({"hidden/bias": np.ones(5, np.float32)})
    _, payload = third.encode({"hidden/bias": delta["hidden/bias"]})
    assert payload == get_codec("int8").encode({"hidden/bias": delta["hidden/bias"]})[1]


@pytest.mark.parametrize("weight", [1.0, -0.37, 1e-30, 1e6])
@pytest.mark.parametrize("acc_dtype", [np.float32, np.float64])
def test_float16_accumulate_is_exact_for_every_finite_half(weight: float, acc_dtype: type) -> None:
    halves = np.arange(2**16, dtype=np.uint16).view(np.float16)
    values = halves[np.isfinite(halves)].astype(np.float32)  # includes subnormals and -0.0
    codec = get_codec("float16")
    specs, payload = codec.encode({"v": values})
    acc = {"v": np.zeros(values.size, acc_dtype)}
    codec.accumulate_into(specs, payload, weight, acc)
    np.testing.assert_array_equal(acc["v"], values.astype(acc_dtype) * acc_dtype(weight))


@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan])
def test_float16_payload_with_inf_or_nan_is_invalid(bad: float) -> None:
    specs, payload = get_codec("float16").encode({"v": np.ones(5, np.float32)})
    corrupt = payload[:4] + np.array([bad], "<f2").tobytes() + payload[6:]
    with pytest.raises(CodecError, match="inf or nan"):
        get_codec("float16").decode(specs, corrupt)


def test_error_feedback_with_lossless_codec_sends_the_delta_unchanged() -> None:
    delta = tensors()
    feedback = ErrorFeedback("float32")
    for _ in range(3):
        assert feedback.encode(delta)[1] == get_codec("float32").encode(delta)[1]
    assert feedback.state() == {}


@pytest.mark.parametrize("codec_name", ALL_CODECS)
@pytest.mark.parametrize("weight", [1.0, 0.37])
def test_accumulating_into_one_flat_array_is_bit_identical_to_tensor_by_tensor(codec_name: str, weight: float) -> None:
    codec = get_codec(codec_name)
    data = tensors()
    specs, payload = codec.encode(data)
    specs = tuple(specs)
    start = tensors(seed=9)
    per_tensor = {name: np.array(t, dtype=np.float32) for name, t in start.items()}
    codec.accumulate_into(specs, payload, weight, per_tensor)
    flat = np.concatenate([np.asarray(start[name], np.float32).reshape(-1) for name in data])
    views, offset = {}, 0
    for name in data:
        size = int(np.size(start[name]))
        views[name] = flat[offset : offset + size].reshape(np.shape(start[name]))
        offset += size
    codec.accumulate_into(specs, payload, weight, views, flat)
    for name in data:
        np.testing.assert_array_equal(views[name], per_tensor[name], err_msg=name)


def test_flat_accumulation_needs_the_accumulators_in_the_payloads_order() -> None:
    codec = get_codec("float32")
    data = {"a": np.arange(3, dtype=np.float32), "b": np.arange(3, 5, dtype=np.float32)}
    specs, payload = codec.encode(data)
    flat = np.zeros(5, np.float32)
    acc = {"b": flat[:2], "a": flat[2:]}  # b first: adding the payload as one array would misplace it
    codec.accumulate_into(tuple(specs), payload, 1.0, acc, flat)
    np.testing.assert_array_equal(acc["a"], data["a"])
    np.testing.assert_array_equal(acc["b"], data["b"])


@pytest.mark.parametrize("codec_name", ["float32", "float16", "int8", "int8-channel"])
def test_a_cached_layout_still_checks_every_payload(codec_name: str) -> None:
    codec = get_codec(codec_name)
    specs, payload = codec.encode({"v": np.ones(5, np.float32), "w": np.ones((2, 3), np.float32)})
    specs = tuple(specs)
    assert codec.encoded_size(specs, payload) == len(payload)  # worked out, then cached
    assert codec.encoded_size(specs, payload) == len(payload)
    with pytest.raises(CodecError, match="payload"):
        codec.encoded_size(specs, payload[:-1])
    with pytest.raises(CodecError):
        codec.encoded_size(specs, payload + b"\0")
    if codec_name == "float16":
        corrupt = payload[:4] + np.array([np.inf], "<f2").tobytes() + payload[6:]
        with pytest.raises(CodecError, match="inf or nan"):
            codec.decode(specs, corrupt)
    if codec_name.startswith("int8"):
        corrupt = np.array([np.nan], "<f4").tobytes() + payload[4:]
        with pytest.raises(CodecError):
            codec.decode(specs, corrupt)
