"""A shard process: one uvloop loop serving its share of the connections.

The supervisor forks it with a listening socket (``SO_REUSEPORT``: the
kernel spreads new connections over the shards), an events ring to write
and a commands ring to read.  Everything happens on the loop thread:

* connections turn what peers do into event records (`emit`), which are
  published once per loop iteration (`_flush`, scheduled with ``call_soon``
  at the first record: uvloop runs it after the iteration's I/O callbacks);
* the commands ring is drained by a `RingReader`; frames for one connection
  are written with one ``writelines`` per batch.

In Godot's multiplayer mode (``gd_mp_api``) the shard is also the relay:
a client frame addressed to peers of this shard is written to them here,
byte for byte; only frames for the server or for peers of other shards go
through the front (`EV_MP_FRAME`).  A peer takes part in the relay once the
front has welcomed it (`CMD_MP_WELCOME`: its id and the peers it may know),
so that system messages and relayed frames reach every peer in Godot's order.
A peer welcomed with relay groups (``mp_rooms``, ``set_relay_groups``)
reaches only the peers it shares a group with: the shard checks that for its
own peers (one attribute test when the mode is off), the front for the
others (`CMD_MP_FORWARD` with the sender's groups), and `CMD_MP_GROUP`
applies a membership change and the system messages it brings at once.

A full events ring is backpressure, never loss: the shard keeps the records
it could not push, stops reading from every socket, and resumes once the
front has made room.

With ``compression`` each connection's wire is a `DeflateWire` (a plain
`ServerWire` otherwise): peers that negotiate permessage-deflate get what is
sent to them deflated, broadcasts included (`_broadcast_mixed`, only while the
shard has such a peer); the relay's frames stay uncompressed.

Limits (the `Limits` of its `ShardConfig`, see ``WebSocketServer``) cost
nothing per message: the handshake checks them (`admit`, `origin_allowed`,
``max_request_bytes``), and keepalive is one timer per shard that sweeps every
connection (`_keepalive`), not a timer per connection.
"""

from __future__ import annotations

import asyncio
import ctypes
import functools
import logging
import math
import os
import random
import signal
import socket
import time
from collections.abc import Collection, Iterable, Sequence
from typing import Any

import uvloop
from websockets.exceptions import NegotiationError
from websockets.extensions.permessage_deflate import ServerPerMessageDeflateFactory

from wsfleet.ipc import Consumer, Producer, Record, ShardState, SharedRing, control
from wsfleet.ipc import messages as m
from wsfleet.ipc.aio import RingReader
from wsfleet.ipc.config import ShardConfig
from wsfleet.ipc.handoff import MovedConnection
from wsfleet.ipc.logconfig import ACCESS_LOGGER
from wsfleet.ipc.logconfig import apply as apply_logging
from wsfleet.ipc.proctitle import set_title
from wsfleet.ipc.shardstate import HEARTBEAT_SECONDS
from wsfleet.ipc.stats import PUBLISH_SECONDS, SHARD_FIELDS, ShardStats
from wsfleet.ipc.tls import TlsError, server_context

from .app import ShardApp
from .connection import CLOSE_GRACE_SECONDS, Deadlines, PeerConnection, frame_header
from .handoff import hand_off, take_over
from .wire import DeflateWire, Phase, ServerWire

log = logging.getLogger("wsfleet.shard")
access_log = logging.getLogger(ACCESS_LOGGER)

#: Exit status of a shard that cannot start (bad TLS files...): do not restart it.
EXIT_BOOT_FAILED = 3
#: The supervisor's order to stop: close every peer with 1001, exit 0.  Not SIGTERM:
#: that one reaches every process of the group at once (systemctl stop, kill -TERM
#: -PGID) and the front must drive the stop, so shards ignore it (see supervisor.arbiter).
STOP_SIGNAL = signal.SIGUSR1
_PR_SET_PDEATHSIG = 1
GRACEFUL_CLOSE_SECONDS = 2.0
#: Bounds of the keepalive sweep's period (1/16 of the shorter of interval and timeout):
#: an idle sweep costs ~0.2 us per connection, a ping ~5 us (its write).
_SWEEP_MIN_SECONDS, _SWEEP_MAX_SECONDS = 0.05, 1.0
_OPEN = Phase.OPEN


