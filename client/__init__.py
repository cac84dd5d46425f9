"""The fedsync edge client: offline inference and fine-tuning, a durable journal, sync."""

from client.edge import EdgeClient, JournalFullError, NoModelError, Prediction
from client.journal import Durability
from client.sync import SyncReport

__all__ = ["Durability", "EdgeClient", "JournalFullError", "NoModelError", "Prediction", "SyncReport"]
