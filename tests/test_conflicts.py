"""Unit and property tests for conflict policies, corrections and the array path."""

from __future__ import annotations

import hashlib
import math
import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedsync.conflicts import (
    ConflictPolicy,
    ConflictState,
    Correction,
    Observation,
    bench_merge_obs_per_s,
    confidence_weighted_vote,
    highest_confidence,
    precedence_key,
    resolve_highest_confidence_arrays,
)

HASHES = [hashlib.sha256(bytes([i])).digest() for i in range(4)]
H = HASHES[0]
POLICIES = [highest_confidence(), confidence_weighted_vote()]


def observations(hashes: list[bytes]) -> st.SearchStrategy[Observation]:
    # Few distinct values per field, so ties at every level of the tie-break chain
    # are common.
    return st.builds(
        Observation,
        input_hash=st.sampled_from(hashes),
        device_id=st.sampled_from(["a", "b", "c", "B", "a2"]),
        label=st.integers(0, 3),
        confidence=st.sampled_from([0.5, 0.7, 0.9]),
        model_version=st.integers(0, 2),
        time_ns=st.integers(0, 2),
    )


observation_lists = st.lists(observations(HASHES), max_size=40)
same_input_lists = st.lists(observations([H]), min_size=1, max_size=20)


def obs(
    device_id: str = "a",
    label: int = 0,
    confidence: float = 0.5,
    model_version: int = 1,
    time_ns: int = 0,
    input_hash: bytes = H,
) -> Observation:
    return Observation(input_hash, device_id, label, confidence, model_version, time_ns)


# --- Observation --------------------------------------------------------------------


def test_observation_is_a_frozen_value() -> None:
    first = obs()
    assert first == obs() and hash(first) == hash(obs())
    with pytest.raises(AttributeError):
        first.label = 1  # type: ignore[misc]


def test_observation_normalises_numeric_types() -> None:
    from_numpy = Observation(bytearray(H), "a", np.int64(2), np.float32(0.5), np.int32(3), np.uint64(4))
    native = Observation(H, "a", 2, 0.5, 3, 4)
    assert from_numpy == native
    assert type(from_numpy.input_hash) is bytes
    assert type(from_numpy.label) is int and type(from_numpy.confidence) is float
    assert math.copysign(1.0, obs(confidence=-0.0).confidence) == 1.0


@pytest.mark.parametrize(
    "field, value",
    [
        ("input_hash", b"short"),
        ("device_id", ""),
        ("confidence", math.nan),
        ("confidence", 1.5),
        ("confidence", -0.1),
        ("label", 1.0),
    ],
)
def test_observation_rejects_invalid_fields(field: str, value: object) -> None:
    fields = {
        "input_hash": H,
        "device_id": "a",
        "label": 0,
        "confidence": 0.5,
        "model_version": 1,
    }
    fields[field] = value
    with pytest.raises((ValueError, TypeError)):
        Observation(**fields)  # type: ignore[arg-type]


# --- highest_confidence -------------------------------------------------------------


def test_policies_satisfy_the_protocol_and_have_names() -> None:
    for policy in POLICIES:
        assert isinstance(policy, ConflictPolicy)
    assert highest_confidence().name == "highest_confidence"
    assert confidence_weighted_vote().name == "confidence_weighted_vote"
    assert highest_confidence() == highest_confidence()
    assert highest_confidence() != confidence_weighted_vote()


@pytest.mark.parametrize("policy", POLICIES, ids=lambda p: p.name)
def test_no_observations_no_winner(policy: ConflictPolicy) -> None:
    assert policy.winner([]) is None


@pytest.mark.parametrize("policy", POLICIES, ids=lambda p: p.name)
def test_policies_refuse_to_mix_inputs(policy: ConflictPolicy) -> None:
    with pytest.raises(ValueError, match="single input_hash"):
        policy.winner([obs(), obs(input_hash=HASHES[1])])


def test_highest_confidence_wins() -> None:
    strong = obs("z", label=1, confidence=0.9, model_version=0)
    assert highest_confidence().winner([obs("a", confidence=0.8), strong]) == strong


@pytest.mark.parametrize(
    "winner, loser",
    [
        (obs("z", model_version=2), obs("a", model_version=1)),  # newer model first
        (obs("a", label=3), obs("b", label=0)),  # then smaller device id
        (obs("B"), obs("a")),  # lexicographic: "B" < "a"
        (obs("a", label=0), obs("a", label=1)),  # then smaller label
        (obs("a", time_ns=1), obs("a", time_ns=2)),  # then earlier time
    ],
)
def test_highest_confidence_tie_break_chain(winner: Observation, loser: Observation) -> None:
    assert highest_confidence().winner([winner, loser]) == winner
    assert highest_confidence().winner([loser, winner]) == winner


@given(same_input_lists, st.randoms())
def test_highest_confidence_is_order_independent(candidates: list[Observation], rng: random.Random) -> None:
    shuffled = list(candidates)
    rng.shuffle(shuffled)
    expected = highest_confidence().winner(candidates)
    assert highest_confidence().winner(shuffled) == expected
    assert expected == min(candidates, key=precedence_key)


