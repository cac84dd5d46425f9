"""Deterministic conflict resolution for labels predicted by many devices.

Several devices may predict different labels for the same input (identified by
its sha256). A :class:`ConflictState` keeps every :class:`Observation` per input
as a grow-only set, a state-based CRDT, and resolves one winner per input with a
:class:`ConflictPolicy`; devices that disagreed with the winner get a
:class:`Correction`.

    state = ConflictState(policy=highest_confidence())
    changed = state.add_many(observations)
    merged = state.merge(other_coordinator_state)
    for correction in merged.corrections(): ...

:func:`resolve_highest_confidence_arrays` is the vectorised equivalent of
``highest_confidence()`` for bulk resolution.
"""

from fedsync.conflicts._arrays import resolve_highest_confidence_arrays
from fedsync.conflicts._bench import bench_merge_obs_per_s
from fedsync.conflicts._model import (
    INPUT_HASH_SIZE,
    Correction,
    Observation,
    precedence_key,
)
from fedsync.conflicts._policies import (
    ConfidenceWeightedVote,
    ConflictPolicy,
    HighestConfidence,
    confidence_weighted_vote,
    highest_confidence,
)
from fedsync.conflicts._state import ConflictState

__all__ = [
    "INPUT_HASH_SIZE",
    "ConfidenceWeightedVote",
    "ConflictPolicy",
    "ConflictState",
    "Correction",
    "HighestConfidence",
    "Observation",
    "bench_merge_obs_per_s",
    "confidence_weighted_vote",
    "highest_confidence",
    "precedence_key",
    "resolve_highest_confidence_arrays",
]
