"""Godot's multiplayer relay on the front's side (``listen(..., gd_mp_api=True)``).

Owns what Godot keeps in ``WebSocketMultiplayerPeer``: the join order of
the peers and the system messages that announce them (`welcome`,
`peer_left`), client frames the shards could not relay alone (for the
server, or for peers of other shards: `frame`), the server's own packets
(`put_packet` as peer 1, to its target peer), the packets addressed to the
server (`get_packet`), and the drop counters by `DropReason`.  The shards
relay frames between two of their own peers themselves; see
``wsfleet.shards.worker``.

With relay groups (``set_relay_groups(True)``: `rooms`) a peer hears of, and
reaches, only the peers it shares a group with (the server is in every
room): the welcome names no one, a join or leave sends ``SYS_ADD`` /
``SYS_DEL`` both ways between the peer and those whose sharing changed
(`membership`, one `CMD_MP_GROUP` per shard concerned: on the peer's own
shard the membership change and its news in one record), a departure tells
only the peer's room mates, and a frame for another shard is forwarded only
if its target shares a group with the sender (``to`` = n) or to the members
of the sender's groups (``to`` = 0 or -n, with their names: the target shard
delivers to each member once).  Membership comes from the front's mirror
(`wsfleet.groups.Groups`), which is updated before the commands go, so each
shard applies every change before any frame the front relays after it.

In a cluster (``cluster=``, `wsfleet.cluster`), the other nodes' peers are
peers of the relay too (without relay groups): each node's peers get
``SYS_ADD`` / ``SYS_DEL`` of them (`remote_peer`), a frame for one of them
(``to`` = n) goes to its node's inbox, a frame for everyone (``to`` 0 or -n)
to every other node, which delivers it to its own peers (`remote_frame`);
each in the one ordered stream from node to node, so a peer's ``SYS_ADD``
comes before its frames.  Packets for the server (``to`` = 1) stay with the
client's own node; the server's own packets reach another node's peer when
addressed to it (``to`` = n), and this node's peers only for ``to`` 0 / -n.
Relay groups stay within one node for now.

It reaches the shards through the `Fleet` (its links and peer channels) and
emits ``peer_packet`` through the callable it is given.  Packets for the
server that are RPC traffic go to Godot's RPC layer instead
(`wsfleet.multiplayer.MultiplayerAPI`, ``server.multiplayer``), once a node
is registered there; RAW packets (``send_bytes``) go to both.  Imports
`wsfleet.ipc.messages`, `.channel`, `.errors`, `.fleet`, `.groups` and `.multiplayer`
only.
"""

from __future__ import annotations

import bisect
import logging
from collections import deque
from collections.abc import Callable
from collections.abc import Set as AbstractSet
from typing import Any

from wsfleet.ipc import messages as m

from .channel import PeerChannel
from .errors import Error
from .fleet import Fleet, ShardLink
from .groups import Groups
from .multiplayer import RAW, MultiplayerAPI

log = logging.getLogger("wsfleet")
_RAW_BYTE = bytes([RAW])


