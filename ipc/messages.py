"""What the front and a shard say to each other through their two rings.

Each record is ``(kind, peer, flags, payload)`` (see `wsfleet.ipc.ring`).
Events flow shard -> front, commands front -> shard; their kinds are the
`Event` and `Command` enums (``EV_*`` / ``CMD_*``: the same values as plain
ints, for the per-message loops), and the relay's drop counters are indexed
by `DropReason`.  Payloads are raw bytes or small fixed ``struct`` layouts;
nothing here allocates per message beyond the payload itself.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from enum import IntEnum
from typing import Final

# -- events: shard -> front ------------------------------------------------------


class Event(IntEnum):
    """The kind of an event record (shard -> front)."""

    #: A handshake completed: payload `encode_connected`.
    CONNECTED = 1
    #: A whole text / binary message from a peer: payload = the message.
    TEXT = 2
    BINARY = 3
    #: The peer sent a close frame first: payload `encode_close` (reason without Godot's NUL).
    CLOSE_REQUEST = 4
    #: The connection is gone: flags = FLAG_CLEAN if the peer started a clean close handshake.
    DISCONNECTED = 5
    #: Outbound packets the shard handed to the kernel: payload `encode_credits`, peer 0.
    CREDITS = 6
    #: Multiplayer mode: a client frame the front must handle (for the server, or for peers
    #: on other shards): peer = the sender, payload = the whole frame, 9-byte header included.
    MP_FRAME = 7
    #: Multiplayer mode: client frames the shard dropped since its last report: `encode_drops`.
    MP_DROPS = 8
    #: An upgrade request waits for the application's verdict (a handshake handler is set):
    #: peer = the id it will have, payload `encode_handshake`. `Command.VERDICT` answers.
    HANDSHAKE = 9
    #: A waiting upgrade ended without a verdict (its deadline passed, the client left):
    #: peer = that id; a later verdict for it is ignored.
    HANDSHAKE_ENDED = 10


# -- commands: front -> shard ------------------------------------------------------


class Command(IntEnum):
    """The kind of a command record (front -> shard)."""

    #: Send one message: payload = the message.
    SEND_TEXT = 1
    SEND_BINARY = 2
    #: Start the close handshake: payload `encode_close`. With FLAG_FAIL, fail the
    #: connection instead: the close frame, then the TCP connection is closed at once.
    CLOSE = 3
    #: Send to every peer of the shard: flags = FLAG_TEXT or 0, payload `encode_broadcast`.
    BROADCAST = 4
    #: TCP_NODELAY on (flags 1) or off (flags 0).
    NO_DELAY = 5
    #: Stop / resume reading from one peer (the front's inbound queue is full / has room).
    PAUSE_READING = 6
    RESUME_READING = 7
    #: Drop new connections at once (flags 1) or accept them again (flags 0).
    REFUSE = 8
    #: Multiplayer mode: welcome peer N: SYS_ID(N), SYS_ADD(1), then SYS_ADD(E) for each id
    #: in the payload (`encode_ids`, ascending). From then on N takes part in the relay;
    #: flags = FLAG_ROOMS: with relay groups (its frames reach only peers it shares a group
    #: with, ``set_relay_groups``).
    MP_WELCOME = 9
    #: Multiplayer mode: send SYS_ADD/SYS_DEL (flags = the type) about peer ``peer`` to every
    #: welcomed peer of the shard except ``peer`` itself.
    MP_SYS_ALL = 10
    #: Multiplayer mode: deliver a frame (payload, header included) to this shard's welcomed
    #: peers by its ``to`` field, never to its ``from`` (= ``peer``). With FLAG_GROUP (relay
    #: groups, ``to`` 0 or -n): payload `encode_group_frame`, only to the members of those
    #: groups, once each.
    MP_FORWARD = 11
    #: The application's verdict on a waiting upgrade (`Event.HANDSHAKE`): flags = 1 accept,
    #: 0 refuse; payload `encode_verdict`.
    VERDICT = 12
    #: Peer ``peer`` joins (flags 1) or leaves (flags 0) the group named by the payload.
    GROUP = 13
    #: Relay groups (``set_relay_groups``): payload `encode_mp_group` (a group name, maybe
    #: empty, and ids). Peer P = ``peer`` joins (flags SYS_ADD) or leaves (flags SYS_DEL)
    #: that group (if named and P is here), then P (if here and welcomed) gets that system
    #: message about each id, and each id that is a welcomed peer here gets it about P: all
    #: in one record, so no frame of this shard comes between the change and its news.
    MP_GROUP = 14


# The same kinds as plain ints, for the per-message loops on both sides: comparing an int
# with an IntEnum member goes through the subclass's reflected comparison (a few ns more).
EV_CONNECTED: Final = Event.CONNECTED.value
EV_TEXT: Final = Event.TEXT.value
EV_BINARY: Final = Event.BINARY.value
EV_CLOSE_REQUEST: Final = Event.CLOSE_REQUEST.value
EV_DISCONNECTED: Final = Event.DISCONNECTED.value
EV_CREDITS: Final = Event.CREDITS.value
EV_MP_FRAME: Final = Event.MP_FRAME.value
EV_MP_DROPS: Final = Event.MP_DROPS.value
EV_HANDSHAKE: Final = Event.HANDSHAKE.value
EV_HANDSHAKE_ENDED: Final = Event.HANDSHAKE_ENDED.value

CMD_SEND_TEXT: Final = Command.SEND_TEXT.value
CMD_SEND_BINARY: Final = Command.SEND_BINARY.value
CMD_CLOSE: Final = Command.CLOSE.value
CMD_BROADCAST: Final = Command.BROADCAST.value
CMD_NO_DELAY: Final = Command.NO_DELAY.value
CMD_PAUSE_READING: Final = Command.PAUSE_READING.value
CMD_RESUME_READING: Final = Command.RESUME_READING.value
CMD_REFUSE: Final = Command.REFUSE.value
CMD_MP_WELCOME: Final = Command.MP_WELCOME.value
CMD_MP_SYS_ALL: Final = Command.MP_SYS_ALL.value
CMD_MP_FORWARD: Final = Command.MP_FORWARD.value
CMD_VERDICT: Final = Command.VERDICT.value
CMD_GROUP: Final = Command.GROUP.value
CMD_MP_GROUP: Final = Command.MP_GROUP.value

FLAG_TEXT = 1
FLAG_CLEAN = 1
FLAG_FAIL = 1
#: A broadcast to one group's members only: payload `encode_group_broadcast`. On
#: MP_FORWARD: a relayed frame for the members of the sender's groups, `encode_group_frame`.
FLAG_GROUP = 2
#: MP_WELCOME: the peer is relayed with relay groups (``set_relay_groups``).
FLAG_ROOMS = 1

# -- Godot's multiplayer header (docs/GODOT_WIRE.md §4) ---------------------------------

MP_HEADER = struct.Struct("<Bii")  # type, from, to
MP_HEADER_SIZE = MP_HEADER.size  # 9
SYS_NONE, SYS_ADD, SYS_DEL, SYS_ID = 0, 1, 2, 3
SERVER_ID = 1


class DropReason(IntEnum):
    """Why the relay dropped a client frame; the value is its slot in `encode_drops`."""

    #: Shorter than the 9-byte header.
    SHORT = 0
    #: A system message type (only the server sends those).
    TYPE = 1
    #: A ``from`` that is not the sender's id (or a sender not yet welcomed).
    FROM = 2
    #: A ``to`` that names no (welcomed) peer, or the sender itself.
    TARGET = 3
    #: Relay groups (``set_relay_groups``): a ``to`` that names a peer the sender shares
    #: no group with.
    GROUP = 4

    @property
    def label(self) -> str:
        """The key of `WebSocketServer.get_mp_stats` ("short", "type", "from", "target",
        "group")."""
        return self.name.lower()


#: The labels of `DropReason`, in slot order.
DROP_REASONS: Final = tuple(reason.label for reason in DropReason)
_DROPS = struct.Struct(f"<{len(DropReason)}I")


def sys_frame_payload(kind: int, peer_id: int) -> bytes:
    """The 13-byte body of a system message: from the server, to everyone, about ``peer_id``."""
    return MP_HEADER.pack(kind, SERVER_ID, 0) + struct.pack("<i", peer_id)


def encode_drops(counts: list[int]) -> bytes:
    return _DROPS.pack(*counts)


def decode_drops(payload: bytes) -> tuple[int, ...]:
    return _DROPS.unpack(payload)


def encode_ids(ids: list[int]) -> bytes:
    return struct.pack(f"<{len(ids)}i", *ids)


def decode_ids(payload: bytes) -> tuple[int, ...]:
    return struct.unpack(f"<{len(payload) // 4}i", payload)


_CONNECTED = struct.Struct("<H")
_CLOSE = struct.Struct("<H")
_CREDIT = struct.Struct("<iII")  # peer, packets, bytes
_COUNT = struct.Struct("<I")


def encode_connected(ip: str, port: int, protocol: str, request_head: bytes = b"") -> bytes:
    """The peer's address, its subprotocol and the head of its upgrade request (request
    line and header lines, CRLF-separated; it holds no NUL: the shard refused any)."""
    return _CONNECTED.pack(port) + ip.encode() + b"\0" + protocol.encode() + b"\0" + request_head


def decode_connected(payload: bytes) -> tuple[str, int, str, bytes]:
    """``(ip, port, protocol, request_head)``."""
    (port,) = _CONNECTED.unpack_from(payload)
    ip, _, rest = payload[_CONNECTED.size :].partition(b"\0")
    protocol, _, head = rest.partition(b"\0")
    return ip.decode(), port, protocol.decode(), head


def encode_handshake(
    ip: str, port: int, protocol: str, offered: Iterable[str], request_head: bytes
) -> bytes:
    """A waiting upgrade: as `encode_connected`, with the offered subprotocols (the
    protocol is the server's own choice, which the application may override)."""
    return encode_connected(ip, port, protocol, ",".join(offered).encode() + b"\0" + request_head)


def decode_handshake(payload: bytes) -> tuple[str, int, str, list[str], bytes]:
    """``(ip, port, protocol, offered, request_head)``."""
    ip, port, protocol, rest = decode_connected(payload)
    offered, _, head = rest.partition(b"\0")
    return ip, port, protocol, [p for p in offered.decode().split(",") if p], head


_VERDICT = struct.Struct("<HB")  # status (refusal) or 0; 1 if a subprotocol follows


def encode_verdict(
    status: int, protocol: str | None, text: str, headers: Iterable[tuple[str, str]]
) -> bytes:
    """A verdict: the refusal's status and text, or the accepted subprotocol (None: the
    server's choice), and extra response headers. Fields are NUL-separated."""
    fields = [protocol or "", text, *(f"{name}:{value}" for name, value in headers)]
    return _VERDICT.pack(status, protocol is not None) + "\0".join(fields).encode()


def decode_verdict(payload: bytes) -> tuple[int, str | None, str, list[tuple[str, str]]]:
    status, has_protocol = _VERDICT.unpack_from(payload)
    protocol, text, *lines = payload[_VERDICT.size :].decode().split("\0")
    headers = [tuple(line.split(":", 1)) for line in lines if ":" in line]
    return status, protocol if has_protocol else None, text, headers  # type: ignore[return-value]


def encode_close(code: int, reason: str | bytes) -> bytes:
    if isinstance(reason, str):
        reason = reason.encode()
    return _CLOSE.pack(code) + reason


def decode_close(payload: bytes) -> tuple[int, str]:
    """``(code, reason)``; an invalid UTF-8 reason is replaced, never raised."""
    (code,) = _CLOSE.unpack_from(payload)
    return code, payload[_CLOSE.size :].decode(errors="replace")


def encode_credits(credits: dict[int, list[int]]) -> bytes:
    """``{peer: [packets, bytes]}`` -> payload."""
    pack = _CREDIT.pack
    return b"".join([pack(peer, packets, size) for peer, (packets, size) in credits.items()])


def decode_credits(payload: bytes) -> Iterable[tuple[int, int, int]]:
    """Yield ``(peer, packets, bytes)``."""
    return _CREDIT.iter_unpack(payload)


def encode_broadcast(message: bytes, exclude: Iterable[int] = ()) -> bytes:
    excluded = list(exclude)
    return _COUNT.pack(len(excluded)) + struct.pack(f"<{len(excluded)}i", *excluded) + message


def decode_broadcast(payload: bytes) -> tuple[frozenset[int], memoryview]:
    """``(excluded peer ids, message)``."""
    (count,) = _COUNT.unpack_from(payload)
    start = _COUNT.size + 4 * count
    excluded = frozenset(struct.unpack_from(f"<{count}i", payload, _COUNT.size))
    return excluded, memoryview(payload)[start:]


_GROUP_NAME = struct.Struct("<H")


def encode_group_broadcast(group: bytes, message: bytes, exclude: Iterable[int] = ()) -> bytes:
    """A broadcast to the members of ``group`` (UTF-8, at most 65535 bytes)."""
    return _GROUP_NAME.pack(len(group)) + group + encode_broadcast(message, exclude)


def decode_group_broadcast(payload: bytes) -> tuple[bytes, frozenset[int], memoryview]:
    """``(group, excluded peer ids, message)``."""
    (size,) = _GROUP_NAME.unpack_from(payload)
    start = _GROUP_NAME.size
    group = payload[start : start + size]
    excluded, message = decode_broadcast(payload[start + size :])
    return group, excluded, message


def encode_group_frame(groups: Iterable[bytes], frame: bytes) -> bytes:
    """A relayed frame for the members of ``groups`` (each at most 65535 bytes)."""
    names = list(groups)
    parts = [_COUNT.pack(len(names))]
    for name in names:
        parts += (_GROUP_NAME.pack(len(name)), name)
    parts.append(frame)
    return b"".join(parts)


def decode_group_frame(payload: bytes) -> tuple[list[bytes], memoryview]:
    """``(group names, frame)``."""
    (count,) = _COUNT.unpack_from(payload)
    pos = _COUNT.size
    names = []
    for _ in range(count):
        (size,) = _GROUP_NAME.unpack_from(payload, pos)
        pos += _GROUP_NAME.size
        names.append(bytes(payload[pos : pos + size]))
        pos += size
    return names, memoryview(payload)[pos:]


def encode_mp_group(group: bytes, ids: Iterable[int]) -> bytes:
    """`Command.MP_GROUP`: a group name (empty: no membership change) and peer ids."""
    return _GROUP_NAME.pack(len(group)) + group + encode_ids(list(ids))


def decode_mp_group(payload: bytes) -> tuple[bytes, tuple[int, ...]]:
    """``(group, ids)``."""
    (size,) = _GROUP_NAME.unpack_from(payload)
    start = _GROUP_NAME.size
    return bytes(payload[start : start + size]), decode_ids(payload[start + size :])


# -- peer ids ------------------------------------------------------------------------

#: Ids are positive 31-bit ints; 0 and 1 are never peers (1 is the server in Godot's API).
FIRST_PEER_ID = 2
ID_LIMIT = 1 << 31


#: A cluster (``WebSocketServer(cluster=...)``) splits the id space into this many slots;
#: each node leases one and carves its shards' ranges from it.  A peer id's slot, and so
#: its node, is computed from the id (`slot_of`), never looked up.
CLUSTER_SLOTS = 256
#: Ids per slot: 8,388,607 (each slot holds only valid Godot ids, all above 1).
SLOT_SPAN = (ID_LIMIT - FIRST_PEER_ID) // CLUSTER_SLOTS
#: Every id a lone server (no cluster) hands out: the whole space.
ALL_IDS = ID_LIMIT - FIRST_PEER_ID


def id_span(shards: int, total: int = ALL_IDS) -> int:
    """How many ids each shard owns, when the node owns ``total`` ids."""
    return total // shards


def id_range(index: int, shards: int, base: int = FIRST_PEER_ID, total: int = ALL_IDS) -> range:
    """The ids shard ``index`` of ``shards`` hands out, of the node's ``base`` + ``total``."""
    span = id_span(shards, total)
    start = base + index * span
    return range(start, start + span)


def owner_of(peer_id: int, span: int, base: int = FIRST_PEER_ID) -> int:
    """The shard that owns ``peer_id``, computed, not looked up (``base``: the node's first id)."""
    return (peer_id - base) // span


def slot_range(slot: int) -> range:
    """The ids of cluster slot ``slot`` (0 <= slot < `CLUSTER_SLOTS`)."""
    if not 0 <= slot < CLUSTER_SLOTS:
        raise ValueError(f"cluster slot out of range: {slot}")
    start = FIRST_PEER_ID + slot * SLOT_SPAN
    return range(start, start + SLOT_SPAN)


def slot_of(peer_id: int) -> int:
    """The cluster slot (so the node) that owns ``peer_id``; -1 for an id of no slot."""
    slot = (peer_id - FIRST_PEER_ID) // SLOT_SPAN
    return slot if 0 <= slot < CLUSTER_SLOTS else -1
