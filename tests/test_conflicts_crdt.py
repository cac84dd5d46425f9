"""CRDT properties of ConflictState: convergence under any delivery, merge laws."""

from __future__ import annotations

import hashlib
import random
from functools import reduce

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedsync.conflicts import (
    ConflictPolicy,
    ConflictState,
    Observation,
    confidence_weighted_vote,
    highest_confidence,
)

HASHES = [hashlib.sha256(bytes([i])).digest() for i in range(3)]
POLICIES = [highest_confidence(), confidence_weighted_vote()]
by_policy = pytest.mark.parametrize("policy", POLICIES, ids=lambda p: p.name)
fast = settings(max_examples=100, deadline=None)

observations = st.builds(
    Observation,
    input_hash=st.sampled_from(HASHES),
    device_id=st.sampled_from(["a", "b", "c", "B"]),
    label=st.integers(0, 2),
    confidence=st.sampled_from([0.5, 0.7, 0.9]),
    model_version=st.integers(0, 1),
    time_ns=st.integers(0, 1),
)
observation_lists = st.lists(observations, max_size=30)


def state_of(policy: ConflictPolicy, batch: list[Observation]) -> ConflictState:
    return ConflictState(policy=policy, observations=batch)


def merge_in_random_tree(states: list[ConflictState], rng: random.Random) -> ConflictState:
    """Merge adjacent pairs chosen at random: reaches every binary tree shape."""
    states = list(states)
    while len(states) > 1:
        i = rng.randrange(len(states) - 1)
        states[i : i + 2] = [states[i].merge(states[i + 1])]
    return states[0]


@by_policy
@fast
@given(observation_lists, st.integers(1, 5), st.randoms())
def test_winners_survive_permutation_duplication_and_partition(
    policy: ConflictPolicy, batch: list[Observation], n_parts: int, rng: random.Random
) -> None:
    reference = state_of(policy, batch)

    delivered = batch + [rng.choice(batch) for _ in range(len(batch) // 2)] if batch else []
    rng.shuffle(delivered)
    parts: list[list[Observation]] = [[] for _ in range(n_parts)]
    for o in delivered:
        parts[rng.randrange(n_parts)].append(o)
    # Some observations reach more than one part, as with at-least-once delivery.
    for o in rng.sample(delivered, k=min(3, len(delivered))):
        parts[rng.randrange(n_parts)].append(o)

    incremental = ConflictState(policy=policy)
    for o in delivered:
        incremental.add(o)
    merged = merge_in_random_tree([state_of(policy, part) for part in parts], rng)

    for candidate in (incremental, merged):
        assert candidate == reference
        assert candidate.winners() == reference.winners()
        assert candidate.corrections() == reference.corrections()
        assert len(candidate) == len(set(batch))


@by_policy
@fast
@given(observation_lists, observation_lists, observation_lists)
def test_merge_is_commutative_associative_idempotent(
    policy: ConflictPolicy, a: list[Observation], b: list[Observation], c: list[Observation]
) -> None:
    sa, sb, sc = (state_of(policy, batch) for batch in (a, b, c))

    assert sa.merge(sb) == sb.merge(sa)
    assert sa.merge(sb).winners() == sb.merge(sa).winners()
    assert sa.merge(sb).merge(sc) == sa.merge(sb.merge(sc))
    assert sa.merge(sb).merge(sc).winners() == sa.merge(sb.merge(sc)).winners()
    assert sa.merge(sa) == sa and sa.merge(sa).winners() == sa.winners()
    assert sa.merge(sb).merge(sb) == sa.merge(sb)
    assert sa | sb == sa.merge(sb)


@by_policy
@fast
@given(observation_lists, observation_lists)
def test_two_coordinators_merged_equal_one_coordinator(
    policy: ConflictPolicy, first: list[Observation], second: list[Observation]
) -> None:
    merged = state_of(policy, first).merge(state_of(policy, second))
    single = state_of(policy, first + second)
    assert merged == single
    assert merged.winners() == single.winners()
    assert merged.corrections() == single.corrections()
    assert len(merged) == len(set(first) | set(second))


@by_policy
@fast
@given(observation_lists, observation_lists, observation_lists)
def test_merge_leaves_its_inputs_untouched(
    policy: ConflictPolicy,
    first: list[Observation],
    second: list[Observation],
    later: list[Observation],
) -> None:
    sa, sb = state_of(policy, first), state_of(policy, second)
    merged = sa.merge(sb)
    merged.add_many(later)
    assert sa == state_of(policy, first) and sb == state_of(policy, second)


@by_policy
@fast
@given(observation_lists, st.lists(observations, max_size=10))
def test_add_reports_exactly_the_hashes_whose_winner_changed(
    policy: ConflictPolicy, history: list[Observation], batch: list[Observation]
) -> None:
    state = state_of(policy, history)
    before = state.winners()
    changed = state.add_many(batch)
    after = state.winners()
    assert changed == {h for h in after if before.get(h) != after[h]}

    # One at a time, each report matches the winner moving.
    stepwise = state_of(policy, history)
    for o in batch:
        winner_before = stepwise.winner(o.input_hash)
        changed = stepwise.add(o)
        moved = stepwise.winner(o.input_hash) != winner_before
        assert changed == ({o.input_hash} if moved else set())
    assert stepwise == state


def test_merging_many_shards_matches_one_state_for_both_policies() -> None:
    rng = random.Random(0)
    batch = [
        Observation(
            input_hash=rng.choice(HASHES),
            device_id=f"device-{rng.randrange(20)}",
            label=rng.randrange(4),
            confidence=rng.choice([0.5, 0.7, 0.9]),
            model_version=rng.randrange(3),
            time_ns=rng.randrange(5),
        )
        for _ in range(2_000)
    ]
    for policy in POLICIES:
        shards = [state_of(policy, batch[i::7]) for i in range(7)]
        merged = reduce(ConflictState.merge, shards)
        assert merged == state_of(policy, batch)
        assert merged.winners() == state_of(policy, batch).winners()
