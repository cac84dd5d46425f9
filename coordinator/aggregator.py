"""Turns buffered deltas into new global model versions (asynchronously, staleness-aware).

Crash safety: a version's artifacts are written first (under a staging name, then renamed), and
only then is the version row inserted and its deltas marked aggregated, in one transaction.
A crash before that commit leaves the deltas buffered; the next run re-aggregates them into the
same version number, overwriting the orphaned folder. No delta is lost or counted twice.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import shutil
import threading
import time
from dataclasses import dataclass

import numpy as np

from coordinator.metrics import CoordinatorMetrics, NullMetrics
from coordinator.publisher import ModelPublisher
from coordinator.store import CoordinatorStore
from fedsync._failpoints import failpoint
from fedsync.aggregation import Strategy, Update
from fedsync.codecs import EncodedDelta, TensorSpec
from fedsync.manifest import Manifest
from fedsync.model import Weights

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PublishedVersion:
    version: int
    accuracy: float
    num_deltas: int
    rejected: int


def encoded_delta(codec: str, tensor_specs_json: str, payload: bytes) -> EncodedDelta:
    return EncodedDelta(codec, _tensor_specs(tensor_specs_json), payload)


@functools.lru_cache(maxsize=64)
def _tensor_specs(tensor_specs_json: str) -> tuple[TensorSpec, ...]:
    """Every delta of a fleet has the same specs: parsed once, and one tuple for all of them (a
    codec works out the layout of a tuple once)."""
    return tuple(
        TensorSpec(s["name"], tuple(s["shape"]), s.get("dtype", "float32")) for s in json.loads(tensor_specs_json)
    )


def aggregate_covering(strategy: Strategy, global_weights: Weights, updates: list[Update]) -> Weights:
    """Aggregate updates that may cover different tensors (a lean client sends only the head).

    Each tensor is reduced over the updates that cover it, with their staleness weights; a tensor
    no update covers is left as it is. When every update covers every tensor this is exactly
    `strategy.aggregate`, and takes its streaming path.
    """
    covered = [
        frozenset(u.delta.shapes()) if isinstance(u.delta, EncodedDelta) else frozenset(u.delta) for u in updates
    ]
    everything = frozenset(global_weights)
    if all(names == everything for names in covered):
        return {k: np.asarray(v, dtype=np.float32) for k, v in strategy.aggregate(global_weights, updates).items()}
    weights = np.array([strategy.weight(u) for u in updates], dtype=np.float64)
    decoded = [u.delta.decode() if isinstance(u.delta, EncodedDelta) else dict(u.delta) for u in updates]
    groups: dict[tuple[int, ...], list[str]] = {}
    for name in global_weights:
        covering = tuple(i for i, names in enumerate(covered) if name in names)
        groups.setdefault(covering, []).append(name)
    delta: Weights = {name: np.zeros_like(array) for name, array in global_weights.items()}
    for covering, names in groups.items():
        if not covering:
            continue
        subset = [
            Update(
                {n: decoded[i][n] for n in names}, updates[i].num_examples, updates[i].staleness, updates[i].device_id
            )
            for i in covering
        ]
        delta.update(strategy.rule.aggregate(subset, weights[list(covering)]))
    new_weights = strategy.optimizer.step(global_weights, delta)
    return {name: np.asarray(new_weights[name], dtype=np.float32) for name in global_weights}


class Aggregator:
    def __init__(
        self,
        store: CoordinatorStore,
        publisher: ModelPublisher,
        strategy: Strategy,
        metrics: CoordinatorMetrics | None = None,
        keep_versions: int = 5,
    ) -> None:
        self.keep_versions = keep_versions
        self.metrics = metrics or NullMetrics()
        self.store = store
        self.publisher = publisher
        self.strategy = strategy
        self._lock = threading.Lock()
        latest = store.latest_version()
        if latest is None:
            self.weights = publisher.initial_weights()
            manifest, manifest_json = publisher.publish_with_json(1, 0, self.weights)
            latest = (1, manifest_json)
            store.commit_version(1, 0, latest[1], manifest.metrics.get("accuracy"), [])
        else:
            self.weights = publisher.load_weights(latest[0])
        # The current version and its manifest, one attribute so that the service reads them together.
        self.published: tuple[int, bytes] = (latest[0], latest[1])

    def reference_weights(self) -> Weights:
        return self.weights

    def staleness_of(self, base_version: int) -> int:
        return self.version - base_version

    def maybe_aggregate(self, force: bool = False) -> PublishedVersion | None:
        """Aggregate the buffer into a new version when the strategy says so (or when forced)."""
        with self._lock:
            count, oldest_ns = self.store.buffered_count()
            if count == 0:
                return None
            age_s = (time.time_ns() - (oldest_ns or time.time_ns())) / 1e9
            if not force and not self.strategy.should_aggregate(count, age_s):
                return None
            return self._aggregate()

    def _aggregate(self) -> PublishedVersion | None:
        updates: list[Update] = []
        used: list[tuple[str, int, int]] = []
        rejected: list[tuple[str, int, str]] = []
        for delta in self.store.iter_buffered():
            staleness = self.version - delta.base_version
            reason = self.strategy.accepts(staleness)
            if reason is not None:
                rejected.append((delta.device_id, delta.seq, f"{reason} (staleness {staleness})"))
                continue
            updates.append(
                Update(
                    delta=encoded_delta(delta.codec, delta.tensor_specs, delta.payload),
                    num_examples=delta.num_examples,
                    staleness=staleness,
                    device_id=delta.device_id,
                )
            )
            used.append((delta.device_id, delta.seq, staleness))
        new_version = self.version + 1
        if not updates:
            self.store.commit_version_rejections(rejected)
            return None
        new_weights = aggregate_covering(self.strategy, self.weights, updates)
        failpoint("aggregator.before_publish")
        manifest, manifest_json = self.publisher.publish_with_json(new_version, self.version, new_weights)
        failpoint("aggregator.after_publish")
        self.store.commit_version(
            new_version, self.version, manifest_json, manifest.metrics.get("accuracy"), used, rejected
        )
        self.weights = new_weights
        self.published = (new_version, manifest_json)
        self.metrics.version_published()
        self.prune_versions()
        for _, _, reason in rejected:
            self.metrics.delta_rejected(reason.split(" ", 1)[0])
        log.info("published version %d from %d deltas (%d rejected)", new_version, len(used), len(rejected))
        return PublishedVersion(new_version, manifest.metrics.get("accuracy", float("nan")), len(used), len(rejected))

    def prune_versions(self) -> list[int]:
        """Delete the artifacts of old versions, keeping the newest `keep_versions` and every
        version a device still reports as its installed model or a buffered delta's base."""
        newest = set(range(self.version - self.keep_versions + 1, self.version + 1))
        with os.scandir(self.publisher.models_dir) as entries:
            older = [
                (int(entry.name[1:]), entry.path)
                for entry in entries
                if entry.name.startswith("v") and entry.name[1:].isdigit() and int(entry.name[1:]) not in newest
            ]
        if not older:
            return []
        in_use = self.store.versions_in_use()
        removed = []
        for version, path in older:
            if version not in in_use:
                shutil.rmtree(path, ignore_errors=True)
                removed.append(version)
        return sorted(removed)

    @property
    def version(self) -> int:
        return self.published[0]

    def current_manifest(self) -> Manifest:
        return Manifest.from_json(self.manifest_json)

    @property
    def manifest_json(self) -> bytes:
        return self.published[1]