class MultiplayerRelay:
    """Peer 1 of Godot 3.2's multiplayer API, over the fleet."""

    def __init__(self, emit: Callable[..., Any], groups: Groups) -> None:
        self._emit = emit
        self._groups = groups
        #: Relay groups (``set_relay_groups``): peers are relayed within their groups only.
        #: Changed only while no peer is connected; each peer keeps the mode it was
        #: welcomed with (in its shard: ``mp_rooms``).
        self.rooms = False
        self._fleet: Fleet | None = None
        #: The node's cluster (``cluster=``), set by the server; None for a lone server.
        self.cluster: Any = None
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
        self.cluster = None
        self._inbox.clear()
        self._ids.clear()
        self.api.clear()

    # -- peers -------------------------------------------------------------------------------

    def welcome(self, channel: PeerChannel) -> None:
        """Godot's join: the new peer learns its id and every peer; every peer learns of it."""
        peer_id = channel.id
        if self.rooms:  # it knows the server only, and is known by no one, until it joins
            channel.command(m.CMD_MP_WELCOME, m.FLAG_ROOMS, b"")
            bisect.insort(self._ids, peer_id)
            mates = self._groups.mates(peer_id)  # none: it cannot have joined yet
            if mates:
                self._announce(peer_id, m.SYS_ADD, b"", mates)
        else:
            channel.command(m.CMD_MP_WELCOME, 0, m.encode_ids(self._ids))
            bisect.insort(self._ids, peer_id)
            self._sys_all(m.SYS_ADD, peer_id)
        self.api.peer_connected(peer_id)

    def peer_left(self, peer_id: int, mates: AbstractSet[int] = frozenset()) -> None:
        """A peer is gone; ``mates``: with relay groups, those it shared a group with (the
        only ones told)."""
        index = bisect.bisect_left(self._ids, peer_id)
        if index < len(self._ids) and self._ids[index] == peer_id:
            del self._ids[index]
        if self.rooms:
            if mates:
                self._announce(peer_id, m.SYS_DEL, b"", mates)
        else:
            self._sys_all(m.SYS_DEL, peer_id)
        self.api.peer_left(peer_id)

    def remote_peer(self, peer_id: int, connected: bool) -> None:
        """A peer of another node came (``SYS_ADD`` to this node's peers) or went (``SYS_DEL``).
        Not with relay groups (they stay within a node for now)."""
        if self.rooms:
            return
        index = bisect.bisect_left(self._ids, peer_id)
        known = index < len(self._ids) and self._ids[index] == peer_id
        if connected and not known:
            self._ids.insert(index, peer_id)
            self._sys_all(m.SYS_ADD, peer_id)
        elif not connected and known:
            del self._ids[index]
            self._sys_all(m.SYS_DEL, peer_id)

    def remote_frame(self, sender: int, frame: bytes) -> None:
        """Another node relays a frame (from one of its peers, or its server) to ours."""
        fleet = self._fleet
        if fleet is None or not fleet.running or self.rooms or len(frame) < m.MP_HEADER_SIZE:
            return
        to = m.MP_HEADER.unpack_from(frame)[2]
        if to > 1:
            target = fleet.channels.get(to)
            if target is None:
                self._drops[m.DropReason.TARGET] += 1
            else:
                target.link.command(m.CMD_MP_FORWARD, sender, 0, frame)
        elif to != 1:  # 0 or -n: every peer of this node but -n (never its server)
            fleet.command_each(m.CMD_MP_FORWARD, sender, 0, frame)

    def membership(self, peer_id: int, shard: int, group: str, name: bytes, join: bool) -> bool:
        """Relay groups: ``peer_id`` joins or leaves ``group`` (``name``: its UTF-8) in the
        mirror, and the shards apply it and tell both sides of every pair of peers that
        now share a group and did not (``SYS_ADD``), or no longer do (``SYS_DEL``).  False
        if nothing changed."""
        groups = self._groups
        if join:
            before = groups.mates(peer_id)
            if not groups.join(peer_id, shard, group):
                return False
            news = set(groups.members_of(group)) - before
            news.discard(peer_id)
        else:
            if group not in groups.of_peer(peer_id):
                return False
            members = set(groups.members_of(group))
            groups.leave(peer_id, shard, group)
            members.discard(peer_id)
            news = members - groups.mates(peer_id)
        self._announce(peer_id, m.SYS_ADD if join else m.SYS_DEL, name, news)
        return True

    def _announce(self, peer_id: int, kind: int, name: bytes, others: AbstractSet[int]) -> None:
        """One `CMD_MP_GROUP` to the peer's shard (with ``name``'s change and every id) and one
        to each other shard that holds some of ``others`` (with those)."""
        fleet = self._fleet
        if fleet is None:
            return
        home = fleet.shard_of(peer_id)
        by_shard: dict[int, list[int]] = {}
        for other in others:
            by_shard.setdefault(fleet.shard_of(other), []).append(other)
        for index, link in enumerate(fleet.links):
            if link is None:
                continue
            if index == home:
                if name or others:
                    body = m.encode_mp_group(name, sorted(others))
                    link.command(m.CMD_MP_GROUP, peer_id, kind, body)
            elif index in by_shard:
                body = m.encode_mp_group(b"", sorted(by_shard[index]))
                link.command(m.CMD_MP_GROUP, peer_id, kind, body)

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
                self._to_other_node(sender, to, frame)
            elif self.rooms and not self._groups.share(sender, to):
                self._drops[m.DropReason.GROUP] += 1
            else:
                target.link.command(m.CMD_MP_FORWARD, sender, 0, frame)
            return
        if to != 1:  # 0 or -n: the peers of the other shards (the source shard did its own)
            if self.rooms:
                self._forward_to_groups(fleet, source, sender, frame)
            else:
                fleet.command_each(m.CMD_MP_FORWARD, sender, 0, frame, skip=source)
                if self.cluster is not None and self.cluster.nodes:
                    self.cluster.mp_forward(None, sender, frame)
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

    def _to_other_node(self, sender: int, to: int, frame: bytes) -> Error:
        """A frame for ``to``, which is not here: to its node if it is another node's peer."""
        cluster = self.cluster
        peer = cluster.remote.get(to) if cluster is not None and not self.rooms else None
        if peer is None:
            self._drops[m.DropReason.TARGET] += 1
            return Error.FAILED
        return cluster.mp_forward(peer.node, sender, frame)

    def _forward_to_groups(
        self, fleet: Fleet, source: ShardLink, sender: int, frame: bytes
    ) -> None:
        """Relay groups: a frame for everyone (``to`` 0 or -n) goes to the other shards that
        hold members of the sender's groups, with their names."""
        groups = self._groups
        names = groups.of_peer(sender)
        if not names:
            return
        shards: set[int] = set()
        for group in names:
            shards.update(groups.shards_of(group))
        payload = b""
        for index in shards:
            link = fleet.links[index] if index < len(fleet.links) else None
            if link is not None and link is not source:
                if not payload:
                    payload = m.encode_group_frame([g.encode() for g in names], frame)
                link.command(m.CMD_MP_FORWARD, sender, m.FLAG_GROUP, payload)

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
                cluster = self.cluster
                if cluster is not None and not self.rooms and target in cluster.remote:
                    return cluster.mp_forward(cluster.remote[target].node, m.SERVER_ID, frame)
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
        """Client frames dropped, by reason: short, type, from, target, group; then the RPC layer's
        packets for the server dropped, by reason (``rpc_*``)."""
        return {reason.label: self._drops[reason] for reason in m.DropReason} | self.api.stats()
