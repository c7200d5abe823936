"""What the nodes of a cluster say to each other over NATS: subjects, messages, records.

Every message starts with the same header, whatever it carries::

    magic "WF" | version u8 | kind u8 | slot u16 | incarnation u64 | name length u8 | name

``version`` is `WIRE_VERSION`: a node refuses (counts and logs) a message of
any other version before reading further, so two wsfleet versions whose
cluster messages differ refuse each other clearly rather than misread.
``slot`` is the sender's leased id slot (`wsfleet.ipc.messages.slot_range`),
``incarnation`` a random number drawn when its process started: the same
name with a new incarnation is a restarted node, whose old peers are gone.

Kinds:

* `HEARTBEAT` (subject `HEARTBEAT_SUBJECT`, every node listens): JSON
  ``{"seq": view sequence, "peers": count, "shards": n}``, once a second;
* `BYE` (same subject): the node stops, its peers are gone now;
* `BATCH` (subject `inbox_subject(name)` of the one destination node): the
  records the sender's last ``poll()`` tick queued for that node, in order.
  Everything one node says to another goes through the receiver's inbox, so
  NATS keeps their order: a peer's join before anything about it, packets
  in the order they were sent.

A record is ``kind u8 | flags u8 | peer i32 | length u32 | payload``
(`R_*` below); a record of a kind this version does not know is skipped
(counted), so that a later version may add kinds within the same wire
version only where ignoring them is harmless.

Imports the standard library and `wsfleet.ipc.messages` only (no nats).
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass

WIRE_VERSION = 1
MAGIC = b"WF"

#: Message kinds.
HEARTBEAT, BYE, BATCH = 1, 2, 3

#: Every subject starts with this (one cluster per NATS account; NATS' own accounts or a
#: server per cluster keep several apart).
SUBJECT_PREFIX = "wsfleet"
HEARTBEAT_SUBJECT = f"{SUBJECT_PREFIX}.heartbeat"
#: The JetStream key-value bucket of the id slot leases.
SLOTS_BUCKET = "wsfleet_slots"

# -- records of a BATCH --------------------------------------------------------------------
#: Send one message to local peer ``peer``: flags = FLAG_TEXT or 0, payload = the message.
R_SEND = 1
#: Start the close handshake with local peer ``peer``: payload `wsfleet.ipc.messages.
#: encode_close` (code, reason).
R_CLOSE = 2
#: Send to every local peer: flags = FLAG_TEXT or 0, payload `encode_broadcast`
#: (the excluded ids of the receiving node, and the message).
R_BROADCAST = 3
#: Send to the local members of a group: payload `encode_group_broadcast`.
R_GROUP_BROADCAST = 4
#: The sender's peer ``peer`` connected: payload `encode_join` (view sequence, address).
R_JOIN = 5
#: The sender's peer ``peer`` left: flags = 1 if cleanly; payload the view sequence (u64).
R_LEAVE = 6
#: Send me every peer you hold (a `R_SNAPSHOT` answers, in the same ordered stream).
R_SNAPSHOT_REQUEST = 7
#: Every peer the sender holds now: payload `encode_snapshot`.  A large snapshot comes in
#: parts (records in a row, one view sequence), each but the last with flags `FLAG_MORE`.
R_SNAPSHOT = 8

#: Multiplayer mode (``gd_mp_api``): a client frame (payload: the whole frame, 9-byte header
#: included) from the sender's peer ``peer`` (or 1: the sender node's own server), for the
#: receiving node's peers by its ``to`` field (n: that peer; 0 or -n: every peer but -n).
R_MP_FRAME = 9

FLAG_TEXT = 1
#: R_SNAPSHOT: more parts of this snapshot follow.
FLAG_MORE = 2
#: Bytes of one snapshot entry beyond its address and protocol.
ENTRY_SIZE = 8

_HEADER = struct.Struct("<2sBBHQB")
_RECORD = struct.Struct("<BBiI")
RECORD_HEADER_SIZE = _RECORD.size
_SEQ = struct.Struct("<Q")
_JOIN = struct.Struct("<QHBB")  # seq, port, ip length, protocol length
_ENTRY = struct.Struct("<iHBB")  # peer, port, ip length, protocol length
_COUNT = struct.Struct("<I")


class WireError(ValueError):
    """A cluster message that cannot be read (its text says why)."""


class VersionError(WireError):
    """A message of another wire version: ``version`` is the one it has."""

    def __init__(self, version: int) -> None:
        super().__init__(f"wire version {version}, this node speaks {WIRE_VERSION}")
        self.version = version


def inbox_subject(name: str) -> str:
    """The one subject on which node ``name`` receives everything addressed to it."""
    return f"{SUBJECT_PREFIX}.node.{name}"


@dataclass(frozen=True, slots=True)
class Sender:
    """Who sent a message (its header)."""

    kind: int
    slot: int
    incarnation: int
    name: str


def encode_header(kind: int, slot: int, incarnation: int, name: bytes) -> bytes:
    return _HEADER.pack(MAGIC, WIRE_VERSION, kind, slot, incarnation, len(name)) + name


def decode_header(data: bytes) -> tuple[Sender, int]:
    """The sender and where the body starts; `VersionError` / `WireError` if unreadable."""
    if len(data) < 4 or data[:2] != MAGIC:
        raise WireError("not a wsfleet cluster message")
    if data[2] != WIRE_VERSION:
        raise VersionError(data[2])
    if len(data) < _HEADER.size:
        raise WireError("truncated header")
    _magic, _version, kind, slot, incarnation, size = _HEADER.unpack_from(data)
    end = _HEADER.size + size
    if len(data) < end:
        raise WireError("truncated header")
    try:
        name = data[_HEADER.size : end].decode()
    except UnicodeDecodeError:
        raise WireError("node name is not UTF-8") from None
    return Sender(kind, slot, incarnation, name), end


def encode_record(kind: int, flags: int, peer: int, payload: bytes) -> bytes:
    return _RECORD.pack(kind, flags, peer, len(payload)) + payload


def iter_records(data: bytes, start: int) -> Iterator[tuple[int, int, int, bytes]]:
    """``(kind, flags, peer, payload)`` for each record from ``start``; WireError if cut short."""
    view = memoryview(data)
    pos, end = start, len(data)
    while pos < end:
        if end - pos < _RECORD.size:
            raise WireError("truncated record header")
        kind, flags, peer, size = _RECORD.unpack_from(data, pos)
        pos += _RECORD.size
        if end - pos < size:
            raise WireError("truncated record")
        yield kind, flags, peer, bytes(view[pos : pos + size])
        pos += size


def _address(ip: str, protocol: str) -> tuple[bytes, bytes]:
    return ip.encode()[:255], protocol.encode()[:255]


def encode_join(seq: int, ip: str, port: int, protocol: str) -> bytes:
    ip_b, proto_b = _address(ip, protocol)
    return _JOIN.pack(seq, port, len(ip_b), len(proto_b)) + ip_b + proto_b


def decode_join(payload: bytes) -> tuple[int, str, int, str]:
    """``(seq, ip, port, protocol)``."""
    try:
        seq, port, ip_size, proto_size = _JOIN.unpack_from(payload)
    except struct.error:
        raise WireError("truncated join") from None
    pos = _JOIN.size
    ip = payload[pos : pos + ip_size].decode(errors="replace")
    protocol = payload[pos + ip_size : pos + ip_size + proto_size].decode(errors="replace")
    return seq, ip, port, protocol


def encode_seq(seq: int) -> bytes:
    return _SEQ.pack(seq)


def decode_seq(payload: bytes) -> int:
    try:
        return _SEQ.unpack_from(payload)[0]
    except struct.error:
        raise WireError("truncated sequence number") from None


def encode_snapshot(seq: int, peers: list[tuple[int, str, int, str]]) -> bytes:
    """``seq`` and ``(peer, ip, port, protocol)`` for each peer the node holds."""
    parts = [_SEQ.pack(seq), _COUNT.pack(len(peers))]
    for peer, ip, port, protocol in peers:
        ip_b, proto_b = _address(ip, protocol)
        parts.append(_ENTRY.pack(peer, port, len(ip_b), len(proto_b)) + ip_b + proto_b)
    return b"".join(parts)


def decode_snapshot(payload: bytes) -> tuple[int, list[tuple[int, str, int, str]]]:
    try:
        (seq,) = _SEQ.unpack_from(payload)
        (count,) = _COUNT.unpack_from(payload, _SEQ.size)
        pos = _SEQ.size + _COUNT.size
        peers = []
        for _ in range(count):
            peer, port, ip_size, proto_size = _ENTRY.unpack_from(payload, pos)
            pos += _ENTRY.size
            ip = payload[pos : pos + ip_size].decode(errors="replace")
            pos += ip_size
            protocol = payload[pos : pos + proto_size].decode(errors="replace")
            pos += proto_size
            peers.append((peer, ip, port, protocol))
    except struct.error:
        raise WireError("truncated snapshot") from None
    return seq, peers
