"""Vectorised bulk resolution under the highest-confidence policy."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt


def resolve_highest_confidence_arrays(
    hash_ids: npt.ArrayLike,
    device_ids: npt.ArrayLike,
    labels: npt.ArrayLike,
    confidences: npt.ArrayLike,
    model_versions: npt.ArrayLike,
    time_ns: npt.ArrayLike | None = None,
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.intp]]:
    """Resolve every input's winner at once, exactly as ``highest_confidence()`` does.

    Row ``i`` of the parallel 1-D arrays is one observation. ``hash_ids`` and
    ``device_ids`` are integer codes; for results identical to the object policy,
    ``device_ids`` must be the ranks of the device-id strings in sorted order
    (a smaller code wins a tie, as the smaller string does). Without ``time_ns``,
    rows that tie on every other column resolve to the lowest row index.

    Returns ``(unique_hash_ids, winner_index)``: the distinct hash ids in ascending
    order and, aligned with them, the row index of each one's winner.
    """
    hashes = np.asarray(hash_ids, dtype=np.int64)
    devices = np.asarray(device_ids, dtype=np.int64)
    label_codes = np.asarray(labels, dtype=np.int64)
    confidence = np.asarray(confidences, dtype=np.float64)
    versions = np.asarray(model_versions, dtype=np.int64)
    times = None if time_ns is None else np.asarray(time_ns, dtype=np.int64)
    columns = [hashes, devices, label_codes, confidence, versions]
    if times is not None:
        columns.append(times)
    if any(column.ndim != 1 or len(column) != len(hashes) for column in columns):
        raise ValueError("all columns must be 1-D arrays of the same length")
    if np.isnan(confidence).any():
        raise ValueError("confidences must not be NaN")
    if len(hashes) == 0:
        return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.intp)

    # A full lexsort over every tie-break column is ~5x slower than this: only
    # rows carrying their input's top confidence can win, and those are few.
    by_hash = np.argsort(hashes, kind="stable")
    sorted_hashes = hashes[by_hash]
    sorted_confidence = confidence[by_hash]
    group_starts = np.flatnonzero(np.r_[True, sorted_hashes[1:] != sorted_hashes[:-1]])
    group_top = np.maximum.reduceat(sorted_confidence, group_starts)
    group_sizes = np.diff(np.r_[group_starts, len(hashes)])
    candidates = by_hash[sorted_confidence == np.repeat(group_top, group_sizes)]

    # Candidates of one input share its top confidence, so the confidence key is
    # not needed; np.lexsort sorts by its last key first.
    tie_breaks = [label_codes[candidates], devices[candidates], -versions[candidates]]
    if times is not None:
        tie_breaks.insert(0, times[candidates])
    order = np.lexsort((*tie_breaks, hashes[candidates]))
    ranked = candidates[order]
    ranked_hashes = hashes[ranked]
    firsts = np.r_[True, ranked_hashes[1:] != ranked_hashes[:-1]]
    return ranked_hashes[firsts], ranked[firsts]
