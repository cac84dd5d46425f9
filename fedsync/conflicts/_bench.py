"""Throughput benchmark for sharded resolution followed by a merge."""

from __future__ import annotations

import time

import numpy as np

from fedsync.conflicts._arrays import resolve_highest_confidence_arrays

CONFIDENCE_LEVELS = 1_000  # coarse enough that confidence ties actually occur


def bench_merge_obs_per_s(
    n_obs: int = 1_000_000,
    n_hashes: int = 100_000,
    seed: int = 0,
    *,
    n_shards: int = 4,
    n_devices: int = 1_000,
    n_labels: int = 10,
) -> float:
    """Observations resolved per second when shards are resolved, then merged.

    Generates ``n_obs`` random observations over ``n_hashes`` inputs and deals
    them at random to ``n_shards`` shards, standing in for coordinators that each
    received part of the traffic. The timed region is what such a deployment
    pays: every shard resolves its winners with
    :func:`resolve_highest_confidence_arrays`, then the shards' winners are
    gathered and resolved once more. That second pass is the merge: under
    ``highest_confidence`` the winner of a union is the winner among the parts'
    winners. Data generation, sharding and a check that the merged winners equal a
    single pass over all observations are not timed. Returns ``n_obs`` divided by
    the timed seconds.
    """
    if n_obs <= 0 or n_hashes <= 0 or n_shards <= 0:
        raise ValueError("n_obs, n_hashes and n_shards must be positive")
    rng = np.random.default_rng(seed)
    columns = (
        rng.integers(0, n_hashes, n_obs),  # hash ids
        rng.integers(0, n_devices, n_obs),  # device ranks
        rng.integers(0, n_labels, n_obs),  # labels
        rng.integers(1, CONFIDENCE_LEVELS + 1, n_obs) / CONFIDENCE_LEVELS,
        rng.integers(0, 5, n_obs),  # model versions
        rng.permutation(n_obs),  # arrival times; distinct, so winners are unique
    )
    shard_of_row = rng.integers(0, n_shards, n_obs)
    shard_rows = [np.flatnonzero(shard_of_row == shard) for shard in range(n_shards)]
    shards = [tuple(column[rows] for column in columns) for rows in shard_rows]

    start = time.perf_counter()
    shard_winner_rows = []
    for rows, shard in zip(shard_rows, shards, strict=True):
        _, local_winners = resolve_highest_confidence_arrays(*shard)
        shard_winner_rows.append(rows[local_winners])
    finalists = np.concatenate(shard_winner_rows)
    merged_hashes, local_winners = resolve_highest_confidence_arrays(*(column[finalists] for column in columns))
    merged_winners = finalists[local_winners]
    elapsed = time.perf_counter() - start

    single_pass_hashes, single_pass_winners = resolve_highest_confidence_arrays(*columns)
    if not (np.array_equal(merged_hashes, single_pass_hashes) and np.array_equal(merged_winners, single_pass_winners)):
        raise AssertionError("sharded resolution disagrees with a single pass")
    return n_obs / elapsed
