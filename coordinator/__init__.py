"""The fedsync coordinator: gRPC sync service, asynchronous aggregation, conflict resolution."""

from coordinator.server import AddressInUseError, Coordinator

__all__ = ["AddressInUseError", "Coordinator"]
