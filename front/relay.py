"""Godot's multiplayer relay on the front's side (``listen(..., gd_mp_api=True)``).

Owns what Godot keeps in ``WebSocketMultiplayerPeer``: the join order of
the peers and the system messages that announce them (`welcome`,
`peer_left`), client frames the shards could not relay alone (for the
server, or for peers of other shards: `frame`), the server's own packets
(`put_packet` as peer 1, to its target peer), the packets addressed to the
server (`get_packet`), and the drop counters by `DropReason`.  The shards
relay frames between two of their own peers themselves; see
``wsfleet.shards.worker``.

It reaches the shards through the `Fleet` (its links and peer channels) and
emits ``peer_packet`` through the callable it is given.  Packets for the
server that are RPC traffic go to Godot's RPC layer instead
(`wsfleet.multiplayer.MultiplayerAPI`, ``server.multiplayer``), once a node
is registered there; RAW packets (``send_bytes``) go to both.  Imports
`wsfleet.ipc.messages`, `.channel`, `.errors`, `.fleet` and `.multiplayer` only.
"""

from __future__ import annotations

import bisect
import logging
from collections import deque
from collections.abc import Callable
from typing import Any

from wsfleet.ipc import messages as m

from .channel import PeerChannel
from .errors import Error
from .fleet import Fleet, ShardLink
from .multiplayer import RAW, MultiplayerAPI

log = logging.getLogger("wsfleet")
_RAW_BYTE = bytes([RAW])


class MultiplayerRelay:
    """Peer 1 of Godot 3.2's multiplayer API, over the fleet."""

    def __init__(self, emit: Callable[..., Any]) -> None:
        self._emit = emit
        self._fleet: Fleet | None = None
        self._inbox: deque[tuple[int, bytes]] = deque()  # (sender, payload) for the server
        self._ids: list[int] = []  # every welcomed peer, ascending (Godot's join order)
        self._drops = [0] * len(m.DropReason)
        self._target = 0
        self._packet_error = Error.OK
        #: Godot's RPC layer on the server's side (``server.multiplayer``).
        self.api = MultiplayerAPI(self)

    # -- life with one listen ----------------------------------------------------------------

    def attach(self, fleet: Fleet) -> None:
        """Relay over ``fleet`` (from ``listen``) until `detach`."""
        self._fleet = fleet
        fleet.relay = self

    def detach(self) -> None:
        """The server stopped: packets not read and the join list are dropped."""
        if self._fleet is not None:
            self._fleet.relay = None
        self._fleet = None
        self._inbox.clear()
        self._ids.clear()
        self.api.clear()

    # -- peers -------------------------------------------------------------------------------

    def welcome(self, channel: PeerChannel) -> None:
        """Godot's join: the new peer learns its id and every peer; every peer learns of it."""
        peer_id = channel.id
        channel.command(m.CMD_MP_WELCOME, 0, m.encode_ids(self._ids))
        bisect.insort(self._ids, peer_id)
        self._sys_all(m.SYS_ADD, peer_id)
        self.api.peer_connected(peer_id)

    def peer_left(self, peer_id: int) -> None:
        index = bisect.bisect_left(self._ids, peer_id)
        if index < len(self._ids) and self._ids[index] == peer_id:
            del self._ids[index]
        self._sys_all(m.SYS_DEL, peer_id)
        self.api.peer_left(peer_id)

    def peer_ids(self) -> list[int]:
        """Every welcomed peer, ascending."""
        return self._ids

    def peer_count(self) -> int:
        return len(self._ids)

    def has_peer(self, peer_id: int) -> bool:
        index = bisect.bisect_left(self._ids, peer_id)
        return index < len(self._ids) and self._ids[index] == peer_id

    def _sys_all(self, kind: int, subject: int) -> None:
        # One record per shard: the shard writes the message to each of its peers.
        if self._fleet is not None:
            self._fleet.command_each(m.CMD_MP_SYS_ALL, subject, kind, b"")

    # -- the fleet's events (RelayHooks) ------------------------------------------------------

    def frame(self, source: ShardLink, sender: int, frame: bytes) -> None:
        """A client frame the shard could not relay alone: for the server and/or other shards."""
        fleet = self._fleet
        if fleet is None or not fleet.running:
            return
        to = m.MP_HEADER.unpack_from(frame)[2]
        if to > 1:
            target = fleet.channels.get(to)
            if target is None:
                self._drops[m.DropReason.TARGET] += 1
            else:
                target.link.command(m.CMD_MP_FORWARD, sender, 0, frame)
            return
        if to != 1:  # 0 or -n: the peers of the other shards (the source shard did its own)
            fleet.command_each(m.CMD_MP_FORWARD, sender, 0, frame, skip=source)
        if to == -1:
            return  # "everyone but the server" (Godot 3.2 delivers it to itself too: a bug)
        payload = frame[m.MP_HEADER_SIZE :]
        if self.api.takes(payload):
            self.api.process(sender, payload)
            return
        self._inbox.append((sender, payload))
        self._emit("peer_packet", sender)
        if payload[:1] == _RAW_BYTE:
            self.api.raw(sender, payload)

    def drops(self, counts: tuple[int, ...]) -> None:
        for reason, count in zip(m.DropReason, counts, strict=True):
            self._drops[reason] += count

    # -- NetworkedMultiplayerPeer --------------------------------------------------------------

    def set_target_peer(self, peer_id: int) -> None:
        self._target = peer_id

    def put_packet(self, data: bytes | bytearray | memoryview) -> Error:
        """Send a packet from the server (``from`` = 1) to the target peer(s)."""
        fleet = self._fleet
        if fleet is None:
            return Error.ERR_UNCONFIGURED
        target = self._target
        frame = m.MP_HEADER.pack(m.SYS_NONE, m.SERVER_ID, target) + bytes(data)
        if target > 1:
            channel = fleet.channels.get(target)
            if channel is None:
                log.error("put_packet: no peer %d", target)
                return Error.FAILED
            return channel.send(m.CMD_SEND_BINARY, frame)
        if target == m.SERVER_ID:
            return Error.OK  # as Godot: the server does not send to itself
        if len(frame) > fleet.limits.out_bytes:
            log.error("put_packet: %d bytes is more than get_max_packet_size()", len(data))
            return Error.ERR_OUT_OF_MEMORY
        fleet.command_each(m.CMD_MP_FORWARD, m.SERVER_ID, 0, frame)
        return Error.OK

    def get_available_packet_count(self) -> int:
        return len(self._inbox)

    def get_packet_peer(self) -> int:
        return self._inbox[0][0] if self._inbox else m.SERVER_ID

    def get_packet(self) -> bytes:
        if not self._inbox:
            self._packet_error = Error.ERR_UNAVAILABLE
            return b""
        self._packet_error = Error.OK
        return self._inbox.popleft()[1]

    def get_packet_error(self) -> Error:
        return self._packet_error

    def set_packet_error(self, error: Error) -> None:
        """What the next `get_packet_error` reports (the server's checks fail before the relay)."""
        self._packet_error = error

    def stats(self) -> dict[str, int]:
        """Client frames dropped, by reason: short, type, from, target; then the RPC layer's
        packets for the server dropped, by reason (``rpc_*``)."""
        return {reason.label: self._drops[reason] for reason in m.DropReason} | self.api.stats()
