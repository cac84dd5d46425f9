from collections.abc import Callable

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedsync.sim import ConnectivityModel, DeviceSchedule, fleet_schedules, online_devices

GRID = np.linspace(0.0, 5_000.0, 1_001)


def _trace(schedule: DeviceSchedule, times: np.ndarray = GRID) -> list[bool]:
    return [schedule.is_online(float(t)) for t in times]


def test_online_fraction_is_stationary_probability() -> None:
    model = ConnectivityModel(mean_online_s=30.0, mean_offline_s=90.0)
    assert model.online_fraction == pytest.approx(0.25)
    assert ConnectivityModel.from_online_probability(0.7).online_fraction == pytest.approx(0.7)


@pytest.mark.parametrize("p", [0.2, 0.5, 0.85])
def test_long_run_online_fraction_matches_model(p: float) -> None:
    model = ConnectivityModel.from_online_probability(p, mean_cycle_s=100.0)
    schedules = fleet_schedules(model, 100, seed=11)
    times = np.linspace(0.0, 20_000.0, 401)
    observed = np.mean([_trace(s, times) for s in schedules])
    # ~200 cycles per device x 100 devices: the standard error is well under 0.01.
    assert observed == pytest.approx(p, abs=0.03)


def test_state_at_time_zero_is_drawn_from_stationary_distribution() -> None:
    model = ConnectivityModel.from_online_probability(0.3)
    at_zero = [s.is_online(0.0) for s in fleet_schedules(model, 2_000, seed=5)]
    assert np.mean(at_zero) == pytest.approx(0.3, abs=0.04)


def test_mean_durations_match_model() -> None:
    model = ConnectivityModel(mean_online_s=20.0, mean_offline_s=80.0)
    schedule = DeviceSchedule(model, seed=0, device_index=0)
    online, offline, t = [], [], 0.0
    while t < 200_000.0:
        start = t
        if schedule.is_online(t):
            t = schedule.next_offline(t)
            online.append(t - start)
        else:
            t = schedule.next_online(t)
            offline.append(t - start)
    # Drop the first (truncated at t=0) period of each kind.
    assert np.mean(online[1:]) == pytest.approx(20.0, rel=0.1)
    assert np.mean(offline[1:]) == pytest.approx(80.0, rel=0.1)


def test_always_and_never_online_edge_cases() -> None:
    always = DeviceSchedule(ConnectivityModel.from_online_probability(1.0), seed=0, device_index=0)
    never = DeviceSchedule(ConnectivityModel.from_online_probability(0.0), seed=0, device_index=0)
    assert all(_trace(always)) and not any(_trace(never))
    assert always.next_online(123.5) == 123.5 and always.next_offline(123.5) is None
    assert never.next_online(123.5) is None and never.next_offline(123.5) == 123.5
    model = ConnectivityModel.from_online_probability(1.0)
    assert online_devices(fleet_schedules(model, 5, seed=0), 42.0) == [0, 1, 2, 3, 4]
    model = ConnectivityModel.from_online_probability(0.0)
    assert online_devices(fleet_schedules(model, 5, seed=0), 42.0) == []


def test_same_seed_same_schedules_and_different_seed_differs() -> None:
    model = ConnectivityModel(dropout_prob=0.3)
    a, b = fleet_schedules(model, 10, seed=1), fleet_schedules(model, 10, seed=1)
    c = fleet_schedules(model, 10, seed=2)
    assert [_trace(s) for s in a] == [_trace(s) for s in b]
    assert [s.speed_factor for s in a] == [s.speed_factor for s in b]
    assert [s.sync_dropped(i) for s in a for i in range(50)] == [s.sync_dropped(i) for s in b for i in range(50)]
    assert [_trace(s) for s in a] != [_trace(s) for s in c]
    assert [s.speed_factor for s in a] != [s.speed_factor for s in c]


def test_device_streams_do_not_depend_on_fleet_size() -> None:
    model = ConnectivityModel()
    small = fleet_schedules(model, 3, seed=9)
    large = fleet_schedules(model, 300, seed=9)
    for s, t in zip(small, large[:3], strict=True):
        assert _trace(s) == _trace(t) and s.speed_factor == t.speed_factor
    assert _trace(small[0]) != _trace(small[1])


def test_query_order_does_not_change_answers() -> None:
    model = ConnectivityModel(mean_online_s=7.0, mean_offline_s=13.0, dropout_prob=0.4)
    forward = DeviceSchedule(model, seed=4, device_index=2)
    backward = DeviceSchedule(model, seed=4, device_index=2)
    jumpy = DeviceSchedule(model, seed=4, device_index=2)
    times = np.linspace(0.0, 50_000.0, 2_001)
    expected = _trace(forward, times)
    assert _trace(backward, times[::-1])[::-1] == expected
    order = np.random.default_rng(0).permutation(len(times))
    assert [jumpy.is_online(float(times[i])) for i in order] == [expected[i] for i in order]
    drops = [forward.sync_dropped(i) for i in range(1_000)]
    assert [backward.sync_dropped(i) for i in reversed(range(1_000))][::-1] == drops


