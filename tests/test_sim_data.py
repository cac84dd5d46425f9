from collections import Counter
from collections.abc import Callable

import numpy as np
import pytest

from fedsync.sim import (
    Dataset,
    Shard,
    load_digits_split,
    partition,
    partition_dirichlet,
    partition_iid,
    partition_label_skew,
)


@pytest.fixture(scope="module")
def split() -> tuple[Dataset, Dataset]:
    return load_digits_split()


@pytest.fixture(scope="module")
def train(split: tuple[Dataset, Dataset]) -> Dataset:
    return split[0]


def _same_shards(a: list[Shard], b: list[Shard]) -> bool:
    return len(a) == len(b) and all(
        s.device_index == t.device_index and np.array_equal(s.x, t.x) and np.array_equal(s.y, t.y)
        for s, t in zip(a, b, strict=True)
    )


def _row_devices(shards: list[Shard]) -> dict[bytes, set[int]]:
    """Map each distinct input (its raw bytes) to the devices holding it."""
    holders: dict[bytes, set[int]] = {}
    for shard in shards:
        for row in shard.x:
            holders.setdefault(row.tobytes(), set()).add(shard.device_index)
    return holders


def _mean_label_entropy(shards: list[Shard]) -> float:
    entropies = []
    for shard in shards:
        p = np.bincount(shard.y, minlength=10) / len(shard.y)
        p = p[p > 0]
        entropies.append(float(-(p * np.log(p)).sum()))
    return float(np.mean(entropies))


def test_load_digits_split_shapes_and_scaling(split: tuple[Dataset, Dataset]) -> None:
    train, test = split
    assert len(train) + len(test) == 1797
    assert len(test) == pytest.approx(0.25 * 1797, abs=1)
    for ds in (train, test):
        assert ds.x.dtype == np.float32 and ds.x.shape == (len(ds), 64)
        assert ds.y.dtype == np.int64
        assert ds.x.min() == 0.0 and ds.x.max() == 1.0
    # Stratified: class proportions match between train and test.
    train_p = np.bincount(train.y, minlength=10) / len(train)
    test_p = np.bincount(test.y, minlength=10) / len(test)
    assert np.abs(train_p - test_p).max() < 0.01


def test_load_digits_split_is_deterministic() -> None:
    a_train, a_test = load_digits_split(seed=3)
    b_train, b_test = load_digits_split(seed=3)
    c_train, _ = load_digits_split(seed=4)
    assert np.array_equal(a_train.x, b_train.x) and np.array_equal(a_test.y, b_test.y)
    assert not np.array_equal(a_train.y, c_train.y)


@pytest.mark.parametrize("scheme", ["iid", "dirichlet", "label-skew"])
@pytest.mark.parametrize("overlap", [0.0, 0.5])
def test_partition_is_deterministic_per_seed(train: Dataset, scheme: str, overlap: float) -> None:
    first = partition(train, 12, scheme, seed=7, overlap=overlap)
    again = partition(train, 12, scheme, seed=7, overlap=overlap)
    other = partition(train, 12, scheme, seed=8, overlap=overlap)
    assert _same_shards(first, again)
    assert not _same_shards(first, other)


def test_iid_covers_training_set_exactly_once(train: Dataset) -> None:
    shards = partition_iid(train, 10, seed=0)
    assert [s.device_index for s in shards] == list(range(10))
    sizes = [len(s) for s in shards]
    assert sum(sizes) == len(train) and max(sizes) - min(sizes) <= 1
    holders = _row_devices(shards)
    assert len(holders) == len(train)  # every input once, none shared
    assert all(len(devices) == 1 for devices in holders.values())
    for shard in shards:
        assert shard.x.dtype == np.float32 and shard.x.shape == (len(shard), 64)


def test_dirichlet_assigns_every_sample(train: Dataset) -> None:
    shards = partition_dirichlet(train, 10, alpha=0.5, seed=0, min_samples=0)
    assert sum(len(s) for s in shards) == len(train)
    assert len(_row_devices(shards)) == len(train)


def test_dirichlet_small_alpha_is_more_skewed(train: Dataset) -> None:
    skewed = partition_dirichlet(train, 20, alpha=0.05, seed=0)
    uniform = partition_dirichlet(train, 20, alpha=100.0, seed=0)
    assert _mean_label_entropy(skewed) < _mean_label_entropy(uniform) - 1.0
    assert _mean_label_entropy(uniform) > 0.9 * np.log(10)


@pytest.mark.parametrize("k", [1, 2, 5, 10])
def test_label_skew_devices_see_exactly_k_classes(train: Dataset, k: int) -> None:
    shards = partition_label_skew(train, 30, labels_per_device=k, seed=1)
    assert all(len(np.unique(s.y)) == k for s in shards)
    # Every class is held by somebody, and each sample is assigned once.
    assert sum(len(s) for s in shards) == len(train)
    assert set(np.concatenate([s.y for s in shards]).tolist()) == set(range(10))


