"""Staleness discount functions and stale-update rejection."""

from __future__ import annotations

import pytest

from fedsync.aggregation import Strategy, constant_staleness, hinge_staleness, polynomial_staleness


@pytest.mark.parametrize("tau", [0, 1, 7, 1000])
def test_constant_staleness_is_one(tau: int) -> None:
    assert constant_staleness()(tau) == 1.0


@pytest.mark.parametrize(
    ("a", "tau", "expected"),
    [(0.5, 0, 1.0), (0.5, 3, 0.5), (0.5, 8, 1 / 3), (1.0, 4, 0.2), (2.0, 1, 0.25), (0.0, 50, 1.0)],
)
def test_polynomial_staleness_values(a: float, tau: int, expected: float) -> None:
    assert polynomial_staleness(a)(tau) == pytest.approx(expected)


@pytest.mark.parametrize(("tau", "expected"), [(0, 1.0), (4, 1.0), (5, 1 / 11), (6, 1 / 21), (14, 1 / 101)])
def test_hinge_staleness_values(tau: int, expected: float) -> None:
    assert hinge_staleness(a=10, b=4)(tau) == pytest.approx(expected)


def test_staleness_is_monotone_non_increasing() -> None:
    for discount in (polynomial_staleness(0.5), hinge_staleness(2, 1)):
        values = [discount(tau) for tau in range(30)]
        assert values == sorted(values, reverse=True)
        assert values[-1] < values[0]


def test_staleness_rejects_negative_tau_and_parameters() -> None:
    with pytest.raises(ValueError):
        polynomial_staleness()(-1)
    with pytest.raises(ValueError):
        polynomial_staleness(a=-1)
    with pytest.raises(ValueError):
        hinge_staleness(a=1, b=-2)


def test_staleness_reprs_read_like_constructors() -> None:
    assert repr(polynomial_staleness(0.5)) == "polynomial_staleness(a=0.5)"
    assert repr(hinge_staleness()) == "hinge_staleness(a=10.0, b=4)"
    assert repr(constant_staleness()) == "constant_staleness()"


def test_accepts_rejects_updates_older_than_max_staleness() -> None:
    strategy = Strategy(max_staleness=3)
    assert [strategy.accepts(tau) for tau in range(6)] == [None, None, None, None, "stale", "stale"]
    assert strategy.accepts(-1) == "invalid_staleness"
    assert Strategy().accepts(10**6) is None
    assert Strategy.fedavg(3).accepts(0) is None
    assert Strategy.fedavg(3).accepts(1) == "stale"