def _fields(o: Observation) -> tuple[bytes, str, int, float, int, int]:
    return (o.input_hash, o.device_id, o.label, o.confidence, o.model_version, o.time_ns)


# --- confidence_weighted_vote -------------------------------------------------------


def test_vote_prefers_many_moderate_votes_over_one_confident_vote() -> None:
    confident = obs("solo", label=1, confidence=1.0, model_version=9)
    crowd = [obs(device, label=2, confidence=0.4) for device in ("a", "b", "c")]
    assert highest_confidence().winner([confident, *crowd]) == confident
    winner = confidence_weighted_vote().winner([confident, *crowd])
    assert winner is not None and winner.label == 2


def test_vote_returns_the_strongest_observation_of_the_winning_label() -> None:
    weak, strong = obs("b", label=2, confidence=0.4), obs("c", label=2, confidence=0.6)
    winner = confidence_weighted_vote().winner([obs("a", label=1, confidence=0.9), weak, strong])
    assert winner == strong


def test_vote_ignores_duplicate_stuffing_by_one_device() -> None:
    stuffing = [
        obs("mallory", label=1, confidence=0.9, model_version=v, time_ns=t) for v in range(3) for t in range(10)
    ]
    honest = [obs("a", label=2, confidence=0.5), obs("b", label=2, confidence=0.5)]
    winner = confidence_weighted_vote().winner([*stuffing, *honest])
    assert winner is not None and winner.label == 2  # 1.0 beats one vote of 0.9


def test_vote_counts_a_device_once_per_label_at_its_highest_confidence() -> None:
    # "a" votes 0.3 and 0.8 for label 1 -> counts 0.8, beating "b" + "c" at 0.35 each.
    votes = [
        obs("a", label=1, confidence=0.3),
        obs("a", label=1, confidence=0.8, time_ns=5),
        obs("b", label=2, confidence=0.35),
        obs("c", label=2, confidence=0.35),
    ]
    winner = confidence_weighted_vote().winner(votes)
    assert winner == obs("a", label=1, confidence=0.8, time_ns=5)


def test_vote_tie_is_broken_by_the_labels_strongest_observation() -> None:
    label_1 = [obs("a", label=1, confidence=0.5), obs("b", label=1, confidence=0.5)]
    label_2 = [obs("c", label=2, confidence=1.0, model_version=0)]
    winner = confidence_weighted_vote().winner([*label_1, *label_2])
    assert winner == label_2[0]  # equal mass 1.0; 1.0 confidence outranks 0.5


@given(same_input_lists, st.randoms())
def test_vote_is_order_independent(candidates: list[Observation], rng: random.Random) -> None:
    shuffled = list(candidates)
    rng.shuffle(shuffled)
    policy = confidence_weighted_vote()
    assert policy.winner(shuffled) == policy.winner(candidates)


# --- corrections --------------------------------------------------------------------


@pytest.mark.parametrize("policy", POLICIES, ids=lambda p: p.name)
@settings(max_examples=150, deadline=None)
@given(observation_lists, st.randoms())
def test_corrections_one_per_disagreeing_device_and_hash(
    policy: ConflictPolicy, batch: list[Observation], rng: random.Random
) -> None:
    state = ConflictState(policy=policy, observations=batch)
    corrections = state.corrections()

    expected = set()
    for input_hash, winner in state.winners().items():
        for o in state.observations(input_hash):
            if o.label != winner.label:
                expected.add(Correction(o.device_id, input_hash, winner.label, winner.confidence, winner.model_version))
    assert set(corrections) == expected
    keys = [(c.device_id, c.input_hash) for c in corrections]
    assert len(keys) == len(set(keys))
    assert keys == sorted(keys)

    agreeing = {
        (o.device_id, o.input_hash)
        for o in batch
        if all(
            other.label == state.winner(o.input_hash).label  # type: ignore[union-attr]
            for other in batch
            if (other.device_id, other.input_hash) == (o.device_id, o.input_hash)
        )
    }
    assert agreeing.isdisjoint(keys)

    shuffled = list(batch)
    rng.shuffle(shuffled)
    assert ConflictState(policy=policy, observations=shuffled).corrections() == corrections


def test_corrections_example() -> None:
    winner = obs("a", label=1, confidence=0.9)
    state = ConflictState(
        observations=[
            winner,
            obs("b", label=1, confidence=0.6),  # agrees: no correction
            obs("c", label=2, confidence=0.5),
            obs("c", label=3, confidence=0.4),  # same device and hash: one correction
            obs("d", label=2, confidence=0.2, input_hash=HASHES[1]),  # alone: it wins
        ]
    )
    assert state.corrections() == [Correction("c", H, 1, 0.9, 1)]


# --- ConflictState basics -----------------------------------------------------------