def test_label_skew_exact_k_survives_many_tiny_shards(train: Dataset) -> None:
    shards = partition_label_skew(train, 1000, labels_per_device=3, seed=0)
    assert all(len(np.unique(s.y)) == 3 for s in shards)


@pytest.mark.parametrize("scheme", ["iid", "dirichlet", "label-skew"])
@pytest.mark.parametrize("num_devices", [5, 20])
def test_overlap_shares_bit_identical_inputs(train: Dataset, scheme: str, num_devices: int) -> None:
    shards = partition(train, num_devices, scheme, seed=0, overlap=0.5)
    holders = _row_devices(shards)
    shared_rows = sum(1 for shard in shards for row in shard.x if len(holders[row.tobytes()]) > 1)
    total_rows = sum(len(s) for s in shards)
    assert shared_rows / total_rows > 0.4
    # Several devices predict the very same input, so conflicts can arise.
    assert max(len(devices) for devices in holders.values()) >= 3
    for shard in shards:  # no input repeats within a device
        assert len({row.tobytes() for row in shard.x}) == len(shard)


def test_overlap_keeps_shard_sizes_and_private_label_skew(train: Dataset) -> None:
    plain = partition_label_skew(train, 20, labels_per_device=2, seed=0)
    mixed = partition_label_skew(train, 20, labels_per_device=2, seed=0, overlap=0.3)
    holders = _row_devices(mixed)
    for a, b in zip(plain, mixed, strict=True):
        assert len(a) == len(b)
        own_classes = np.isin(b.y, np.unique(a.y))
        # Rows outside the device's classes come only from the shared pool.
        assert 1 - own_classes.mean() <= 0.3 + 0.05
        assert not own_classes.all(), "shared rows of other classes should reach the device"
    foreign_holders = [
        len(holders[row.tobytes()])
        for a, b in zip(plain, mixed, strict=True)
        for row in b.x[~np.isin(b.y, np.unique(a.y))]
    ]
    assert np.mean(np.array(foreign_holders) > 1) > 0.8


def test_overlap_one_makes_every_row_come_from_the_shared_pool(train: Dataset) -> None:
    shards = partition_iid(train, 20, seed=0, overlap=1.0)
    distinct = len(_row_devices(shards))
    # About four devices per pool input, so far fewer distinct inputs than rows.
    assert distinct < 0.4 * len(train)


def test_thousand_devices_are_never_empty(train: Dataset) -> None:
    for scheme in ("iid", "dirichlet", "label-skew"):
        shards = partition(train, 1000, scheme, seed=0, alpha=0.1, overlap=0.3)
        assert len(shards) == 1000
        assert min(len(s) for s in shards) >= 2


def test_min_samples_is_respected(train: Dataset) -> None:
    shards = partition_dirichlet(train, 200, alpha=0.05, seed=2, min_samples=5)
    assert min(len(s) for s in shards) >= 5
    for shard in shards:  # top-up reuses other devices' samples, not duplicates within a device
        assert len({row.tobytes() for row in shard.x}) == len(shard)


@pytest.mark.parametrize(
    "call",
    [
        lambda tr: partition_iid(tr, 0, seed=0),
        lambda tr: partition_iid(tr, -3, seed=0),
        lambda tr: partition_iid(tr, 2.5, seed=0),
        lambda tr: partition_iid(tr, 5, seed=-1),
        lambda tr: partition_iid(tr, 5, seed=0, overlap=-0.1),
        lambda tr: partition_iid(tr, 5, seed=0, overlap=1.5),
        lambda tr: partition_iid(tr, 5, seed=0, overlap=float("nan")),
        lambda tr: partition_iid(tr, 5, seed=0, min_samples=-1),
        lambda tr: partition_dirichlet(tr, 5, alpha=0.0, seed=0),
        lambda tr: partition_dirichlet(tr, 5, alpha=-1.0, seed=0),
        lambda tr: partition_dirichlet(tr, 5, alpha=float("inf"), seed=0),
        lambda tr: partition_label_skew(tr, 5, labels_per_device=0, seed=0),
        lambda tr: partition_label_skew(tr, 5, labels_per_device=11, seed=0),
        lambda tr: partition(tr, 5, "round-robin", seed=0),
        lambda tr: partition(tr, 5, "dirichlet", seed=0, alpha=0.0),
        lambda tr: partition(tr, 5, "label-skew", seed=0, labels_per_device=11),
        lambda tr: partition(Dataset(tr.x[:0], tr.y[:0]), 5, "iid", seed=0),
        lambda tr: load_digits_split(test_fraction=0.0),
        lambda tr: load_digits_split(test_fraction=1.0),
    ],
)
def test_invalid_parameters_raise_value_error(train: Dataset, call: Callable[[Dataset], object]) -> None:
    with pytest.raises(ValueError) as info:
        call(train)
    assert "\n" not in str(info.value)


def test_label_skew_balances_class_usage(train: Dataset) -> None:
    shards = partition_label_skew(train, 25, labels_per_device=2, seed=0)
    usage = Counter(c for s in shards for c in np.unique(s.y).tolist())
    assert set(usage.values()) == {5}
