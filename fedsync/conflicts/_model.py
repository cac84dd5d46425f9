"""Value types shared by the conflict policies and the CRDT state."""

from __future__ import annotations

import operator
from dataclasses import dataclass

INPUT_HASH_SIZE = 32  # sha256 digest


@dataclass(frozen=True, slots=True)
class Observation:
    """One device's prediction for one input, identified by the input's sha256."""

    input_hash: bytes
    device_id: str
    label: int
    confidence: float
    model_version: int
    time_ns: int = 0

    def __post_init__(self) -> None:
        input_hash = bytes(self.input_hash)
        if len(input_hash) != INPUT_HASH_SIZE:
            raise ValueError(f"input_hash must be a {INPUT_HASH_SIZE}-byte sha256 digest, got {len(input_hash)} bytes")
        if not isinstance(self.device_id, str) or not self.device_id:
            raise ValueError("device_id must be a non-empty str")
        confidence = float(self.confidence)
        # NaN would break the total order the policies rely on.
        if not 0.0 <= confidence <= 1.0:
            raise ValueError(f"confidence must be within [0, 1], got {confidence!r}")
        # Normalising (numpy scalars -> int/float, -0.0 -> 0.0) keeps equal
        # observations equal and identically represented, whatever their source.
        object.__setattr__(self, "input_hash", input_hash)
        object.__setattr__(self, "label", int(operator.index(self.label)))
        object.__setattr__(self, "confidence", confidence + 0.0)
        object.__setattr__(self, "model_version", int(operator.index(self.model_version)))
        object.__setattr__(self, "time_ns", int(operator.index(self.time_ns)))


@dataclass(frozen=True, slots=True)
class Correction:
    """Tells a device that the resolved label for an input differs from its own."""

    device_id: str
    input_hash: bytes
    label: int
    confidence: float
    model_version: int


PrecedenceKey = tuple[float, int, str, int, int]


def precedence_key(observation: Observation) -> PrecedenceKey:
    """Sort key under which the strongest observation of an input sorts first.

    Higher confidence, then higher model version, then the lexicographically
    smaller device id, then the smaller label, then the earlier time. Every field
    but ``input_hash`` takes part, so among the observations of one input the
    order is total: distinct observations never tie.
    """
    return (
        -observation.confidence,
        -observation.model_version,
        observation.device_id,
        observation.label,
        observation.time_ns,
    )


def require_single_input(observations: list[Observation]) -> None:
    if observations:
        input_hash = observations[0].input_hash
        if any(obs.input_hash != input_hash for obs in observations):
            raise ValueError("a policy resolves observations of a single input_hash")
