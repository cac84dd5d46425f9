"""Digits dataset loading and federated partitioning schemes.

Every partition is a pure function of its arguments: the same ``seed`` always
yields the same shards.

Small-shard guarantee: with many devices (e.g. 1,000 devices over ~1,350
training samples) a scheme can leave devices with few or no samples. Each
device is therefore topped up to ``min_samples`` rows by reusing training
samples that other devices also hold, drawn from the device's own label
distribution. Reused rows are identical inputs on several devices even when
``overlap`` is 0.

Overlap: about ``overlap`` of each device's rows are swapped for rows drawn
from one common pool shared by the whole fleet (pool rows a device already
holds count towards it), so shard sizes are unchanged. Shared rows ignore the
device's label skew: under "label-skew" private rows stay within the device's
k classes while shared rows may carry any label, which is where devices trained
on different classes disagree. The pool is sized so each pool input lands on
about ``SHARED_INPUT_FANOUT`` devices. Rows are copied from the same float32
training array, so shared inputs are bit-identical across devices.
"""

from __future__ import annotations

import functools
import math
import threading
from dataclasses import dataclass

import numpy as np

SCHEMES = ("iid", "dirichlet", "label-skew")
DEFAULT_MIN_SAMPLES = 2
# Expected number of devices that receive each shared-pool input.
SHARED_INPUT_FANOUT = 4
_DIGITS_MAX_PIXEL = 16.0


@dataclass(frozen=True, eq=False)  # eq=False: ndarray fields have no scalar ==
class Dataset:
    x: np.ndarray  # float32, shape (n, 64), pixel values in [0, 1]
    y: np.ndarray  # int64, shape (n,)

    def __len__(self) -> int:
        return len(self.y)


@dataclass(frozen=True, eq=False)
class Shard:
    device_index: int
    x: np.ndarray
    y: np.ndarray

    def __len__(self) -> int:
        return len(self.y)


_digits_lock = threading.Lock()  # threads that load them at once wait for one load


def _digits() -> tuple[np.ndarray, np.ndarray]:
    with _digits_lock:
        return _load_digits()


@functools.cache
def _load_digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits  # ~0.7 s: only where the data is loaded, not in device hosts

    bunch = load_digits()
    x = (bunch.data / _DIGITS_MAX_PIXEL).astype(np.float32)
    y = bunch.target.astype(np.int64)
    x.flags.writeable = False
    y.flags.writeable = False
    return x, y


