"""The handoff of a shard's live connections to its successor (``wsfleet reload``).

What crosses: every connection's socket (``SCM_RIGHTS``: the successor gets
the same TCP connection, kernel buffers and all) and its state, a
`MovedConnection`: who the peer is, where its protocol stands, and the bytes
read from it that no complete frame (or upgrade request) has taken yet.  Bytes
still to be sent do not cross: the old shard waits until the kernel has taken
all of them before it hands off (`wsfleet.shards.handoff`).

On the wire (a ``SOCK_SEQPACKET`` pair, so every packet arrives whole):

1. a header packet, ``{"connections": N, "states": S, "blob": B, "refusing": R}``
   (orjson; ``R``: the shard refuses new connections, the one flag of the shard
   itself that must survive it),
   with one fd: a memfd holding the states (``S`` bytes of JSON, one object
   per connection), then ``B`` bytes: every connection's unparsed bytes and
   open fragmented message back to back, at the offsets its state gives (a
   packet is bounded by the socket buffer; 10,000 states or a half-received
   16 MiB frame are not);
2. ``ceil(N / FDS_PER_PACKET)`` packets ``b"fds"``, each with the next sockets
   in the order of ``states``.

The old shard sends it as its last act; the successor reads it whole before
it touches the rings.  A stream that ends early (the old shard died midway)
raises `HandoffError`: the successor then exits and the supervisor treats
that shard as dead (its peers are gone), as for any crash.

Imports the standard library and orjson only.
"""

from __future__ import annotations

import mmap
import os
import socket
from dataclasses import dataclass
from typing import Any

import orjson

#: Sockets per packet: the kernel refuses more than 253 (``SCM_MAX_FD``) in one message.
FDS_PER_PACKET = 200
#: The largest header packet (three numbers).
MAX_HEADER = 4096
_FDS_PACKET = b"fds"


class HandoffError(Exception):
    """The handoff stream is malformed or ended before it was whole."""


@dataclass(frozen=True, slots=True)
class MovedConnection:
    """One connection as its new shard takes it over.

    ``peer_id`` 0: still in its upgrade (``unparsed`` is the start of the
    request), or with ``pending_token``, an upgrade admitted and waiting for
    the application's verdict under that token (``unparsed`` is the whole
    request and what came after it).  Otherwise open: ``unparsed`` is the
    start of the next frame(s), ``fragments`` the data so far of the
    fragmented message being received (None outside one) and
    ``fragments_text`` its kind.
    """

    peer_id: int
    ip: str
    port: int
    subprotocol: str
    mp_welcomed: bool
    paused_by_front: bool
    unparsed: bytes
    fragments: bytes | None
    fragments_text: bool
    #: The groups it is in (``server.join``).
    groups: tuple[str, ...] = ()
    #: Welcomed with relay groups (``set_relay_groups``): relayed within its groups only.
    mp_rooms: bool = False
    pending_token: int = 0
    #: permessage-deflate negotiated without context takeover either way (the only kind
    #: that moves): ``(client's window bits, server's window bits)``; None: not negotiated.
    deflate: tuple[int, int] | None = None


def send(
    sock: socket.socket, moved: list[MovedConnection], fds: list[int], refusing: bool = False
) -> None:
    """Send ``moved`` and their sockets (``fds``, in the same order) and whether the shard
    refuses new connections; blocking."""
    if len(moved) != len(fds):
        raise ValueError(f"{len(moved)} connections but {len(fds)} sockets")
    blob = bytearray()
    states: list[dict[str, Any]] = []
    for conn in moved:
        state: dict[str, Any] = {
            "peer_id": conn.peer_id,
            "pending_token": conn.pending_token,
            "ip": conn.ip,
            "port": conn.port,
            "subprotocol": conn.subprotocol,
            "mp_welcomed": conn.mp_welcomed,
            "paused_by_front": conn.paused_by_front,
            "fragments_text": conn.fragments_text,
            "groups": list(conn.groups),
            "mp_rooms": conn.mp_rooms,
            "unparsed": [len(blob), len(conn.unparsed)],
        }
        if conn.deflate is not None:
            state["deflate"] = list(conn.deflate)
        blob += conn.unparsed
        if conn.fragments is not None:
            state["fragments"] = [len(blob), len(conn.fragments)]
            blob += conn.fragments
        states.append(state)
    encoded = orjson.dumps(states)
    header = orjson.dumps(
        {
            "connections": len(moved),
            "states": len(encoded),
            "blob": len(blob),
            "refusing": refusing,
        }
    )
    memfd = os.memfd_create("wsfleet-handoff", os.MFD_CLOEXEC)
    try:
        size = len(encoded) + len(blob)
        os.ftruncate(memfd, size)
        with mmap.mmap(memfd, size) as view:
            view[: len(encoded)] = encoded
            view[len(encoded) :] = blob
        socket.send_fds(sock, [header], [memfd])
    finally:
        os.close(memfd)
    for start in range(0, len(fds), FDS_PER_PACKET):
        socket.send_fds(sock, [_FDS_PACKET], fds[start : start + FDS_PER_PACKET])


