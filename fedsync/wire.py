"""Conventions shared by both ends of the wire that the .proto cannot express."""

from __future__ import annotations

import re

DEVICE_METADATA_KEY = "x-fedsync-device"
DEVICE_ID_PATTERN = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
# Larger than any single message we send (event batches and 1 MiB chunks), with headroom.
MAX_MESSAGE_BYTES = 16 * 1024 * 1024
INPUT_HASH_BYTES = 32


def channel_options() -> list[tuple[str, int]]:
    return [
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ]


def valid_device_id(device_id: str) -> bool:
    return bool(DEVICE_ID_PATTERN.match(device_id))
