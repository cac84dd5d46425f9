"""ConflictState: a state-based CRDT of observations with cached winners."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from fedsync.conflicts._model import Correction, Observation, precedence_key
from fedsync.conflicts._policies import ConflictPolicy, HighestConfidence


class ConflictState:
    """A grow-only set of observations per input hash, plus each hash's winner.

    The observation set is the CRDT payload: ``merge`` is set union, so it is
    commutative, associative and idempotent, and since a policy's winner is a
    function of the set alone, replicas holding the same observations resolve the
    same winners whatever the order, duplication or partitioning of delivery.

    Winners are cached per hash. Under :class:`HighestConfidence` a new
    observation only has to be compared with the cached winner; other policies
    re-resolve the hash's whole (usually small) set when it grows.
    """

    __slots__ = ("_observations_by_hash", "_policy", "_size", "_winners")

    def __init__(
        self,
        policy: ConflictPolicy | None = None,
        observations: Iterable[Observation] = (),
    ) -> None:
        self._policy: ConflictPolicy = HighestConfidence() if policy is None else policy
        self._observations_by_hash: dict[bytes, set[Observation]] = {}
        self._winners: dict[bytes, Observation] = {}
        self._size = 0
        self.add_many(observations)

    @property
    def policy(self) -> ConflictPolicy:
        return self._policy

    @property
    def _resolves_incrementally(self) -> bool:
        return isinstance(self._policy, HighestConfidence)

    def add(self, observation: Observation) -> set[bytes]:
        """Add one observation; return the input hashes whose winner changed."""
        return self.add_many((observation,))

    def add_many(self, observations: Iterable[Observation]) -> set[bytes]:
        """Add observations; return the input hashes whose winner changed.

        A winner that changes and changes back within the batch is not reported.
        """
        previous_winners: dict[bytes, Observation | None] = {}
        incremental = self._resolves_incrementally
        try:
            for obs in observations:
                if not isinstance(obs, Observation):
                    raise TypeError(f"expected Observation, got {type(obs).__name__}")
                bucket = self._observations_by_hash.setdefault(obs.input_hash, set())
                if obs in bucket:
                    continue
                if obs.input_hash not in previous_winners:
                    previous_winners[obs.input_hash] = self._winners.get(obs.input_hash)
                bucket.add(obs)
                self._size += 1
                if incremental:
                    current = self._winners.get(obs.input_hash)
                    if current is None or precedence_key(obs) < precedence_key(current):
                        self._winners[obs.input_hash] = obs
        finally:
            # Observations added before a failure stay, so their winners must too.
            if not incremental:
                for input_hash in previous_winners:
                    self._resolve(input_hash)
        return {
            input_hash for input_hash, previous in previous_winners.items() if self._winners.get(input_hash) != previous
        }

    def merge(self, other: ConflictState) -> ConflictState:
        """Return a new state holding the union of both states' observations."""
        if not isinstance(other, ConflictState):
            raise TypeError(f"cannot merge ConflictState with {type(other).__name__}")
        if other._policy != self._policy:
            raise ValueError(
                f"cannot merge states resolved by different policies: {self._policy!r} vs {other._policy!r}"
            )
        merged = ConflictState(self._policy)
        incremental = self._resolves_incrementally
        for input_hash in self._observations_by_hash.keys() | other._observations_by_hash.keys():
            ours = self._observations_by_hash.get(input_hash, set())
            theirs = other._observations_by_hash.get(input_hash, set())
            bucket = ours | theirs
            merged._observations_by_hash[input_hash] = bucket
            merged._size += len(bucket)
            if len(bucket) == len(ours):
                winner = self._winners.get(input_hash)
            elif len(bucket) == len(theirs):
                winner = other._winners.get(input_hash)
            elif incremental:
                winner = min(self._winners[input_hash], other._winners[input_hash], key=precedence_key)
            else:
                winner = self._policy.winner(bucket)
            if winner is not None:
                merged._winners[input_hash] = winner
        return merged

    __or__ = merge

    def winner(self, input_hash: bytes) -> Observation | None:
        return self._winners.get(input_hash)

    def winners(self) -> dict[bytes, Observation]:
        """Winner per input hash, in ascending input-hash order."""
        return {input_hash: self._winners[input_hash] for input_hash in sorted(self._winners)}

    def observations(self, input_hash: bytes) -> frozenset[Observation]:
        return frozenset(self._observations_by_hash.get(input_hash, ()))

    def corrections(self) -> list[Correction]:
        """One correction per (device, input hash) where the device saw another label.

        A device counts as disagreeing if *any* of its observations for the hash
        carries a label other than the winner's: it may still hold that stale
        prediction, and re-sending the winning label is harmless. Ordered by
        device id, then input hash, so each device's corrections are contiguous.
        """
        corrections = []
        for input_hash, winner in self._winners.items():
            disagreeing_devices = {
                obs.device_id for obs in self._observations_by_hash[input_hash] if obs.label != winner.label
            }
            corrections.extend(
                Correction(
                    device_id=device_id,
                    input_hash=input_hash,
                    label=winner.label,
                    confidence=winner.confidence,
                    model_version=winner.model_version,
                )
                for device_id in disagreeing_devices
            )
        corrections.sort(key=lambda correction: (correction.device_id, correction.input_hash))
        return corrections

    def _resolve(self, input_hash: bytes) -> None:
        winner = self._policy.winner(self._observations_by_hash[input_hash])
        if winner is None:
            self._winners.pop(input_hash, None)
        else:
            self._winners[input_hash] = winner

    def __len__(self) -> int:
        return self._size

    def __iter__(self) -> Iterator[Observation]:
        """Observations ordered by input hash, strongest first within a hash."""
        for input_hash in sorted(self._observations_by_hash):
            yield from sorted(self._observations_by_hash[input_hash], key=precedence_key)

    def __contains__(self, observation: object) -> bool:
        if not isinstance(observation, Observation):
            return False
        return observation in self._observations_by_hash.get(observation.input_hash, ())

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ConflictState):
            return NotImplemented
        return self._policy == other._policy and self._observations_by_hash == other._observations_by_hash

    __hash__ = None  # type: ignore[assignment]  # mutable

    def __repr__(self) -> str:
        return (
            f"ConflictState(policy={self._policy!r}, observations={self._size}, "
            f"input_hashes={len(self._observations_by_hash)})"
        )
