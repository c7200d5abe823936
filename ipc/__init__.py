"""Shared-memory rings between the front and the shards.

Owns: the single-producer single-consumer record ring (`ring`), the atomic
words it synchronises on (`atomic`), the per-shard words that outlive a shard
(`shardstate`: next peer id, peer count) and process lifelines (`lifeline`).
Imports nothing else of wsfleet: the front, the supervisor and the shards
all build on it.
"""

from .lifeline import Lifeline, has_ended
from .ring import (
    FLAGS_MAX,
    HEADER_SIZE,
    KIND_MAX,
    Consumer,
    MessageTooLarge,
    PeerGone,
    Producer,
    Record,
    RingCorrupted,
    RingError,
    RingFds,
    SharedRing,
)
from .shardstate import ShardState

__all__ = [
    "FLAGS_MAX",
    "HEADER_SIZE",
    "KIND_MAX",
    "Consumer",
    "Lifeline",
    "MessageTooLarge",
    "PeerGone",
    "Producer",
    "Record",
    "RingCorrupted",
    "RingError",
    "RingFds",
    "ShardState",
    "SharedRing",
    "has_ended",
]
