"""What the front, the supervisor and the shards share: the rings and the contracts.

Owns the channels between the processes: the single-producer
single-consumer record ring (`ring`), the atomic words it synchronises on
(`atomic`), the front's per-peer inbox and the C loop that fills the
inboxes from a batch of records (`inbox`), the per-shard words that
outlive a shard (`shardstate`: next peer id, peer count, heartbeat),
process lifelines (`lifeline`) and the handoff of live connections to a
reloaded shard (`handoff`).

And the contracts over them, typed in one place that both sides import:
the configuration (`config`: `Limits`, `TlsConfig`, `FleetConfig`,
`ShardConfig`, frozen dataclasses), the control messages and their codec
(`control`: `ShardUp`, `ShardDown`, `ShardFailed`, `Stop`, and those of a
reload: `ShardBoot`, `HandOff`, `TookOver`, `ShardMoved`), the records of
the rings (`messages`: the `Event` and `Command` kinds, the `DropReason`s of
the relay, the payload layouts), the one TLS loader (`tls`) and the resolver
of a shard handler's ``module:attr`` (`handlerspec`, the front's check and the
shards' import).

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