@settings(max_examples=200, deadline=None)
@given(
    p=st.floats(0.05, 0.95),
    seed=st.integers(0, 2**32),
    t=st.floats(0.0, 1e5, allow_nan=False),
)
def test_next_online_is_earliest_online_time(p: float, seed: int, t: float) -> None:
    schedule = DeviceSchedule(ConnectivityModel.from_online_probability(p), seed, device_index=3)
    nxt = schedule.next_online(t)
    assert nxt is not None and nxt >= t and schedule.is_online(nxt)
    if nxt > t:
        assert not schedule.is_online(t)
        # Offline throughout [t, nxt): check points just inside the gap.
        for frac in (0.25, 0.5, 0.999):
            assert not schedule.is_online(t + frac * (nxt - t))
    off = schedule.next_offline(t)
    assert off is not None and off >= t and not schedule.is_online(off)


def test_speed_factor_is_within_bounds_and_varies() -> None:
    schedules = fleet_schedules(ConnectivityModel(speed_min=0.25, speed_max=4.0), 500, seed=0)
    speeds = np.array([s.speed_factor for s in schedules])
    assert speeds.min() >= 0.25 and speeds.max() <= 4.0
    assert speeds.mean() == pytest.approx(2.125, abs=0.15)
    fixed = fleet_schedules(ConnectivityModel(speed_min=1.5, speed_max=1.5), 3, seed=0)
    assert [s.speed_factor for s in fixed] == [1.5, 1.5, 1.5]


def test_sync_dropout_rate_and_edges() -> None:
    schedules = fleet_schedules(ConnectivityModel(dropout_prob=0.2), 50, seed=3)
    rate = np.mean([s.sync_dropped(i) for s in schedules for i in range(200)])
    assert rate == pytest.approx(0.2, abs=0.03)
    never = DeviceSchedule(ConnectivityModel(dropout_prob=0.0), seed=0, device_index=0)
    always = DeviceSchedule(ConnectivityModel(dropout_prob=1.0), seed=0, device_index=0)
    assert not any(never.sync_dropped(i) for i in range(100))
    assert all(always.sync_dropped(i) for i in range(100))


def test_online_devices_reports_device_indices() -> None:
    model = ConnectivityModel.from_online_probability(0.5)
    schedules = fleet_schedules(model, 40, seed=0)
    subset = schedules[10:20]
    at = 777.0
    assert online_devices(subset, at) == [s.device_index for s in subset if s.is_online(at)]
    assert all(10 <= i < 20 for i in online_devices(subset, at))


def test_thousand_device_fleet_is_cheap_to_query() -> None:
    schedules = fleet_schedules(ConnectivityModel.from_online_probability(0.4), 1_000, seed=0)
    counts = [len(online_devices(schedules, t)) for t in np.linspace(0.0, 3_600.0, 13)]
    assert np.mean(counts) == pytest.approx(400, abs=60)


@pytest.mark.parametrize(
    "make",
    [
        lambda: ConnectivityModel(mean_online_s=-1.0),
        lambda: ConnectivityModel(mean_offline_s=float("nan")),
        lambda: ConnectivityModel(mean_online_s=float("inf")),
        lambda: ConnectivityModel(mean_online_s=0.0, mean_offline_s=0.0),
        lambda: ConnectivityModel(dropout_prob=-0.1),
        lambda: ConnectivityModel(dropout_prob=1.1),
        lambda: ConnectivityModel(speed_min=0.0),
        lambda: ConnectivityModel(speed_min=-1.0),
        lambda: ConnectivityModel(speed_min=3.0, speed_max=2.0),
        lambda: ConnectivityModel.from_online_probability(-0.01),
        lambda: ConnectivityModel.from_online_probability(1.01),
        lambda: ConnectivityModel.from_online_probability(0.5, mean_cycle_s=0.0),
        lambda: ConnectivityModel.from_online_probability(0.5, dropout_prob=2.0),
        lambda: DeviceSchedule(ConnectivityModel(), seed=-1, device_index=0),
        lambda: DeviceSchedule(ConnectivityModel(), seed=0, device_index=-1),
        lambda: DeviceSchedule(ConnectivityModel(), seed=0, device_index=0).is_online(-1.0),
        lambda: DeviceSchedule(ConnectivityModel(), seed=0, device_index=0).next_online(float("nan")),
        lambda: DeviceSchedule(ConnectivityModel(), seed=0, device_index=0).sync_dropped(-1),
        lambda: fleet_schedules(ConnectivityModel(), 0, seed=0),
        lambda: fleet_schedules(ConnectivityModel(), 3, seed=-5),
    ],
)
def test_invalid_parameters_raise_value_error(make: Callable[[], object]) -> None:
    with pytest.raises(ValueError) as info:
        make()
    assert "\n" not in str(info.value)