def receive(sock: socket.socket) -> tuple[list[MovedConnection], list[int], bool]:
    """The connections, their sockets (this process owns the fds) and whether the shard
    refuses new connections; blocking.

    `HandoffError` when the stream ends early or is malformed (every fd
    received so far is closed first).
    """
    received: list[int] = []
    try:
        data, fds, _flags, _addr = socket.recv_fds(sock, MAX_HEADER, 1)
        received += fds
        if not data:
            raise HandoffError("the old shard closed the handoff before sending it")
        if len(fds) != 1:
            raise HandoffError("the handoff header came without its memory")
        try:
            header = orjson.loads(data)
            count, states_size = int(header["connections"]), int(header["states"])
            refusing = bool(header.get("refusing", False))
            memory = _read_memory(fds[0], states_size + int(header["blob"]))
            states = orjson.loads(memory[:states_size])
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise HandoffError(f"a malformed handoff header: {exc}") from None
        if not isinstance(states, list) or len(states) != count:
            raise HandoffError(f"the handoff has {count} connections but not their states")
        blob = memory[states_size:]
        os.close(received.pop())
        sockets: list[int] = []
        while len(sockets) < count:
            data, fds, _flags, _addr = socket.recv_fds(sock, 16, FDS_PER_PACKET)
            sockets += fds
            received += fds
            if data != _FDS_PACKET or not fds:
                raise HandoffError(f"the handoff ended after {len(sockets)} of {count} connections")
        if len(sockets) != count:
            raise HandoffError(f"{len(sockets)} sockets came for {count} connections")
        return [_moved(state, blob) for state in states], sockets, refusing
    except BaseException:
        for fd in received:
            os.close(fd)
        raise


def _read_memory(fd: int, size: int) -> bytes:
    if size < 0 or os.fstat(fd).st_size != size:
        raise HandoffError(f"the handoff memory is not the {size} bytes its header says")
    if size == 0:
        return b""
    with mmap.mmap(fd, size, prot=mmap.PROT_READ) as view:
        return bytes(view)


def _deflate(value: Any) -> tuple[int, int] | None:
    if value is None:
        return None
    remote, local = value  # ValueError / TypeError: malformed
    if not (8 <= int(remote) <= 15 and 9 <= int(local) <= 15):  # websockets' own bounds
        raise ValueError(f"bad deflate window bits: {value!r}")
    return int(remote), int(local)


def _moved(state: dict[str, Any], blob: bytes) -> MovedConnection:
    try:
        start, length = state["unparsed"]
        fragments = None
        if "fragments" in state:
            f_start, f_length = state["fragments"]
            fragments = blob[f_start : f_start + f_length]
        return MovedConnection(
            peer_id=int(state["peer_id"]),
            ip=str(state["ip"]),
            port=int(state["port"]),
            subprotocol=str(state["subprotocol"]),
            mp_welcomed=bool(state["mp_welcomed"]),
            paused_by_front=bool(state["paused_by_front"]),
            unparsed=bytes(blob[start : start + length]),
            fragments=fragments,
            fragments_text=bool(state["fragments_text"]),
            groups=tuple(str(group) for group in state.get("groups", ())),
            mp_rooms=bool(state.get("mp_rooms", False)),
            pending_token=int(state.get("pending_token", 0)),
            deflate=_deflate(state.get("deflate")),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise HandoffError(f"a malformed connection state: {exc}") from None
