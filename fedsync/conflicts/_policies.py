"""Conflict policies: pick one winning observation among those for one input.

Policies are small immutable values. Two policies are interchangeable exactly when
they compare equal, which is what lets :class:`ConflictState` refuse to merge
states resolved under different rules.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import ClassVar, Protocol, runtime_checkable

from fedsync.conflicts._model import Observation, precedence_key, require_single_input


@runtime_checkable
class ConflictPolicy(Protocol):
    """Resolves the observations of a single input hash to one winner.

    ``winner`` must depend only on the *set* of observations it is given (not on
    their order or multiplicity); that is what makes :class:`ConflictState`
    converge whatever the arrival order.
    """

    @property
    def name(self) -> str: ...

    def winner(self, observations: Iterable[Observation]) -> Observation | None: ...


@dataclass(frozen=True, slots=True)
class HighestConfidence:
    """The single strongest observation under :func:`precedence_key` wins."""

    name: ClassVar[str] = "highest_confidence"

    def winner(self, observations: Iterable[Observation]) -> Observation | None:
        candidates = list(observations)
        require_single_input(candidates)
        return min(candidates, key=precedence_key, default=None)


@dataclass(frozen=True, slots=True)
class ConfidenceWeightedVote:
    """The label with the largest confidence mass across devices wins.

    Each device contributes once per label, with its highest confidence for that
    label, so repeating an observation cannot stuff the ballot. Equal masses are
    settled by comparing each label's strongest observation under
    :func:`precedence_key`; that observation is also what ``winner`` returns.
    """

    name: ClassVar[str] = "confidence_weighted_vote"

    def winner(self, observations: Iterable[Observation]) -> Observation | None:
        candidates = list(observations)
        require_single_input(candidates)
        strongest_by_label: dict[int, Observation] = {}
        vote_by_device_label: dict[tuple[str, int], float] = {}
        for obs in candidates:
            ballot = (obs.device_id, obs.label)
            vote_by_device_label[ballot] = max(obs.confidence, vote_by_device_label.get(ballot, 0.0))
            strongest = strongest_by_label.get(obs.label)
            if strongest is None or precedence_key(obs) < precedence_key(strongest):
                strongest_by_label[obs.label] = obs
        votes_by_label: dict[int, list[float]] = {}
        for (_, label), vote in vote_by_device_label.items():
            votes_by_label.setdefault(label, []).append(vote)
        # fsum is exactly rounded, hence independent of summation order.
        return min(
            strongest_by_label.values(),
            key=lambda obs: (-math.fsum(votes_by_label[obs.label]), precedence_key(obs)),
            default=None,
        )


def highest_confidence() -> HighestConfidence:
    """Default policy: the most confident observation wins (see :func:`precedence_key`)."""
    return HighestConfidence()


def confidence_weighted_vote() -> ConfidenceWeightedVote:
    """Policy: devices vote with their confidence; the heaviest label wins."""
    return ConfidenceWeightedVote()
