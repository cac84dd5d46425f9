"""The fedsync edge client: offline inference and fine-tuning, a durable journal, sync."""

from client.edge import EdgeClient, NoModelError, Prediction
from client.journal import Durability
from client.sync import SyncReport

__all__ = ["Durability", "EdgeClient", "NoModelError", "Prediction", "SyncReport"]
