"""The fedsync coordinator: gRPC sync service, asynchronous aggregation, conflict resolution.

`Coordinator` is imported lazily: it brings TensorFlow (for publishing models), which the store,
the auth and the metrics modules don't need.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from coordinator.server import AddressInUseError, Coordinator

__all__ = ["AddressInUseError", "Coordinator"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from coordinator import server

        return getattr(server, name)
    raise AttributeError(f"module 'coordinator' has no attribute {name!r}")
