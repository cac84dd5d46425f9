"""The fedsync edge client: offline inference and fine-tuning, a durable journal, sync."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from client.edge import EdgeClient, JournalFullError, NoModelError, Prediction
from client.journal import Durability

if TYPE_CHECKING:
    from client.sync import SyncReport

__all__ = ["Durability", "EdgeClient", "JournalFullError", "NoModelError", "Prediction", "SyncReport"]


def __getattr__(name: str) -> Any:
    # client.sync imports grpc: loaded on first use, so a predict-only process starts without it.
    if name == "SyncReport":
        from client.sync import SyncReport

        return SyncReport
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