def load_digits_split(test_fraction: float = 0.25, seed: int = 0) -> tuple[Dataset, Dataset]:
    """Stratified, deterministic train/test split of scikit-learn's bundled digits."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
    _require_int("seed", seed, minimum=0)
    from sklearn.model_selection import train_test_split

    x, y = _digits()
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=test_fraction, random_state=seed, stratify=y)
    return Dataset(x_train, y_train), Dataset(x_test, y_test)


def partition_iid(
    train: Dataset,
    num_devices: int,
    seed: int,
    overlap: float = 0.0,
    *,
    min_samples: int = DEFAULT_MIN_SAMPLES,
) -> list[Shard]:
    """Shuffle and split the training set into near-equal random shards."""
    _validate_common(train, num_devices, seed, overlap, min_samples)
    rng = np.random.default_rng(seed)
    labels = _Labels(train.y)
    assigned = np.array_split(rng.permutation(len(train)), num_devices)
    weights = np.tile(labels.counts / labels.counts.sum(), (num_devices, 1))
    return _finish(rng, train, labels, assigned, weights, None, overlap, min_samples)


def partition_dirichlet(
    train: Dataset,
    num_devices: int,
    alpha: float,
    seed: int,
    overlap: float = 0.0,
    *,
    min_samples: int = DEFAULT_MIN_SAMPLES,
) -> list[Shard]:
    """Split each class over devices by Dirichlet(alpha) proportions; small alpha = more skew."""
    if not (math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"alpha must be a finite number > 0, got {alpha!r}")
    _validate_common(train, num_devices, seed, overlap, min_samples)
    rng = np.random.default_rng(seed)
    labels = _Labels(train.y)
    proportions = rng.dirichlet(np.full(num_devices, float(alpha)), size=labels.num_classes)

    parts: list[list[np.ndarray]] = [[] for _ in range(num_devices)]
    for c, members in enumerate(labels.members):
        shuffled = rng.permutation(members)
        cuts = (np.cumsum(proportions[c])[:-1] * len(shuffled)).astype(np.int64)
        for device, part in enumerate(np.split(shuffled, cuts)):
            if part.size:
                parts[device].append(part)
    assigned = [np.concatenate(p) if p else np.empty(0, np.int64) for p in parts]

    # A device's expected label distribution: its share of each class times class size.
    weights = proportions.T * labels.counts
    totals = weights.sum(axis=1, keepdims=True)
    fallback = labels.counts / labels.counts.sum()
    weights = np.where(totals > 0, weights / np.where(totals > 0, totals, 1.0), fallback)
    return _finish(rng, train, labels, assigned, weights, None, overlap, min_samples)


def partition_label_skew(
    train: Dataset,
    num_devices: int,
    labels_per_device: int,
    seed: int,
    overlap: float = 0.0,
    *,
    min_samples: int = DEFAULT_MIN_SAMPLES,
) -> list[Shard]:
    """Give each device exactly ``labels_per_device`` classes.

    Classes are dealt least-used-first so every class is held by some device
    whenever ``num_devices * labels_per_device >= num_classes``; otherwise the
    samples of unheld classes go unused. Each class is split evenly among its
    holders, and every device is topped up to at least one sample per class.
    With ``overlap > 0`` shared rows may add other classes (see module docstring).
    """
    _validate_common(train, num_devices, seed, overlap, min_samples)
    labels = _Labels(train.y)
    if not _is_int(labels_per_device) or not 1 <= labels_per_device <= labels.num_classes:
        raise ValueError(f"labels_per_device must be in 1..{labels.num_classes}, got {labels_per_device!r}")
    rng = np.random.default_rng(seed)

    usage = np.zeros(labels.num_classes, dtype=np.int64)
    device_classes = np.empty((num_devices, labels_per_device), dtype=np.int64)
    for device in range(num_devices):
        tie_break = rng.random(labels.num_classes)
        chosen = np.lexsort((tie_break, usage))[:labels_per_device]
        usage[chosen] += 1
        device_classes[device] = np.sort(chosen)

    parts: list[list[np.ndarray]] = [[] for _ in range(num_devices)]
    for c, members in enumerate(labels.members):
        holders = np.flatnonzero((device_classes == c).any(axis=1))
        if holders.size == 0:
            continue
        for device, part in zip(holders, np.array_split(rng.permutation(members), holders.size), strict=True):
            parts[device].append(part)
    assigned = [np.concatenate(p) if p else np.empty(0, np.int64) for p in parts]

    weights = np.zeros((num_devices, labels.num_classes))
    for device, classes in enumerate(device_classes):
        weights[device, classes] = labels.counts[classes] / labels.counts[classes].sum()
    return _finish(rng, train, labels, assigned, weights, device_classes, overlap, min_samples)


def partition(
    train: Dataset,
    num_devices: int,
    scheme: str,
    seed: int,
    alpha: float = 0.5,
    labels_per_device: int = 2,
    overlap: float = 0.0,
    *,
    min_samples: int = DEFAULT_MIN_SAMPLES,
) -> list[Shard]:
    """Dispatch to a partition scheme by name; parameters a scheme doesn't use are ignored."""
    if scheme == "iid":
        return partition_iid(train, num_devices, seed, overlap, min_samples=min_samples)
    if scheme == "dirichlet":
        return partition_dirichlet(train, num_devices, alpha, seed, overlap, min_samples=min_samples)
    if scheme == "label-skew":
        return partition_label_skew(train, num_devices, labels_per_device, seed, overlap, min_samples=min_samples)
    raise ValueError(f"unknown scheme {scheme!r}; expected one of {', '.join(SCHEMES)}")


class _Labels:
    """Labels mapped to dense class positions 0..C-1, with per-class index lists."""

    def __init__(self, y: np.ndarray) -> None:
        self.classes, self.pos = np.unique(y, return_inverse=True)
        self.num_classes = len(self.classes)
        self.counts = np.bincount(self.pos, minlength=self.num_classes).astype(np.float64)
        self.members = [np.flatnonzero(self.pos == c) for c in range(self.num_classes)]


