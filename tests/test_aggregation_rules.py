"""Aggregation rules against straightforward reference computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedsync.aggregation import (
    Pipeline,
    Update,
    coordinate_median,
    krum,
    multi_krum,
    norm_clipping,
    trimmed_mean,
    weighted_mean,
)
from fedsync.codecs import EncodedDelta

SHAPES = {"hidden/kernel": (6, 4), "hidden/bias": (4,), "head/kernel": (4, 3), "head/bias": (3,)}


def random_updates(rng: np.random.Generator, n: int, scale: float = 1.0) -> list[Update]:
    return [
        Update(
            {name: (scale * rng.standard_normal(shape)).astype(np.float32) for name, shape in SHAPES.items()},
            num_examples=int(rng.integers(1, 100)),
            staleness=int(rng.integers(0, 5)),
            device_id=f"device-{i}",
        )
        for i in range(n)
    ]


def flat(delta: dict[str, np.ndarray]) -> np.ndarray:
    return np.concatenate([np.asarray(delta[name], dtype=np.float64).reshape(-1) for name in SHAPES])


def reference_weighted_mean(updates: list[Update], weights: list[float]) -> dict[str, np.ndarray]:
    result = {}
    for name in SHAPES:
        total = np.zeros(SHAPES[name])
        for update, weight in zip(updates, weights, strict=True):
            total += weight * update.delta[name].astype(np.float64)
        result[name] = total / sum(weights)
    return result


def reference_krum_scores(updates: list[Update], f: int) -> list[float]:
    vectors = [flat(update.delta) for update in updates]
    scores = []
    for i, vi in enumerate(vectors):
        distances = sorted(float(np.sum((vi - vj) ** 2)) for j, vj in enumerate(vectors) if j != i)
        scores.append(sum(distances[: len(vectors) - f - 2]))
    return scores


def assert_deltas_close(actual: dict, expected: dict, rtol: float = 1e-5, atol: float = 1e-6) -> None:
    assert list(actual) == list(expected)
    for name in expected:
        assert actual[name].dtype == np.float32
        np.testing.assert_allclose(actual[name], expected[name], rtol=rtol, atol=atol, err_msg=name)


@pytest.mark.parametrize("seed", range(5))
def test_weighted_mean_matches_reference(seed: int) -> None:
    rng = np.random.default_rng(seed)
    updates = random_updates(rng, n=int(rng.integers(1, 12)))
    weights = list(rng.uniform(0.1, 50.0, size=len(updates)))
    result = weighted_mean().aggregate(updates, np.array(weights))
    assert_deltas_close(result, reference_weighted_mean(updates, weights))


def test_weighted_mean_float64_accumulator_matches_reference() -> None:
    rng = np.random.default_rng(11)
    updates = random_updates(rng, n=9)
    weights = list(rng.uniform(0.1, 5.0, size=9))
    result = weighted_mean(precision="float64").aggregate(updates, weights)
    assert_deltas_close(result, reference_weighted_mean(updates, weights), rtol=1e-6)


def test_weighted_mean_skips_zero_weights_and_rejects_all_zero() -> None:
    rng = np.random.default_rng(1)
    updates = random_updates(rng, n=3)
    result = weighted_mean().aggregate(updates, [0.0, 2.0, 0.0])
    assert_deltas_close(result, updates[1].delta)
    with pytest.raises(ValueError, match="positive total weight"):
        weighted_mean().aggregate(updates, [0.0, 0.0, 0.0])


@pytest.mark.parametrize("weights", [[1.0, -1.0], [1.0, math.nan], [1.0]])
def test_rules_reject_bad_weights(weights: list[float]) -> None:
    updates = random_updates(np.random.default_rng(2), n=2)
    with pytest.raises(ValueError, match="weights"):
        weighted_mean().aggregate(updates, weights)


def test_rules_reject_mismatched_tensors() -> None:
    updates = random_updates(np.random.default_rng(3), n=2)
    odd = Update({"hidden/kernel": np.zeros((6, 4), np.float32)}, num_examples=1, device_id="odd")
    for rule in (weighted_mean(), coordinate_median(), trimmed_mean(0.1)):
        with pytest.raises(ValueError, match="odd"):
            rule.aggregate([*updates, odd], [1.0, 1.0, 1.0])


@pytest.mark.parametrize("codec", ["float32", "float16", "int8", "int8-channel", "topk:0.25"])
def test_weighted_mean_of_encoded_deltas_equals_mean_of_decoded(codec: str) -> None:
    rng = np.random.default_rng(4)
    plain = random_updates(rng, n=6)
    encoded = [Update(EncodedDelta.encode(codec, u.delta), u.num_examples, u.staleness, u.device_id) for u in plain]
    decoded = [Update(u.delta.decode(), u.num_examples) for u in encoded]
    weights = [float(u.num_examples) for u in plain]
    result = weighted_mean().aggregate(encoded, weights)
    assert_deltas_close(result, reference_weighted_mean(decoded, weights))
    if codec == "float32":
        assert_deltas_close(result, reference_weighted_mean(plain, weights))


@pytest.mark.parametrize("codec", ["float32", "float16", "int8", "topk:0.25"])
@pytest.mark.parametrize("precision", ["float32", "float64"])
def test_weighted_mean_of_encoded_deltas_is_bit_identical_to_adding_them_one_tensor_at_a_time(
    codec: str, precision: str
) -> None:
    rng = np.random.default_rng(11)
    plain = random_updates(rng, n=7)
    encoded = [Update(EncodedDelta.encode(codec, u.delta), u.num_examples) for u in plain]
    weights = np.array([float(u.num_examples) for u in plain])
    weights[2] = 0.0  # skipped
    expected = {name: np.zeros(shape, dtype=precision) for name, shape in SHAPES.items()}
    for update, weight in zip(encoded, weights, strict=True):
        if weight > 0:
            update.delta.accumulate_into(float(weight) / float(weights.sum()), expected)
    result = weighted_mean(precision=precision).aggregate(encoded, weights)
    for name in SHAPES:
        np.testing.assert_array_equal(result[name], expected[name].astype(np.float32), err_msg=name)


@pytest.mark.parametrize("n", [1, 2, 5, 8])
def test_coordinate_median_matches_np_median_and_ignores_weights(n: int) -> None:
    rng = np.random.default_rng(n)
    updates = random_updates(rng, n)
    result = coordinate_median().aggregate(updates, rng.uniform(0.1, 10.0, size=n))
    expected = {name: np.median(np.stack([u.delta[name] for u in updates]), axis=0) for name in SHAPES}
    assert_deltas_close(result, expected, rtol=0, atol=0)


def reference_trimmed_mean(updates: list[Update], beta: float) -> dict[str, np.ndarray]:
    n = len(updates)
    k = int(beta * n)
    result = {}
    for name, shape in SHAPES.items():
        out = np.zeros(shape)
        for index in np.ndindex(*shape):
            values = sorted(float(u.delta[name][index]) for u in updates)
            out[index] = sum(values[k : n - k]) / (n - 2 * k)
        result[name] = out
    return result


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 12), beta=st.floats(0.0, 0.49), seed=st.integers(0, 2**32 - 1))
def test_trimmed_mean_matches_sorted_reference(n: int, beta: float, seed: int) -> None:
    updates = random_updates(np.random.default_rng(seed), n)
    result = trimmed_mean(beta).aggregate(updates, np.ones(n))
    assert_deltas_close(result, reference_trimmed_mean(updates, beta))


def test_trimmed_mean_drops_outliers() -> None:
    updates = random_updates(np.random.default_rng(5), 10, scale=0.01)
    poisoned = [Update({name: np.full(shape, 1e6, np.float32) for name, shape in SHAPES.items()}, 1)]
    result = trimmed_mean(0.1).aggregate(updates[:9] + poisoned, np.ones(10))
    assert max(float(np.abs(t).max()) for t in result.values()) < 0.1


@pytest.mark.parametrize("beta", [-0.1, 0.5, 0.7])
def test_trimmed_mean_rejects_bad_beta(beta: float) -> None:
    with pytest.raises(ValueError, match="beta"):
        trimmed_mean(beta)


@pytest.mark.parametrize(("n", "f"), [(5, 1), (7, 2), (10, 3), (4, 0)])
def test_krum_selects_the_reference_minimum(n: int, f: int) -> None:
    updates = random_updates(np.random.default_rng(100 + n), n)
    scores = reference_krum_scores(updates, f)
    best = int(np.argmin(scores))
    result = krum(f).aggregate(updates, np.ones(n))
    assert_deltas_close(result, updates[best].delta, rtol=0, atol=0)


def test_krum_ignores_byzantine_updates() -> None:
    rng = np.random.default_rng(6)
    honest = random_updates(rng, 7, scale=0.1)
    byzantine = random_updates(rng, 2, scale=100.0)
    result = krum(f=2).aggregate(byzantine + honest, np.ones(9))
    assert any(np.array_equal(flat(result), flat(u.delta)) for u in honest)


def test_krum_needs_2f_plus_3_updates() -> None:
    updates = random_updates(np.random.default_rng(7), 6)
    assert krum(2).min_updates == 7
    with pytest.raises(ValueError, match="at least 7"):
        krum(2).aggregate(updates, np.ones(6))


def test_multi_krum_averages_the_m_best_with_given_weights() -> None:
    rng = np.random.default_rng(8)
    updates = random_updates(rng, 9)
    weights = list(rng.uniform(1.0, 10.0, size=9))
    order = np.argsort(reference_krum_scores(updates, 2), kind="stable")[:4]
    expected = reference_weighted_mean([updates[i] for i in order], [weights[i] for i in order])
    assert_deltas_close(multi_krum(f=2, m=4).aggregate(updates, weights), expected)


def test_multi_krum_defaults_to_n_minus_f_and_m_1_is_krum() -> None:
    rng = np.random.default_rng(9)
    updates = random_updates(rng, 8)
    order = np.argsort(reference_krum_scores(updates, 2), kind="stable")[:6]
    expected = reference_weighted_mean([updates[i] for i in order], [1.0] * 6)
    assert_deltas_close(multi_krum(f=2).aggregate(updates, np.ones(8)), expected)
    assert_deltas_close(multi_krum(f=2, m=1).aggregate(updates, np.ones(8)), krum(f=2).aggregate(updates, np.ones(8)))


def test_norm_clipping_scales_large_updates_to_max_norm() -> None:
    rng = np.random.default_rng(10)
    big, small = random_updates(rng, 2, scale=3.0)
    small = Update({name: t * 1e-3 for name, t in small.delta.items()}, 1)
    clipped = norm_clipping(max_norm=2.0).transform([big, small])
    big_norm = np.linalg.norm(flat(big.delta))
    assert big_norm > 2.0
    clipped_big = dict(clipped[0].delta.source)  # lazily scaled: source * factor
    assert clipped[0].delta.factor == pytest.approx(2.0 / big_norm)
    assert np.linalg.norm(flat(clipped_big) * clipped[0].delta.factor) == pytest.approx(2.0)
    assert clipped[1] is small
    result = norm_clipping(max_norm=2.0).aggregate([big], [1.0])
    assert np.linalg.norm(flat(result)) == pytest.approx(2.0, rel=1e-5)


def test_composition_clips_then_reduces() -> None:
    rng = np.random.default_rng(12)
    updates = random_updates(rng, 6, scale=5.0)
    rule = norm_clipping(max_norm=1.0) | trimmed_mean(0.2)
    assert isinstance(rule, Pipeline)
    assert repr(rule) == "norm_clipping(max_norm=1.0) | trimmed_mean(beta=0.2)"
    clipped = []
    for update in updates:
        norm = np.linalg.norm(flat(update.delta))
        factor = min(1.0, 1.0 / norm)
        clipped.append(Update({k: v.astype(np.float64) * factor for k, v in update.delta.items()}, 1))
    assert_deltas_close(rule.aggregate(updates, np.ones(6)), reference_trimmed_mean(clipped, 0.2))


def test_composition_of_encoded_deltas_keeps_them_encoded() -> None:
    rng = np.random.default_rng(13)
    plain = random_updates(rng, 5, scale=5.0)
    encoded = [Update(EncodedDelta.encode("float32", u.delta), u.num_examples) for u in plain]
    rule = norm_clipping(1.0) | weighted_mean()
    weights = np.arange(1.0, 6.0)
    assert_deltas_close(rule.aggregate(encoded, weights), rule.aggregate(plain, weights))


def test_composition_chains_stages_and_refuses_reducer_first() -> None:
    chained = norm_clipping(3.0) | norm_clipping(1.0) | coordinate_median()
    assert repr(chained) == "norm_clipping(max_norm=3.0) | norm_clipping(max_norm=1.0) | coordinate_median()"
    assert (norm_clipping(1.0) | krum(2)).min_updates == 7
    updates = random_updates(np.random.default_rng(14), 5, scale=5.0)
    assert_deltas_close(
        chained.aggregate(updates, np.ones(5)),
        (norm_clipping(1.0) | coordinate_median()).aggregate(updates, np.ones(5)),
    )
    with pytest.raises(TypeError, match="must come last"):
        weighted_mean() | norm_clipping(1.0)
    with pytest.raises(TypeError, match="must come last"):
        chained | norm_clipping(1.0)
    with pytest.raises(TypeError):
        norm_clipping(1.0) | "median"