def test_state_add_reports_changed_winners() -> None:
    state = ConflictState(policy=highest_confidence())
    first = obs("a", confidence=0.5)
    assert state.add(first) == {H}
    assert state.add(first) == set()  # idempotent
    assert state.add(obs("b", confidence=0.4)) == set()  # weaker: winner unchanged
    assert state.add_many([obs("c", confidence=0.9), obs("d", input_hash=HASHES[1])]) == {
        H,
        HASHES[1],
    }
    assert state.winner(H) == obs("c", confidence=0.9)
    assert state.winner(HASHES[2]) is None
    assert len(state) == 4
    assert obs("b", confidence=0.4) in state and obs("z") not in state
    assert list(state.winners()) == sorted([H, HASHES[1]])


def test_state_add_many_does_not_report_a_winner_that_changed_back() -> None:
    state = ConflictState(policy=confidence_weighted_vote(), observations=[obs("a", label=1)])
    # Label 2 leads after the first new vote, label 1 leads again after the second.
    changed = state.add_many([obs("b", label=2, confidence=0.6), obs("c", label=1, confidence=0.2)])
    assert changed == set()


def test_state_rejects_non_observations_and_stays_consistent() -> None:
    state = ConflictState(policy=confidence_weighted_vote())
    with pytest.raises(TypeError):
        state.add_many([obs("a"), "not an observation"])  # type: ignore[list-item]
    assert state.winner(H) == obs("a")


def test_state_iterates_deterministically() -> None:
    batch = [obs("b", input_hash=HASHES[1]), obs("a", confidence=0.2), obs("c", confidence=0.8)]
    state = ConflictState(observations=batch)
    expected = sorted(batch, key=lambda o: (o.input_hash, precedence_key(o)))
    assert list(state) == expected
    assert list(ConflictState(observations=reversed(batch))) == expected


def test_merge_refuses_different_policies() -> None:
    with pytest.raises(ValueError, match="different policies"):
        ConflictState(policy=highest_confidence()).merge(ConflictState(policy=confidence_weighted_vote()))


def test_state_equality_is_by_content() -> None:
    assert ConflictState(observations=[obs()]) == ConflictState(observations=[obs(), obs()])
    assert ConflictState(observations=[obs()]) != ConflictState()
    assert ConflictState() != ConflictState(policy=confidence_weighted_vote())


# --- array fast path ----------------------------------------------------------------


def _as_arrays(
    batch: list[Observation],
) -> tuple[list[bytes], list[np.ndarray]]:
    hash_table = sorted({o.input_hash for o in batch})
    device_rank = {device: rank for rank, device in enumerate(sorted({o.device_id for o in batch}))}
    hash_id = {h: i for i, h in enumerate(hash_table)}
    columns = [
        np.array([hash_id[o.input_hash] for o in batch], dtype=np.int64),
        np.array([device_rank[o.device_id] for o in batch], dtype=np.int64),
        np.array([o.label for o in batch], dtype=np.int64),
        np.array([o.confidence for o in batch], dtype=np.float32),
        np.array([o.model_version for o in batch], dtype=np.int64),
        np.array([o.time_ns for o in batch], dtype=np.int64),
    ]
    return hash_table, columns


@settings(max_examples=200, deadline=None)
@given(observation_lists)
def test_array_path_equals_object_path(batch: list[Observation]) -> None:
    expected = ConflictState(policy=highest_confidence(), observations=batch).winners()
    hash_table, columns = _as_arrays(batch)

    hash_ids, winner_rows = resolve_highest_confidence_arrays(*columns)
    assert [hash_table[i] for i in hash_ids] == list(expected)
    assert [batch[row] for row in winner_rows] == list(expected.values())

    # Without time_ns, winners agree on everything but time.
    hash_ids, winner_rows = resolve_highest_confidence_arrays(*columns[:5])
    assert [hash_table[i] for i in hash_ids] == list(expected)
    assert [_fields(batch[row])[:5] for row in winner_rows] == [_fields(winner)[:5] for winner in expected.values()]


def test_array_path_on_empty_input_and_bad_shapes() -> None:
    hash_ids, winner_rows = resolve_highest_confidence_arrays([], [], [], [], [])
    assert hash_ids.size == 0 and winner_rows.size == 0
    with pytest.raises(ValueError, match="same length"):
        resolve_highest_confidence_arrays([0, 1], [0], [0], [0.5], [0])
    with pytest.raises(ValueError, match="NaN"):
        resolve_highest_confidence_arrays([0], [0], [0], [math.nan], [0])


def test_array_path_without_time_prefers_lowest_row_on_full_tie() -> None:
    hash_ids, winner_rows = resolve_highest_confidence_arrays(
        [7, 7, 3], [1, 1, 0], [0, 0, 0], [0.5, 0.5, 0.1], [1, 1, 1]
    )
    assert hash_ids.tolist() == [3, 7]
    assert winner_rows.tolist() == [2, 0]


def test_bench_runs_and_reports_throughput() -> None:
    assert bench_merge_obs_per_s(n_obs=20_000, n_hashes=2_000, seed=1) > 0