def _finish(
    rng: np.random.Generator,
    train: Dataset,
    labels: _Labels,
    assigned: list[np.ndarray],
    weights: np.ndarray,
    required_classes: np.ndarray | None,
    overlap: float,
    min_samples: int,
) -> list[Shard]:
    shards = []
    for device, own in enumerate(assigned):
        required = required_classes[device] if required_classes is not None else None
        shards.append(_top_up(rng, own, labels, weights[device], required, min_samples))
    if overlap > 0:
        shards = _apply_overlap(rng, shards, len(train), overlap)
    result = []
    for device, idx in enumerate(shards):
        idx = rng.permutation(idx)  # scheme-assembled shards are grouped by class
        result.append(Shard(device, train.x[idx], train.y[idx]))
    return result


def _top_up(
    rng: np.random.Generator,
    own: np.ndarray,
    labels: _Labels,
    class_weights: np.ndarray,
    required: np.ndarray | None,
    min_samples: int,
) -> np.ndarray:
    """Reuse training samples so the shard holds its required classes and ``min_samples`` rows."""
    extra = []
    if required is not None:
        present = set(labels.pos[own].tolist())
        extra = [rng.choice(labels.members[c]) for c in required if c not in present]
    idx = np.concatenate([own, np.asarray(extra, dtype=np.int64)]).astype(np.int64)
    need = min_samples - len(idx)
    if need <= 0:
        return idx

    item_p = class_weights[labels.pos] / labels.counts[labels.pos]
    fresh_p = item_p.copy()
    fresh_p[idx] = 0.0
    # Prefer samples the device doesn't hold yet; repeat samples only when none are left.
    replace = np.count_nonzero(fresh_p) < need
    p = item_p if replace else fresh_p
    drawn = rng.choice(len(p), size=need, replace=replace, p=p / p.sum())
    return np.concatenate([idx, drawn])


def _apply_overlap(
    rng: np.random.Generator, shards: list[np.ndarray], num_rows: int, overlap: float
) -> list[np.ndarray]:
    """Make ~``overlap`` of each shard's rows come from one fleet-wide pool of inputs."""
    wanted = []
    for idx in shards:
        exact = overlap * len(idx)
        # Randomised rounding keeps the expected shared fraction exact on tiny shards.
        wanted.append(int(exact) + int(rng.random() < exact - int(exact)))

    fanout = min(SHARED_INPUT_FANOUT, len(shards))
    # At least every device's own demand, so no device runs short of distinct pool rows.
    pool_size = min(num_rows, max(max(wanted), math.ceil(sum(wanted) / fanout)))
    pool = rng.choice(num_rows, size=pool_size, replace=False)
    # Row masks instead of np.isin / np.setdiff1d (same results, the pool's rows being distinct).
    pooled = np.zeros(num_rows, dtype=bool)
    pooled[pool] = True
    sorted_pool = np.sort(pool)
    held = np.zeros(num_rows, dtype=bool)

    result = []
    for idx, count in zip(shards, wanted, strict=True):
        in_pool = pooled[idx]
        # Pool rows the device already holds count as shared; draw the rest from the pool.
        shared = idx[in_pool]
        missing = count - shared.size
        if missing > 0:
            held[idx] = True
            fresh = sorted_pool[~held[sorted_pool]]
            held[idx] = False
            shared = np.concatenate([shared, rng.choice(fresh, size=missing, replace=False)])
        private = rng.permutation(idx[~in_pool])[: idx.size - shared.size]
        result.append(np.concatenate([shared, private]))
    return result


def _validate_common(train: Dataset, num_devices: int, seed: int, overlap: float, min_samples: int) -> None:
    if len(train) == 0 or len(train.x) != len(train.y):
        raise ValueError("train must be a non-empty Dataset with as many x rows as labels")
    _require_int("num_devices", num_devices, minimum=1)
    _require_int("seed", seed, minimum=0)
    _require_int("min_samples", min_samples, minimum=0)
    if not 0.0 <= overlap <= 1.0:
        raise ValueError(f"overlap must be in [0, 1], got {overlap!r}")


def _is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _require_int(name: str, value: object, minimum: int) -> None:
    if not _is_int(value) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