class Shard:
    """The state of one shard: its connections, its rings, its id range."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        config: ShardConfig,
        events: Producer,
        commands: Consumer,
        state: ShardState,
        stats: ShardStats | None = None,
    ) -> None:
        self.loop = loop
        self.index: int = config.index
        self.protocols: tuple[str, ...] = config.protocols
        limits = config.limits
        self.max_message: int = limits.max_message_size
        self.handshake_timeout: float = limits.handshake_timeout
        #: The connections whose handshake must end in time, and those whose close may
        #: wait CLOSE_GRACE_SECONDS at most: one timer each for all.
        self.handshake_deadlines = Deadlines(loop, self.handshake_timeout)
        self.close_deadlines = Deadlines(loop, CLOSE_GRACE_SECONDS)
        self.max_request_bytes: int = limits.max_request_bytes
        self.max_peers: int = limits.max_peers  # 0: no limit
        self.max_peers_per_address: int = limits.max_peers_per_address  # 0: no limit
        origins = limits.allowed_origins
        self.allowed_origins: frozenset[str] | None = (
            None if origins is None else frozenset(origins)
        )
        self.require_origin: bool = limits.require_origin
        self.ping_interval: float | None = limits.ping_interval
        self.ping_timeout: float | None = limits.ping_timeout
        self.mp: bool = config.gd_mp_api
        self.health_path: str | None = limits.health_path
        self.hold_upgrades: bool = limits.hold_upgrades
        #: Upgrades waiting for the application's verdict, by the id each will have.
        self.pending: dict[int, PeerConnection] = {}
        self.message_rate: float | None = limits.max_message_rate
        self.message_burst: float = float(
            limits.message_burst or max(1, math.ceil(limits.max_message_rate or 0))
        )
        self.health_header = [("X-Wsfleet-Shard", str(self.index))]
        #: zlib's settings for what the server deflates (permessage-deflate).
        self.compress_settings = {
            "memLevel": limits.compression_mem_level,
            "level": limits.compression_level,
        }
        #: What each connection's wire is made by: a `DeflateWire` (negotiating
        #: permessage-deflate) only with ``compression``, else the plain `ServerWire`.
        self.wire_factory: Any = ServerWire
        if limits.compression:
            no_takeover = not limits.compression_context_takeover
            factory = ServerPerMessageDeflateFactory(
                server_no_context_takeover=no_takeover,
                client_no_context_takeover=no_takeover,
                server_max_window_bits=limits.compression_window_bits,
                client_max_window_bits=limits.compression_window_bits,
                compress_settings=self.compress_settings,
            )
            self.wire_factory = functools.partial(DeflateWire, extensions=[factory])
        #: The open peers that negotiated permessage-deflate: a broadcast deflates for them
        #: (`_broadcast_mixed`); while there is none it is the plain loop over one frame.
        self.deflate_peers: set[PeerConnection] = set()
        #: What each connection's wire calls for a plain HTTP request: bound once here, not
        #: per connection (None: no health path, every one gets 426).
        self.http_answerer = self.answer_http if self.health_path else None
        self.stopping = False
        self.refusing = False
        #: Per-connection lines: connects and departures (the access log), and the level of
        #: refusals and abnormal closes (None: not logged). Decided once: a handshake pays
        #: one attribute check when they are off, a message nothing.
        self.access: bool = config.log.access_log
        self.conn_log_level: int | None = config.log.connection_log_level()
        self._mp_drops = [0] * len(m.DropReason)
        self._id_base: int = config.id_base
        self._id_span: int = config.id_span
        # The next id lives in memory the supervisor keeps across restarts,
        # so a restarted shard does not hand out its predecessor's ids again;
        # the peer counts of every shard live there too (max_peers).
        # (Its peer count is 0 at the first start and after the supervisor reaped a
        # predecessor; a successor that takes connections over publishes its own, `adopt`.)
        self._state = state
        self._next_id_word = state.next_id_word(self.index)
        self.events = events
        self.commands = commands
        self.peers: dict[int, PeerConnection] = {}
        #: Every live connection, open or not (what a handoff must move or see gone).
        self.connections: set[PeerConnection] = set()
        #: Groups (``server.join``): name -> its members on this shard.
        self.groups: dict[bytes, set[PeerConnection]] = {}
        # Events not yet in the ring, in order: those of this loop iteration (pushed
        # together by _flush, one C loop for the batch) and those a full ring did not take.
        self._backlog: list[Record] = []
        self.reading_paused = False
        self._flush_scheduled = False
        self._credits: dict[int, list[int]] = {}
        self._touched: list[PeerConnection] = []
        #: One per listening socket (one per address the front bound).
        self.servers: list[asyncio.AbstractServer] = []
        # Counters (wsfleet.ipc.stats): the busy ones are plain attributes that the
        # connections add to once per read or write batch, the rare ones live in
        # ``counts``; `publish_stats` copies them all to shared memory on a timer.
        self.stats = stats
        self.counts = stats.resume() if stats is not None else dict.fromkeys(SHARD_FIELDS, 0)
        self.messages_in: int = self.counts["messages_in"]
        self.bytes_in: int = self.counts["bytes_in"]
        self.messages_out: int = self.counts["messages_out"]
        self.bytes_out: int = self.counts["bytes_out"]
        self.paused_sockets = 0
        #: The shard handler (``shard_handler``: `start_app`), None without one.
        self.app: ShardApp | None = None

        # websockets binds this to its ServerProtocol, so it must be a plain function.
        def select_subprotocol(_protocol: Any, offered: Sequence[str]) -> str | None:
            return self._select_subprotocol(offered)

        self.select_subprotocol = select_subprotocol

    def start_app(self, spec: str) -> None:
        """Import the shard handler ``spec`` names and make it (its factory's errors
        propagate: the shard cannot boot)."""
        self.app = ShardApp(self, spec)

    # -- handshake policy -----------------------------------------------------------

    def choose_subprotocol(self, offered: Sequence[str]) -> str:
        """Godot's choice ("" for none); `NegotiationError` when Godot would refuse."""
        return self._select_subprotocol(offered) or ""

    def _select_subprotocol(self, offered: Sequence[str]) -> str | None:
        """Godot's rule: the first protocol in the *client's* list that the server lists."""
        if not self.protocols:
            if offered:
                raise NegotiationError(
                    "this server speaks no subprotocol, the client asked for: " + ", ".join(offered)
                )
            return None
        for protocol in offered:
            if protocol in self.protocols:
                return protocol
        raise NegotiationError(
            "no common subprotocol; the server speaks: " + ", ".join(self.protocols)
        )

    def origin_allowed(self, origins: Sequence[str]) -> bool:
        """The Origin check: any without ``allowed_origins``; else exactly one listed Origin.

        A request without Origin (native clients such as Godot's send none;
        browsers always do) passes unless ``require_origin``.
        """
        if self.allowed_origins is None:
            return True
        if not origins:
            return not self.require_origin
        return len(origins) == 1 and origins[0] in self.allowed_origins

    @property
    def draining(self) -> bool:
        """``wsfleet drain``: new upgrades are refused with 503 (read once per handshake)."""
        return self.stats is not None and self.stats.draining

    def answer_http(self, path: str) -> tuple[int, str, list[tuple[str, str]]] | None:
        """A plain HTTP request (no Upgrade): the health check at ``health_path`` (this
        shard's: its header names it), else None (websockets answers 426)."""
        if path != self.health_path:
            return None
        if self.stopping or self.draining:
            return 503, "draining\n" if self.draining else "stopping\n", self.health_header
        return 200, "ok\n", self.health_header

    def admit(self) -> bool:
        """Take a ``max_peers`` slot for a connection about to open; False when the server is full.

        On True the caller opens the connection at once (`peer_connected`),
        which is what makes ``len(self.peers)`` match the published count.
        """
        return self._state.admit(self.index, self._held(), self.max_peers)

    def claim_address(self, ip: str) -> bool:
        """Count a connection from ``ip`` against ``max_peers_per_address`` (every shard's
        connections from it); False, and nothing counted, when it has as many already."""
        return self._state.claim_address(self.index, ip, self.max_peers_per_address)

    def release_address(self, ip: str) -> None:
        """A connection `claim_address` counted has ended."""
        self._state.release_address(self.index, ip)

    def _held(self) -> int:
        """Peers and waiting upgrades: the ``max_peers`` slots this shard holds."""
        return len(self.peers) + len(self.pending)

    # -- upgrades waiting for the application (a handshake handler) ----------------------

    def hold(self, conn: PeerConnection, protocol: str, offered: list[str]) -> int:
        """A valid upgrade waits for the front's verdict: its future id, told to the front."""
        token = self._allocate_id()
        self.pending[token] = conn
        head = conn.wire.take_request_head()
        payload = m.encode_handshake(conn.ip, conn.port, protocol, offered, head)
        self.emit(m.EV_HANDSHAKE, token, 0, payload)
        return token

    def hold_moved(self, conn: PeerConnection, token: int) -> None:
        """A waiting upgrade the previous shard process handed over waits again under its
        token (the front has its request already: no event)."""
        conn.wire.take_request_head()
        self.pending[token] = conn
        self._state.set_peers(self.index, self._held())

    def end_pending(self, token: int) -> None:
        """A waiting upgrade ended without a verdict (deadline, the client left)."""
        if self.pending.pop(token, None) is not None:
            self._state.set_peers(self.index, self._held())
            self.emit(m.EV_HANDSHAKE_ENDED, token, 0, b"")

    def _verdict(self, token: int, accept: bool, payload: bytes) -> None:
        conn = self.pending.pop(token, None)
        if conn is None:
            return  # ended meanwhile: the front heard HANDSHAKE_ENDED
        status, protocol, text, headers = m.decode_verdict(payload)
        if accept:
            conn.accept_pending(protocol, headers)
        else:
            conn.refuse_pending(status, text, headers)
        self._state.set_peers(self.index, self._held())

    def log_connection(self, level: int, text: str, *args: object) -> None:
        """One per-connection line (callers check ``access`` / ``conn_log_level`` first)."""
        access_log.log(level, text, *args)

    # -- heartbeat -------------------------------------------------------------------------

    def heartbeat(self) -> None:
        """Tell the supervisor this loop still turns (a hung shard is killed and replaced)."""
        self._state.beat(self.index)
        self.loop.call_later(HEARTBEAT_SECONDS, self.heartbeat)

    # -- keepalive -------------------------------------------------------------------------

    def start_keepalive(self) -> None:
        """Sweep every connection periodically if keepalive pings are on."""
        if self.ping_interval:
            self.loop.call_later(self._sweep_period(), self._keepalive)

    def _sweep_period(self) -> float:
        shortest = min(t for t in (self.ping_interval, self.ping_timeout) if t)
        return min(max(shortest / 16, _SWEEP_MIN_SECONDS), _SWEEP_MAX_SECONDS)

    def first_ping_time(self) -> float:
        """When a new connection gets its first ping: after 0.5 to 1.5 intervals.

        The random phase spreads the pings of peers that connected together
        (a start, a reconnect storm) over many sweeps: pinging 10,000 at once
        would stall the loop for ~50 ms.
        """
        return self.loop.time() + (self.ping_interval or 0.0) * (0.5 + random.random())

    def _keepalive(self) -> None:
        now = self.loop.time()
        interval, timeout = self.ping_interval, self.ping_timeout
        assert interval
        for conn in list(self.peers.values()):  # a failed one may leave during the sweep
            conn.keepalive(now, interval, timeout)
        self.loop.call_later(self._sweep_period(), self._keepalive)

    # -- peers ----------------------------------------------------------------------------

    def _allocate_id(self) -> int:
        word = self._next_id_word
        offset = word[0] % self._id_span
        for _ in range(self._id_span):
            peer_id = self._id_base + offset
            offset = (offset + 1) % self._id_span
            if peer_id not in self.peers and peer_id not in self.pending:
                word[0] = offset
                return peer_id
        raise RuntimeError("every peer id of this shard is in use")

    def peer_connected(self, conn: PeerConnection, protocol: str, peer_id: int = 0) -> int:
        """A peer opened (with ``peer_id``: the id its wait was known by); its id."""
        if not peer_id:
            peer_id = self._allocate_id()
        self.peers[peer_id] = conn
        self.emit(
            m.EV_CONNECTED,
            peer_id,
            0,
            m.encode_connected(conn.ip, conn.port, protocol, conn.wire.take_request_head()),
        )
        if self.access:
            access_log.info(
                "peer %d connected from %s:%d, subprotocol %s",
                peer_id,
                conn.ip,
                conn.port,
                protocol or "(none)",
            )
        if self.app is not None:
            self.app.connected(conn, protocol)
        return peer_id

    def adopt(self, conn: PeerConnection) -> None:
        """Take an open peer over from the previous shard process (no event: it only moved)."""
        self.peers[conn.peer_id] = conn
        self._state.set_peers(self.index, self._held())

    @property
    def has_backlog(self) -> bool:
        """Events not yet in the ring (a full ring holds them back)."""
        return bool(self._backlog)

    def left_during_handoff(self, peer_id: int, pending_token: int, ip: str) -> None:
        """A connection handed over whose socket was gone on arrival: report it gone (a
        peer, or an upgrade that waited for its verdict) and free what it counted."""
        if self.max_peers_per_address and (peer_id or pending_token):
            self.release_address(ip)
        self._state.set_peers(self.index, self._held())
        if peer_id:
            self.emit(m.EV_DISCONNECTED, peer_id, 0, b"")
        elif pending_token:
            self.emit(m.EV_HANDSHAKE_ENDED, pending_token, 0, b"")

    def flush(self) -> None:
        """Publish now what this loop iteration queued (events, credits, frames)."""
        self._flush()

    def join(self, conn: PeerConnection, group: bytes) -> None:
        self.groups.setdefault(group, set()).add(conn)
        if conn.groups is None:
            conn.groups = set()
        conn.groups.add(group)

    def leave(self, conn: PeerConnection, group: bytes) -> None:
        members = self.groups.get(group)
        if members is not None:
            members.discard(conn)
            if not members:
                del self.groups[group]
        if conn.groups is not None:
            conn.groups.discard(group)

    def peer_gone(self, conn: PeerConnection, clean: bool) -> None:
        if conn.groups:
            for group in list(conn.groups):
                self.leave(conn, group)
        if self.peers.get(conn.peer_id) is conn:
            del self.peers[conn.peer_id]
        self._state.set_peers(self.index, self._held())  # the slot is free again
        self._credits.pop(conn.peer_id, None)
        self.emit(m.EV_DISCONNECTED, conn.peer_id, m.FLAG_CLEAN if clean else 0, b"")
        if self.app is not None:
            self.app.disconnected(conn.peer_id)

    # -- events to the front -------------------------------------------------------------

    def emit(self, kind: int, peer: int, flags: int, payload: bytes) -> None:
        """Queue an event for the front; it is published at the end of this loop iteration."""
        self._backlog.append((kind, peer, flags, payload))
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self.loop.call_soon(self._flush)

    def _push_backlog(self) -> None:
        """Move the queued events into the ring; if it is full, stop reading until it drains."""
        if self.reading_paused:
            return  # waiting for space: _on_space pushes them
        taken = self.events.push_many(self._backlog)
        del self._backlog[:taken]
        if self._backlog:
            self._ring_full()

    def credit(self, peer: int, packets: int, size: int) -> None:
        self.messages_out += packets
        self.bytes_out += size
        entry = self._credits.get(peer)
        if entry is None:
            self._credits[peer] = [packets, size]
        else:
            entry[0] += packets
            entry[1] += size
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self.loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self._touched:
            self._write_touched()
        backlog = self._backlog
        if self.mp and any(self._mp_drops):
            backlog.append((m.EV_MP_DROPS, 0, 0, m.encode_drops(self._mp_drops)))
            self._mp_drops = [0] * len(m.DropReason)
        if self._credits:
            credits, self._credits = self._credits, {}
            backlog.append((m.EV_CREDITS, 0, 0, m.encode_credits(credits)))
        if backlog:
            self._push_backlog()
        self.events.flush()

    def _ring_full(self) -> None:
        """Stop reading from every socket until the front makes room."""
        self.reading_paused = True
        for conn in list(self.peers.values()):
            conn.pause_by_shard(True)
        self.loop.add_reader(self.events.space_fileno(), self._on_space)
        if self.events.arm_space():
            self.loop.call_soon(self._on_space)

    def _on_space(self) -> None:
        self.events.disarm_space()
        taken = self.events.push_many(self._backlog)
        del self._backlog[:taken]
        self.events.flush()
        if self._backlog:
            if self.events.arm_space():
                self.loop.call_soon(self._on_space)
            return
        self.loop.remove_reader(self.events.space_fileno())
        self.reading_paused = False
        for conn in list(self.peers.values()):
            conn.pause_by_shard(False)

    # -- commands from the front ------------------------------------------------------------

    def _schedule_flush(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self.loop.call_soon(self._flush)

    def _queue_frame(self, conn: PeerConnection, frame: bytes) -> None:
        """Queue a built frame for ``conn``; it is written at the end of this iteration."""
        first_in_batch = not conn.outbox
        if conn.queue_frame(frame):
            self.messages_out += 1  # broadcasts and relayed frames (never credited)
            self.bytes_out += len(frame)
            if first_in_batch:
                self._touched.append(conn)
                self._schedule_flush()

    def _write_touched(self) -> None:
        touched, self._touched = self._touched, []
        for conn in touched:
            conn.write_outbox()

    # -- multiplayer relay ----------------------------------------------------------------

    def mp_frame(self, conn: PeerConnection, data: bytes) -> None:
        """A client frame in multiplayer mode: check it, relay it (docs/GODOT_WIRE.md §4.3)."""
        if len(data) < m.MP_HEADER_SIZE:
            self._mp_drops[m.DropReason.SHORT] += 1
            return
        kind, sender, to = m.MP_HEADER.unpack_from(data)
        if kind != m.SYS_NONE:
            self._mp_drops[m.DropReason.TYPE] += 1
        elif sender != conn.peer_id or not conn.mp_welcomed:
            self._mp_drops[m.DropReason.FROM] += 1
        elif to > 1:
            if to == sender:
                self._mp_drops[m.DropReason.TARGET] += 1
            elif self._owns(to):
                target = self.peers.get(to)
                if target is None or not target.mp_welcomed:
                    self._mp_drops[m.DropReason.TARGET] += 1
                elif conn.mp_rooms and not _share_group(conn, target):
                    self._mp_drops[m.DropReason.GROUP] += 1
                else:
                    self._queue_frame(target, frame_header(0x82, len(data)) + data)
            else:
                self.emit(m.EV_MP_FRAME, sender, 0, data)  # a peer of another shard
        else:
            if to != 1:  # 0 or -n: the local peers first, then the front
                if conn.mp_rooms:
                    if conn.groups:
                        self._mp_deliver_groups(data, sender, to, conn.groups)
                else:
                    self._mp_deliver(data, sender, to)
            self.emit(m.EV_MP_FRAME, sender, 0, data)
        if any(self._mp_drops):
            self._schedule_flush()

    def _owns(self, peer_id: int) -> bool:
        return 0 <= peer_id - self._id_base < self._id_span

    def _mp_deliver(self, data: bytes | memoryview, sender: int, to: int) -> None:
        """Write a frame to this shard's welcomed peers by its ``to``, never to ``sender``."""
        frame = frame_header(0x82, len(data)) + data
        if to > 1:
            target = self.peers.get(to)
            if target is not None and target.mp_welcomed and to != sender:
                self._queue_frame(target, frame)
            return
        excluded = -to  # 0 excludes no one
        for peer_id, conn in self.peers.items():
            if peer_id != sender and peer_id != excluded and conn.mp_welcomed:
                self._queue_frame(conn, frame)

    def _mp_deliver_groups(
        self, data: bytes | memoryview, sender: int, to: int, groups: Collection[bytes]
    ) -> None:
        """Relay groups: write a frame for ``to`` 0 or -n to this shard's welcomed members of
        ``groups`` (the sender's), once each, never to ``sender`` nor to n."""
        frame = frame_header(0x82, len(data)) + data
        excluded = -to  # 0 excludes no one
        if len(groups) == 1:  # the usual case: one room, each member once already
            (group,) = groups
            targets: Iterable[PeerConnection] = self.groups.get(group, ())
        else:
            targets = set()
            for group in groups:
                targets |= self.groups.get(group, set())
        for conn in targets:
            peer_id = conn.peer_id
            if peer_id != sender and peer_id != excluded and conn.mp_welcomed:
                self._queue_frame(conn, frame)

    def _mp_welcome(self, peer_id: int, rooms: bool, known: bytes) -> None:
        conn = self.peers.get(peer_id)
        if conn is None:
            return
        frames = [m.sys_frame_payload(m.SYS_ID, peer_id), m.sys_frame_payload(m.SYS_ADD, 1)]
        frames += [m.sys_frame_payload(m.SYS_ADD, other) for other in m.decode_ids(known)]
        for body in frames:
            self._queue_frame(conn, frame_header(0x82, len(body)) + body)
        conn.mp_welcomed = True
        conn.mp_rooms = rooms

    def _mp_group(self, peer_id: int, kind: int, payload: bytes) -> None:
        """Relay groups: a membership change of ``peer_id`` and its news (`CMD_MP_GROUP`)."""
        group, others = m.decode_mp_group(payload)
        conn = self.peers.get(peer_id)
        if conn is not None and group:
            if kind == m.SYS_ADD:
                self.join(conn, group)
            else:
                self.leave(conn, group)
        if conn is not None and conn.mp_welcomed:
            for other in others:
                body = m.sys_frame_payload(kind, other)
                self._queue_frame(conn, frame_header(0x82, len(body)) + body)
        body = m.sys_frame_payload(kind, peer_id)
        frame = frame_header(0x82, len(body)) + body
        for other in others:
            target = self.peers.get(other)
            if target is not None and target.mp_welcomed and other != peer_id:
                self._queue_frame(target, frame)

    def _mp_sys_all(self, kind: int, subject: int) -> None:
        body = m.sys_frame_payload(kind, subject)
        frame = frame_header(0x82, len(body)) + body
        for peer_id, conn in self.peers.items():
            if peer_id != subject and conn.mp_welcomed:
                self._queue_frame(conn, frame)

    # -- commands from the front ------------------------------------------------------------

    def on_commands(self, records: list[Record]) -> None:
        peers = self.peers
        touched = self._touched
        for kind, peer_id, flags, payload in records:
            if kind == m.CMD_SEND_BINARY or kind == m.CMD_SEND_TEXT:
                conn = peers.get(peer_id)
                if conn is not None:
                    first_in_batch = not conn.outbox
                    if conn.queue_message(payload, kind == m.CMD_SEND_TEXT) and first_in_batch:
                        touched.append(conn)
            elif kind == m.CMD_MP_FORWARD:
                if flags & m.FLAG_GROUP:
                    groups, frame = m.decode_group_frame(payload)
                    to = m.MP_HEADER.unpack_from(frame)[2]
                    self._mp_deliver_groups(frame, peer_id, to, groups)
                else:
                    to = m.MP_HEADER.unpack_from(payload)[2]
                    self._mp_deliver(payload, peer_id, to)
            elif kind == m.CMD_MP_SYS_ALL:
                self._mp_sys_all(flags, peer_id)
            elif kind == m.CMD_MP_WELCOME:
                self._mp_welcome(peer_id, bool(flags & m.FLAG_ROOMS), payload)
            elif kind == m.CMD_MP_GROUP:
                self._mp_group(peer_id, flags, payload)
            elif kind == m.CMD_REFUSE:
                self.refusing = bool(flags)
            elif kind == m.CMD_VERDICT:
                self._verdict(peer_id, bool(flags), payload)
            elif kind == m.CMD_BROADCAST:
                first = 0x81 if flags & m.FLAG_TEXT else 0x82
                if flags & m.FLAG_GROUP:
                    group, excluded, message = m.decode_group_broadcast(payload)
                    frame = frame_header(first, len(message)) + message
                    if self.deflate_peers:
                        members = self.groups.get(group, ())
                        self._broadcast_mixed(members, excluded, frame, message, first)
                        continue
                    for conn in self.groups.get(group, ()):
                        if conn.peer_id not in excluded:
                            self._queue_frame(conn, frame)
                else:
                    excluded, message = m.decode_broadcast(payload)
                    frame = frame_header(first, len(message)) + message
                    if self.deflate_peers:
                        self._broadcast_mixed(peers.values(), excluded, frame, message, first)
                        continue
                    for conn_id, conn in peers.items():
                        if conn_id not in excluded:
                            self._queue_frame(conn, frame)
            else:
                conn = peers.get(peer_id)
                if conn is None:
                    continue
                if kind == m.CMD_CLOSE:
                    if flags & m.FLAG_FAIL:
                        conn.fail(*m.decode_close(payload))
                    else:
                        conn.close(*m.decode_close(payload))
                elif kind == m.CMD_PAUSE_READING:
                    conn.pause_by_front(True)
                elif kind == m.CMD_RESUME_READING:
                    conn.pause_by_front(False)
                elif kind == m.CMD_NO_DELAY:
                    conn.set_no_delay(bool(flags))
                elif kind == m.CMD_GROUP:
                    if flags:
                        self.join(conn, bytes(payload))
                    else:
                        self.leave(conn, bytes(payload))
                else:
                    log.error("shard %d: unknown command kind %d", self.index, kind)
        self._write_touched()

    def _broadcast_mixed(
        self,
        conns: Any,
        excluded: Any,
        frame: bytes,
        message: bytes,
        first: int,
    ) -> None:
        """A broadcast while some peers of this shard use permessage-deflate: the others get
        the one prebuilt ``frame``; a deflate peer gets the message deflated, by its own
        zlib stream when it has context takeover, else from one deflation per broadcast
        shared by every such peer with the same window (a fresh context per message gives
        the same bytes for all of them)."""
        text = first == 0x81
        shared: dict[int, bytes] = {}
        for conn in conns:
            if conn.peer_id in excluded:
                continue
            deflate = conn.wire.deflate
            if deflate is None:
                self._queue_frame(conn, frame)
            elif conn.wire.phase is not _OPEN:
                continue
            elif deflate.local_no_context_takeover:
                bits = deflate.local_max_window_bits
                deflated = shared.get(bits)
                if deflated is None:
                    deflated = shared[bits] = conn.wire.compress(message, text)
                self._queue_frame(conn, deflated)
            else:
                self._queue_frame(conn, conn.wire.compress(message, text))

    # -- counters -------------------------------------------------------------------------

    def count(self, field: str) -> None:
        """One more of a rare event (a refusal, a close by code: `wsfleet.ipc.stats`)."""
        self.counts[field] += 1

    def start_stats(self) -> None:
        if self.stats is not None:
            self.loop.call_later(PUBLISH_SECONDS, self._stats_timer)

    def _stats_timer(self) -> None:
        self.publish_stats()
        self.loop.call_later(PUBLISH_SECONDS, self._stats_timer)

    def publish_stats(self) -> None:
        """Copy every counter into this shard's shared block (every `PUBLISH_SECONDS`)."""
        if self.stats is None:
            return
        counts = self.counts
        counts["peers"] = len(self.peers)
        counts["messages_in"] = self.messages_in
        counts["bytes_in"] = self.bytes_in
        counts["messages_out"] = self.messages_out
        counts["bytes_out"] = self.bytes_out
        counts["paused_sockets"] = self.paused_sockets
        ring = self.events.ring
        counts["ring_fill"] = max(0, ring.used())
        counts["ring_capacity"] = ring.capacity
        self.stats.publish(counts)

    # -- shutdown ------------------------------------------------------------------------

    async def close_gracefully(self) -> None:
        """Stop accepting, send close 1001 to every peer, wait a little for them to go.

        Whatever the front sent before it asked to stop is in the commands ring
        by now (it fills the ring before it tells the supervisor, which then
        sends `STOP_SIGNAL`), but the `RingReader` may not have taken it yet (the
        signal can win the race, and it drains a long ring over several loop
        iterations): it is written first, so those packets precede the close frame.
        Bounded: when the supervisor stops us because the front died, nothing more
        comes, but a bound costs nothing (``time.monotonic``: uvloop's ``loop.time()``
        stands still inside a callback).
        """
        self.stopping = True
        for server in self.servers:
            server.close()
        drain_until = time.monotonic() + GRACEFUL_CLOSE_SECONDS / 2
        while time.monotonic() < drain_until and (records := self.commands.pop_all()):
            self.on_commands(records)
        for conn in list(self.peers.values()):
            conn.close(1001, "server shutting down")
        deadline = self.loop.time() + GRACEFUL_CLOSE_SECONDS
        while self.peers and self.loop.time() < deadline:
            await asyncio.sleep(0.02)
        for conn in list(self.peers.values()):
            if conn.transport is not None:
                conn.transport.abort()
        await asyncio.sleep(0)
        self._flush()
        self.publish_stats()


def _share_group(a: PeerConnection, b: PeerConnection) -> bool:
    """Whether two peers are in some group together (relay groups)."""
    return bool(a.groups and b.groups and not a.groups.isdisjoint(b.groups))


def _die_with_parent() -> None:
    """Ask the kernel to SIGKILL this process when the supervisor dies."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux: the supervisor's lifeline still ends us
        pass


def run(
    config: ShardConfig,
    listen_socks: list[socket.socket],
    events_ring: SharedRing,
    commands_ring: SharedRing,
    state: ShardState,
    supervisor_pid: int,
    stats: ShardStats | None = None,
    channel: socket.socket | None = None,
    takeover: tuple[list[MovedConnection], list[int]] | None = None,
) -> int:
    """The shard process's main function; returns its exit status.

    Called in the child the supervisor forked, or (``takeover``: the
    connections a predecessor handed over) in a fresh interpreter started by
    ``wsfleet reload`` (`wsfleet.shards.successor`).  ``channel``: the
    shard's end of its channel to the supervisor, on which `HandOff` comes.
    """
    _die_with_parent()
    if os.getppid() != supervisor_pid:
        return 1  # the supervisor died before the death signal was armed
    # Ctrl-C and a group-wide SIGTERM are the front's to handle: it makes the supervisor send
    # STOP_SIGNAL once every packet it sent is in the commands ring.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    apply_logging(config.log, f"shard {config.index}")
    set_title(f"shard {config.index}/{config.shards}", config.port)
    try:
        # The loader the front's listen() checked the same text with: it does not fail here.
        ssl_context = server_context(config.tls) if config.tls is not None else None
    except (TlsError, OSError) as exc:
        log.error("shard %d: cannot load the TLS certificate/key: %s", config.index, exc)
        return EXIT_BOOT_FAILED

    loop = uvloop.new_event_loop()
    asyncio.set_event_loop(loop)
    shard = Shard(loop, config, Producer(events_ring), Consumer(commands_ring), state, stats)
    if config.shard_handler:
        try:
            shard.start_app(config.shard_handler)
        except Exception:
            log.exception(
                "shard %d: cannot make the shard handler %s: its factory raised",
                config.index,
                config.shard_handler,
            )
            loop.close()
            return EXIT_BOOT_FAILED
    reader = RingReader(loop, shard.commands, shard.on_commands)
    stopping = loop.create_future()
    handing_off: list[asyncio.Task[None]] = []

    def stop() -> None:
        # Once the handoff has begun the successor owns the stop: this process exits
        # as soon as its connections are sent.
        if not handing_off and not stopping.done():
            stopping.set_result(None)

    loop.add_signal_handler(STOP_SIGNAL, stop)

    def on_channel() -> None:
        assert channel is not None
        try:
            received = control.receive(channel)
        except BlockingIOError:
            return
        except (control.ControlError, OSError) as exc:
            log.error("shard %d: bad message from the supervisor: %s", config.index, exc)
            return
        if received is None:  # the supervisor is gone: its death signal ends us
            loop.remove_reader(channel.fileno())
            return
        message, fds = received
        if isinstance(message, control.HandOff) and not handing_off and not stopping.done():
            link = socket.socket(fileno=fds[0])
            handing_off.append(loop.create_task(hand_off(shard, reader, link)))
        else:
            for fd in fds:
                os.close(fd)
            log.error("shard %d: unexpected message from the supervisor: %r", config.index, message)

    async def serve() -> None:
        if takeover is not None:
            shard.count("reloads")
            moved = await take_over(shard, loop, *takeover)
        for listen_sock in listen_socks:
            server = await loop.create_server(
                lambda: PeerConnection(shard),
                sock=listen_sock,
                ssl=ssl_context,
                backlog=1024,
                # The TLS handshake comes before the WebSocket one: the same bound applies.
                ssl_handshake_timeout=shard.handshake_timeout if ssl_context else None,
            )
            shard.servers.append(server)
        shard.start_keepalive()
        shard.start_stats()
        shard.heartbeat()
        reader.start()
        if channel is not None:
            channel.setblocking(False)
            loop.add_reader(channel.fileno(), on_channel)
            if takeover is not None:
                shard.publish_stats()  # so that a status right after the reload shows it
                control.send(channel, control.TookOver(connections=moved))
        # Blocked since the fork; unblocked only now that the loop runs, because uvloop
        # drops a signal that arrives before (a pending STOP_SIGNAL is handled right here).
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM, STOP_SIGNAL})
        await stopping
        await shard.close_gracefully()

    try:
        loop.run_until_complete(serve())
    finally:
        reader.stop()
        loop.close()
    return 0
