"""fedsync: federated offline sync with a conflict-resolution core."""

__version__ = "0.1.0"
