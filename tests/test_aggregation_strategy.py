"""Strategy configuration, FedAvg equivalence and server optimizers."""

from __future__ import annotations

import numpy as np
import pytest

from fedsync.aggregation import (
    Strategy,
    Update,
    constant_staleness,
    hinge_staleness,
    krum,
    polynomial_staleness,
    server_momentum,
    server_sgd,
    weighted_mean,
)
from fedsync.codecs import EncodedDelta

SHAPES = {"hidden/kernel": (64, 32), "hidden/bias": (32,), "head/kernel": (32, 10), "head/bias": (10,)}


def model(rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {name: rng.standard_normal(shape).astype(np.float32) for name, shape in SHAPES.items()}


def test_weight_is_examples_times_discount() -> None:
    strategy = Strategy(staleness=polynomial_staleness(a=0.5))
    assert strategy.weight(Update({}, num_examples=40, staleness=3)) == pytest.approx(20.0)
    assert Strategy().weight(Update({}, num_examples=40, staleness=3)) == 40.0
    hinge = Strategy(staleness=hinge_staleness(a=10, b=4))
    assert hinge.weight(Update({}, num_examples=22, staleness=5)) == pytest.approx(2.0)


def test_should_aggregate_on_full_buffer_or_timeout() -> None:
    strategy = Strategy(buffer_size=4, max_wait_s=30.0)
    assert not strategy.should_aggregate(3, oldest_age_s=29.9)
    assert strategy.should_aggregate(4, oldest_age_s=0.0)
    assert strategy.should_aggregate(1, oldest_age_s=30.0)
    assert not strategy.should_aggregate(0, oldest_age_s=1e9)
    no_timeout = Strategy(buffer_size=4)
    assert not no_timeout.should_aggregate(3, oldest_age_s=1e9)


def test_timeout_waits_for_the_rules_minimum() -> None:
    strategy = Strategy(rule=krum(f=1), buffer_size=8, max_wait_s=1.0)
    assert not strategy.should_aggregate(4, oldest_age_s=5.0)
    assert strategy.should_aggregate(5, oldest_age_s=5.0)


def test_strategy_rejects_buffer_smaller_than_rule_minimum() -> None:
    with pytest.raises(ValueError, match="at least 7"):
        Strategy(rule=krum(f=2), buffer_size=5)
    with pytest.raises(ValueError):
        Strategy(buffer_size=0)
    with pytest.raises(ValueError):
        Strategy(max_staleness=-1)


def test_fedavg_is_a_configuration() -> None:
    strategy = Strategy.fedavg(5)
    assert repr(strategy) == (
        "Strategy(rule=weighted_mean(precision='float32'), staleness=constant_staleness(), "
        "max_staleness=0, optimizer=server_sgd(lr=1.0), buffer_size=5, max_wait_s=None)"
    )
    assert repr(Strategy.fedbuff(buffer_size=8, a=0.5, max_staleness=20)) == (
        "Strategy(rule=weighted_mean(precision='float32'), staleness=polynomial_staleness(a=0.5), "
        "max_staleness=20, optimizer=server_sgd(lr=1.0), buffer_size=8, max_wait_s=None)"
    )


def test_fedavg_equals_example_weighted_average_of_client_models() -> None:
    rng = np.random.default_rng(0)
    global_weights = model(rng)
    before = {name: t.copy() for name, t in global_weights.items()}
    clients = [model(rng) for _ in range(5)]
    examples = [10, 250, 33, 1, 90]
    updates = [
        Update({name: local[name] - global_weights[name] for name in SHAPES}, n, 0, f"c{i}")
        for i, (local, n) in enumerate(zip(clients, examples, strict=True))
    ]
    new_weights = Strategy.fedavg(5).aggregate(global_weights, updates)
    for name in SHAPES:
        expected = sum(n * c[name].astype(np.float64) for c, n in zip(clients, examples, strict=True))
        expected /= sum(examples)
        assert new_weights[name].dtype == np.float32
        np.testing.assert_allclose(new_weights[name], expected, rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(global_weights[name], before[name])
    assert list(new_weights) == list(SHAPES)


def test_fedbuff_discounts_stale_updates() -> None:
    global_weights = {"w": np.zeros(2, np.float32)}
    fresh = Update({"w": np.array([1.0, 0.0], np.float32)}, num_examples=10, staleness=0)
    stale = Update({"w": np.array([0.0, 1.0], np.float32)}, num_examples=10, staleness=3)
    new_weights = Strategy.fedbuff(buffer_size=2, a=0.5).aggregate(global_weights, [fresh, stale])
    np.testing.assert_allclose(new_weights["w"], [1.0 / 1.5, 0.5 / 1.5], rtol=1e-6)


def test_encoded_and_plain_updates_aggregate_alike() -> None:
    rng = np.random.default_rng(1)
    global_weights = model(rng)
    plain = [Update(model(rng), int(rng.integers(1, 50)), int(rng.integers(0, 4))) for _ in range(6)]
    encoded = [Update(EncodedDelta.encode("float32", u.delta), u.num_examples, u.staleness) for u in plain]
    strategy = Strategy.fedbuff(buffer_size=6)
    from_plain = strategy.aggregate(global_weights, plain)
    from_encoded = strategy.aggregate(global_weights, encoded)
    for name in SHAPES:
        np.testing.assert_allclose(from_encoded[name], from_plain[name], rtol=1e-6, atol=1e-6)


def test_server_sgd_scales_the_delta() -> None:
    weights = {"w": np.array([1.0, 2.0], np.float32)}
    delta = {"w": np.array([0.5, -1.0], np.float32)}
    np.testing.assert_allclose(server_sgd(lr=0.1).step(weights, delta)["w"], [1.05, 1.9], rtol=1e-6)
    with pytest.raises(ValueError, match="do not match"):
        server_sgd().step(weights, {"v": delta["w"]})


def test_server_momentum_accumulates_velocity() -> None:
    optimizer = server_momentum(lr=0.5, momentum=0.9)
    weights = {"w": np.zeros(3, np.float32)}
    delta = {"w": np.array([1.0, -2.0, 0.5], np.float32)}
    weights = optimizer.step(weights, delta)  # v = d
    np.testing.assert_allclose(weights["w"], 0.5 * delta["w"], rtol=1e-6)
    weights = optimizer.step(weights, delta)  # v = 1.9 d
    np.testing.assert_allclose(weights["w"], (0.5 + 0.5 * 1.9) * delta["w"], rtol=1e-6)
    np.testing.assert_allclose(optimizer.state()["w"], 1.9 * delta["w"], rtol=1e-6)

    resumed = server_momentum(lr=0.5, momentum=0.9)
    resumed.load_state(optimizer.state())
    np.testing.assert_allclose(resumed.step(weights, delta)["w"], optimizer.step(weights, delta)["w"], rtol=1e-6)
    optimizer.reset()
    assert optimizer.state() == {}


def test_server_momentum_nesterov_looks_ahead() -> None:
    optimizer = server_momentum(lr=1.0, momentum=0.5, nesterov=True)
    delta = {"w": np.array([2.0], np.float32)}
    first = optimizer.step({"w": np.zeros(1, np.float32)}, delta)
    np.testing.assert_allclose(first["w"], [2.0 * 1.5])  # v = d; step = 0.5 v + d
    second = optimizer.step(first, delta)
    np.testing.assert_allclose(second["w"], [3.0 + 0.5 * 3.0 + 2.0])  # v = 1.5 d


def test_strategy_with_momentum_keeps_state_between_rounds() -> None:
    strategy = Strategy(
        rule=weighted_mean(),
        staleness=constant_staleness(),
        optimizer=server_momentum(lr=1.0, momentum=0.9),
        buffer_size=1,
    )
    weights = {"w": np.zeros(2, np.float32)}
    update = Update({"w": np.ones(2, np.float32)}, num_examples=5)
    for _ in range(3):
        weights = strategy.aggregate(weights, [update])
    np.testing.assert_allclose(weights["w"], [1 + 1.9 + 2.71] * 2, rtol=1e-6)
    assert "momentum=0.9" in repr(strategy)


def test_update_rejects_negative_fields() -> None:
    with pytest.raises(ValueError):
        Update({}, num_examples=-1)
    with pytest.raises(ValueError):
        Update({}, num_examples=1, staleness=-2)
