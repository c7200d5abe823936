"""The fleet link: the front's end of the supervisor and of every shard's rings.

Owns the processes' side of the front, and nothing of Godot's API:

* starting the supervisor (a fresh interpreter) with the listening sockets,
  the `FleetConfig`, the control channel and the lifeline, and stopping it;
* the control messages (`ShardUp` with the ring fds, `ShardDown`,
  `ShardFailed`) and the `ShardLink` of each running shard;
* `poll`: draining every events ring (without blocking, or waiting on
  epoll / the caller's select), and the dispatch of event records: inbound
  messages into each peer's `PeerChannel`, credits back to the outbound
  counters, connections and departures to the `FleetListener`,
  multiplayer frames and drop counts to the `RelayHooks`;
* command batching: commands queue per shard during ``poll`` and go into
  the ring together when it ends (one C loop for the batch); outside
  ``poll`` they go at once.  A full ring keeps them queued, in order, and
  the shard's space bell (in the same epoll) wakes ``poll`` to send the
  rest: a message larger than the ring goes through even if nothing else
  happens meanwhile.

In a cluster (``cluster=``) the node's `ClusterHooks` (`wsfleet.cluster`) is
polled here too: its eventfd sits in the same epoll, its messages are handled
after the shards' events, and what the tick sent to other nodes leaves after
the shards' commands; the node's id range (its leased slot) comes with the
`FleetConfig`, and `shard_of` computes a peer's shard from it.

The per-message path is C: `wsfleet.ipc.inbox.deliver` files a batch's
messages into the peers' inboxes and calls the application's
``data_received`` handlers (per message, or once per peer per batch with
``per_peer``); `_dispatch` handles every other record in Python, in order.

Imports `wsfleet.ipc` and `.channel` only; the server and the relay plug in
through `FleetListener` and `RelayHooks`.
"""

from __future__ import annotations

import logging
import os
import select
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import orjson

from wsfleet.ipc import Consumer, Lifeline, Producer, Record, RingFds, SharedRing, control
from wsfleet.ipc import messages as m
from wsfleet.ipc.config import FleetConfig
from wsfleet.ipc.inbox import append_commands, deliver
from wsfleet.ipc.stats import ProcessMeter, ShardView, Stats, status_document

from .channel import OutboundBudget, PeerChannel, PeerLimits

log = logging.getLogger("wsfleet")

#: How long stop() waits for the supervisor (which gives the shards its own grace).
STOP_TIMEOUT = 6.0
#: How long stop() waits for the shards to take commands still queued in the front.
STOP_DRAIN_TIMEOUT = 2.0
_YIELDS_BEFORE_SLEEP = 8
#: How often a busy poll() reads the supervisor's socket (its messages are rare: a shard
#: up, down or moved, a stop): one recvmsg that fails with EAGAIN per poll() was a tenth
#: of the front's CPU under a handshake load.  At once when a sleep's epoll reports it,
#: and always in select mode.
CONTROL_READ_SECONDS = 0.005

# Bound once for the dispatch loop (plain ints: see wsfleet.ipc.messages).
_EV_TEXT, _EV_BINARY, _EV_CREDITS = m.EV_TEXT, m.EV_BINARY, m.EV_CREDITS
_EV_MP_FRAME = m.EV_MP_FRAME
_CMD_PAUSE_READING = m.CMD_PAUSE_READING


@dataclass(frozen=True, slots=True)
class FleetListener:
    """What the fleet reports besides inbound messages (those go to ``data_received``).

    The callables the server hands over (its own handlers, bound), so that
    neither side calls into the other's private members.
    """

    #: A peer opened: ``(channel, ip, port, protocol, request_head)``; its channel is in
    #: ``channels``.
    peer_connected: Callable[[PeerChannel, str, int, str, bytes], None]
    #: A peer is gone: ``(channel, was_clean_close)``; its channel is closed already.
    peer_left: Callable[[PeerChannel, bool], None]
    #: A peer sent a close frame: ``(peer_id, code, reason)``.
    close_requested: Callable[[int, int, str], None]
    #: The supervisor gave a shard up: ``(index, reason)``.
    shard_failed: Callable[[int, str], None]
    #: An operator asked to stop (``wsfleet stop``): ``()``.
    stop_requested: Callable[[], None] = lambda: None
    #: An upgrade waits for the application (a handshake handler is set):
    #: ``(link, token, ip, port, protocol, offered, request_head)``.
    handshake: Callable[..., None] = lambda *args: None
    #: A waiting upgrade ended without a verdict: ``(token)``.
    handshake_ended: Callable[[int], None] = lambda token: None


@dataclass(frozen=True, slots=True)
class OpsSockets:
    """What the front bound for the operator (`.ops`), handed to the supervisor, which
    serves them; the front closes its copies once the supervisor runs."""

    control: socket.socket | None = None
    control_path: str = ""
    metrics: socket.socket | None = None

    def close(self) -> None:
        for sock in (self.control, self.metrics):
            if sock is not None:
                sock.close()

    def unlink(self) -> None:
        """Remove the control socket's file (the supervisor never started)."""
        if self.control is not None and self.control_path:
            try:
                os.unlink(self.control_path)
            except OSError:
                pass


class ClusterHooks(Protocol):
    """The cluster link's share of `Fleet.poll` (`wsfleet.cluster`, ``cluster=``).

    ``fileno`` is in the fleet's epoll (readable when cluster messages wait);
    ``drain`` handles them inside ``poll`` (returns how many); ``flush`` sends
    what the tick queued for other nodes, one NATS message per node;
    ``deferred`` is True inside ``poll`` (sends wait for its end).
    """

    deferred: bool

    def fileno(self) -> int: ...

    def drain(self) -> int: ...

    def flush(self) -> None: ...


class RelayHooks(Protocol):
    """The multiplayer relay's share of the events (``gd_mp_api``)."""

    def frame(self, source: ShardLink, sender: int, frame: bytes) -> None: ...

    def drops(self, counts: tuple[int, ...]) -> None: ...


class ShardLink:
    """The front's end of one shard: its two rings, its queued commands, the peers it holds.

    It is the `CommandSink` of those peers' channels.
    """

    __slots__ = (
        "index",
        "pid",
        "events_ring",
        "commands_ring",
        "events",
        "commands",
        "backlog",
        "peers",
        "deferred",
        "waiting_for_space",
    )

    def __init__(self, index: int, pid: int, fds: list[int]) -> None:
        self.index = index
        self.pid = pid
        self.events_ring = SharedRing.attach(RingFds(*fds[:3]))
        self.commands_ring = SharedRing.attach(RingFds(*fds[3:6]))
        self.events = Consumer(self.events_ring)
        self.commands = Producer(self.commands_ring)
        # Commands not yet in the ring, in order: those of this poll() (pushed together
        # when it ends) and those a full ring did not take (bounded by the per-peer limits).
        self.backlog: list[Record] = []
        self.peers: set[int] = set()
        #: True inside poll(): commands wait for its end; otherwise they go at once.
        self.deferred = False
        #: The commands ring was full: the shard rings its space bell (in the fleet's epoll)
        #: once it has made room, so that the rest goes even if no event comes meanwhile.
        self.waiting_for_space = False

    def command(self, kind: int, peer_id: int, flags: int, payload: bytes) -> None:
        self.backlog.append((kind, peer_id, flags, payload))
        if not self.deferred:
            # Outside poll() (a timer, another task): send now rather than at the next poll.
            self.flush()

    def pause_reading(self, peer_id: int) -> None:
        """The peer's inbox is full: its shard stops reading its socket until a resume."""
        self.command(_CMD_PAUSE_READING, peer_id, 0, b"")

    def command_many(self, kind: int, peer_id: int, payloads: list[bytes]) -> None:
        append_commands(self.backlog, kind, peer_id, payloads)  # no Python step per payload
        if not self.deferred:
            self.flush()

    def flush(self) -> None:
        backlog = self.backlog
        if backlog:
            commands = self.commands
            if self.waiting_for_space:
                commands.disarm_space()
                self.waiting_for_space = False
            while True:
                taken = commands.push_many(backlog)
                del backlog[:taken]
                if not backlog:
                    break
                if not commands.arm_space():  # True: room came meanwhile, push again
                    self.waiting_for_space = True
                    break
        self.commands.flush()

    def close(self) -> None:
        self.events_ring.close()
        self.commands_ring.close()


class Fleet:
    """The supervisor, the shards' rings and the dispatch of their events, for one ``listen``.

    Public state, read by the server and the relay: ``links`` (one per
    shard, None while it is down), ``channels`` (peer id -> `PeerChannel`),
    ``failed`` (shard index -> why it was given up), ``supervisor``.
    """

    def __init__(
        self,
        shards: int,
        listener: FleetListener,
        on_data: list[Callable[[int], Any]],
        limits: PeerLimits,
        budget: OutboundBudget,
        per_peer: bool = False,
    ) -> None:
        self.shards = shards
        self.listener = listener
        #: The application's ``data_received`` handlers: the live list, called per message,
        #: or (``per_peer``) once per peer with new messages per batch of its shard.
        self.on_data = on_data
        self.per_peer = per_peer
        self.limits = limits
        self.budget = budget
        self.relay: RelayHooks | None = None
        #: The node's side of a cluster (`attach_cluster`), None without ``cluster=``.
        self.cluster: ClusterHooks | None = None
        self.links: list[ShardLink | None] = [None] * shards
        self.channels: dict[int, PeerChannel] = {}
        self.failed: dict[int, str] = {}
        self.supervisor: subprocess.Popen | None = None
        self.running = False
        self.refusing = False
        #: The supervisor exited on its own (the control channel closed) while running.
        self.supervisor_lost = False
        self._id_base = m.FIRST_PEER_ID
        self._id_span = m.id_span(shards)
        self._control: socket.socket | None = None
        self._lifeline: Lifeline | None = None
        self._epoll: select.epoll | None = None
        self._select_mode = False
        #: The shards' counters in shared memory (wsfleet.ipc.stats), from `start` on.
        self.stats: Stats | None = None
        self._spawns = [0] * shards
        self._started = [0.0] * shards
        self._meter = ProcessMeter()
        self._control_due = 0.0  # monotonic time of the next read of the control socket

    # -- start and stop -----------------------------------------------------------------------

    def start(
        self, sockets: list[list[socket.socket]], config: FleetConfig, ops: OpsSockets | None = None
    ) -> None:
        """Start the supervisor, which forks one shard per entry of ``sockets``; OSError if not.

        The caller closes ``sockets`` (and ``ops``' sockets) afterwards: the
        supervisor holds them then.
        """
        self._id_base = config.id_base
        self._id_span = m.id_span(self.shards, config.id_total)
        self.stats = Stats.create(self.shards)
        ops_fds = [self.stats.fd]
        ops_args = ["--stats-fd", str(self.stats.fd)]
        if ops is not None and ops.control is not None:
            ops_fds.append(ops.control.fileno())
            ops_args += ["--ops-socket-fd", str(ops.control.fileno())]
            ops_args += ["--ops-socket-path", ops.control_path]
        if ops is not None and ops.metrics is not None:
            ops_fds.append(ops.metrics.fileno())
            ops_args += ["--metrics-fd", str(ops.metrics.fileno())]
        ours, theirs = control.socketpair()
        lifeline = Lifeline()  # we hold it; the supervisor watches it
        fds = [[sock.fileno() for sock in socks] for socks in sockets]
        listen_args = [
            arg for per_shard in fds for arg in ("--listen-fds", ",".join(map(str, per_shard)))
        ]
        try:
            self.supervisor = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "wsfleet.supervisor",
                    "--control-fd",
                    str(theirs.fileno()),
                    "--lifeline-fd",
                    str(lifeline.watch_fd),
                    *listen_args,
                    *ops_args,
                ],  # fmt: skip
                pass_fds=(
                    theirs.fileno(),
                    lifeline.watch_fd,
                    *(fd for per in fds for fd in per),
                    *ops_fds,
                ),
                stdin=subprocess.DEVNULL,
            )
        except OSError:
            ours.close()
            lifeline.close()
            raise
        finally:
            theirs.close()
            if lifeline.watch_fd >= 0:
                os.close(lifeline.watch_fd)
                lifeline.watch_fd = -1
        self._control = ours
        self._lifeline = lifeline
        self.running = True
        control.send(ours, config)
        ours.setblocking(False)
        self._epoll = select.epoll()
        self._epoll.register(ours.fileno(), select.EPOLLIN)

    def attach_cluster(self, cluster: ClusterHooks) -> None:
        """Poll ``cluster`` with the shards (after `start`)."""
        self.cluster = cluster
        if self._epoll is not None:
            self._epoll.register(cluster.fileno(), select.EPOLLIN)

    def publish_front(self, document: dict[str, Any]) -> None:
        """What only the front knows (a cluster's view), for ``wsfleet status`` and /metrics:
        merged into the status document by whoever reads it."""
        if self.stats is not None:
            if not self.stats.write_front(orjson.dumps(document)):
                log.warning("status: the front's section is over %d bytes", len(document))

    def shard_of(self, peer_id: int) -> int:
        """The index of the shard that owns ``peer_id`` (computed from the node's range)."""
        return m.owner_of(peer_id, self._id_span, self._id_base)

    def stop(self) -> None:
        """Stop the supervisor and every shard (they close their peers with 1001).

        Commands already queued reach their shards first, even those a full
        ring did not take yet.  Bounded: at most `STOP_DRAIN_TIMEOUT` waiting
        for shards to take them, then `STOP_TIMEOUT` for the supervisor
        before it is killed.
        """
        if not self.running:
            return
        self.running = False
        self._drain_backlogs(time.monotonic() + STOP_DRAIN_TIMEOUT)
        if self._control is not None:
            try:
                control.send(self._control, control.Stop())
            except OSError:
                pass
        if self.supervisor is not None:
            try:
                self.supervisor.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                log.error("stop: the supervisor did not exit in time; killing it")
                self.supervisor.kill()
                self.supervisor.wait()
        self.close()

    def close(self) -> None:
        """Release everything (after `stop`, or when `start` failed half-way)."""
        self.running = False
        for channel in self.channels.values():
            channel.left()
        self.channels.clear()
        for link in self.links:
            if link is not None:
                link.close()
        self.links = [None] * self.shards
        if self._epoll is not None:
            self._epoll.close()
            self._epoll = None
        if self._control is not None:
            self._control.close()
            self._control = None
        if self._lifeline is not None:
            self._lifeline.close()
            self._lifeline = None
        self._select_mode = False
        self.cluster = None
        if self.stats is not None:
            self.stats.close()
            self.stats = None

    def _drain_backlogs(self, deadline: float) -> None:
        """Push every queued command into the rings as the shards make room, until ``deadline``."""
        self._flush_commands()
        while any(link is not None and link.backlog for link in self.links):
            if time.monotonic() >= deadline:
                log.error("stop: a shard did not take its queued commands in time")
                return
            time.sleep(0.001)
            self._flush_commands()

    # -- commands -------------------------------------------------------------------------------

    def command_each(
        self, kind: int, peer_id: int, flags: int, payload: bytes, skip: ShardLink | None = None
    ) -> None:
        """One command to every running shard that holds peers (but ``skip``)."""
        for link in self.links:
            if link is not None and link is not skip and link.peers:
                link.command(kind, peer_id, flags, payload)

    def broadcast(self, payload: bytes, flags: int, exclude: list[int]) -> None:
        """One message to every peer but ``exclude``: one record per shard, encoded there."""
        by_shard: dict[int, list[int]] = {}
        for peer_id in exclude:
            by_shard.setdefault(self.shard_of(peer_id), []).append(peer_id)
        for link in self.links:
            if link is not None and link.peers:
                body = m.encode_broadcast(payload, by_shard.get(link.index, ()))
                link.command(m.CMD_BROADCAST, 0, flags, body)

    def broadcast_group(
        self, group: bytes, payload: bytes, flags: int, exclude: list[int], shards: list[int]
    ) -> None:
        """One message to the members of ``group``: one record to each shard in ``shards``."""
        by_shard: dict[int, list[int]] = {}
        for peer_id in exclude:
            by_shard.setdefault(self.shard_of(peer_id), []).append(peer_id)
        for index in shards:
            link = self.links[index] if 0 <= index < len(self.links) else None
            if link is not None:
                body = m.encode_group_broadcast(group, payload, by_shard.get(index, ()))
                link.command(m.CMD_BROADCAST, 0, flags | m.FLAG_GROUP, body)

    def set_refusing(self, refusing: bool) -> None:
        self.refusing = refusing
        for link in self.links:
            if link is not None:
                link.command(m.CMD_REFUSE, 0, int(refusing), b"")

    def _flush_commands(self) -> None:
        for link in self.links:
            if link is not None:
                link.flush()

    def _defer_commands(self, deferred: bool) -> None:
        for link in self.links:
            if link is not None:
                link.deferred = deferred

    # -- status ---------------------------------------------------------------------------------

    def shard_status(self) -> list[dict[str, Any]]:
        return [
            {
                "shard": index,
                "pid": link.pid if link else None,
                "peers": len(link.peers) if link else 0,
                "state": "running" if link else "failed" if index in self.failed else "down",
                "reason": self.failed.get(index),
            }
            for index, link in enumerate(self.links)
        ]

    def stats_document(self) -> dict[str, Any]:
        """The status document of `wsfleet.ipc.stats` as the front sees the fleet."""
        views = [
            ShardView(
                index=index,
                pid=link.pid if link else None,
                state="running" if link else "failed" if index in self.failed else "down",
                reason=self.failed.get(index),
                restarts=max(0, self._spawns[index] - 1),
                started=self._started[index] if link else 0.0,
            )
            for index, link in enumerate(self.links)
        ]
        if self.stats is None:
            raise RuntimeError("get_stats: the server is not listening")
        return status_document(self.stats, views, self._meter, front_pid=os.getpid())

    # -- polling --------------------------------------------------------------------------------

    def fileno(self) -> int:
        """A descriptor that becomes readable when `poll` has something to do (for select)."""
        if self._epoll is None:
            raise RuntimeError("fileno: the server is not listening")
        self._select_mode = True
        self._arm_all()
        return self._epoll.fileno()

    def poll(self, timeout: float | None) -> None:
        """Take every event the shards have and report it; wait up to ``timeout`` for one.

        With a cluster, its messages are handled here too (after the shards'
        events), and what the tick sent to other nodes leaves at the end.
        """
        self._defer_commands(True)
        cluster = self.cluster
        if cluster is not None:
            cluster.deferred = True
        try:
            if self._select_mode:
                self._disarm_all()
            self._flush_commands()
            handled = self._read_control_if_due() + self._drain_events()
            if cluster is not None:
                handled += cluster.drain()
            if not handled and timeout and self._epoll is not None:
                control_ready = False
                if not self._yield_for_events() and not self._arm_all():
                    control_fd = self._control.fileno() if self._control is not None else -1
                    woken = self._epoll.poll(timeout)
                    control_ready = any(fd == control_fd for fd, _ in woken)
                self._disarm_all()
                if control_ready:
                    self._read_control()
                else:
                    self._read_control_if_due()
                self._drain_events()
                if self.cluster is not None:
                    self.cluster.drain()
            self._flush_commands()
            if self.cluster is not None:
                self.cluster.flush()
        finally:
            self._defer_commands(False)
            if cluster is not None:
                cluster.deferred = False
            # Even when a handler raised out of poll(): a select()ing caller
            # (wsfleet.aio.polling) is woken only by armed doorbells.
            if self._select_mode and self.running and self._epoll is not None:
                self._arm_all()

    def _yield_for_events(self) -> bool:
        """Let the shards run a moment before sleeping; True if events came meanwhile.

        Sleeping costs each shard a doorbell (an eventfd write and a wake-up)
        for its next batch.  A busy shard usually publishes within a few
        scheduler yields, on another core or on this one (where the yield is
        what lets it run).
        """
        links = [link for link in self.links if link is not None]
        for _ in range(_YIELDS_BEFORE_SLEEP):
            os.sched_yield()
            for link in links:
                if link.events.has_records():
                    return True
        return False

    def _arm_all(self) -> bool:
        """Ask every shard to ring when it publishes; True if one already has (self-rung)."""
        pending = False
        for link in self.links:
            if link is not None and link.events.arm():
                pending = True
                if self._select_mode:
                    os.eventfd_write(link.events.fileno(), 1)  # so select() sees it
        return pending

    def _disarm_all(self) -> None:
        for link in self.links:
            if link is not None:
                link.events.disarm()

    def _drain_events(self) -> int:
        count = 0
        for link in self.links:
            if not self.running:
                break  # a handler called stop(): the other links are closed now
            if link is not None:
                records = link.events.pop_all()
                if records:
                    count += len(records)
                    self._dispatch(link, records)
        return count

    def _dispatch(self, link: ShardLink, records: list[Record]) -> None:
        """Report a batch of one shard's records, in order.

        Messages go through `wsfleet.ipc.inbox.deliver` (C): into the peers'
        inboxes, then ``data_received`` per message, or, with per-peer delivery,
        once per peer that got any, before the next other event and at the end
        of the batch (so that a peer's messages are signalled before its
        departure).  The rest is handled here, one record at a time.
        """
        channels = self.channels
        handlers = None if self.per_peer else self.on_data
        ready: list[int] = []
        pause = link.pause_reading
        count = len(records)
        index = 0
        while index < count:
            index, failed, exc = deliver(
                records, index, channels, _EV_TEXT, _EV_BINARY, handlers, ready, pause
            )
            if failed >= 0:
                self._handler_failed(records[index][1], failed, exc)
                index += 1
                continue
            if index == count:
                break
            kind, peer_id, flags, payload = records[index]
            index += 1
            if kind == _EV_CREDITS:
                self._credits(payload)
            elif kind == _EV_MP_FRAME:
                if self.relay is not None:
                    self.relay.frame(link, peer_id, payload)
            elif kind == _EV_TEXT or kind == _EV_BINARY:
                # What `deliver` does not take (a payload that is not bytes): made bytes,
                # then delivered as any other.
                index -= 1
                records[index] = (kind, peer_id, flags, bytes(payload))
            else:
                if ready:
                    self._signal_ready(ready)
                self._dispatch_rare(link, kind, peer_id, flags, payload)
        if ready:
            self._signal_ready(ready)

    def _handler_failed(self, peer_id: int, failed: int, exc: BaseException) -> None:
        """Handler number ``failed`` raised ``exc`` for a message of ``peer_id``: log it and
        call the handlers after it, as if each were called on its own."""
        log.error("error in a 'data_received' handler", exc_info=exc)
        self._data_received(peer_id, self.on_data[failed + 1 :])

    def _signal_ready(self, ready: list[int]) -> None:
        """Per-peer delivery: ``data_received`` once for each peer with new messages."""
        channels = self.channels
        for peer_id in ready:
            channel = channels.get(peer_id)
            if channel is None:
                continue  # a handler of this batch disconnected it, or stop()
            channel.inbox.ready = False
            self._data_received(peer_id, self.on_data)
        ready.clear()

    @staticmethod
    def _data_received(peer_id: int, handlers: list[Callable[[int], Any]]) -> None:
        """Call each of ``handlers`` with ``peer_id``; one that raises is logged, the rest
        still run."""
        for handler in handlers:
            try:
                handler(peer_id)
            except Exception:
                log.exception("error in a 'data_received' handler")

    def _credits(self, payload: bytes) -> None:
        """What a shard handed to the kernel: the outbound room back to each peer."""
        channels = self.channels
        budget = self.budget
        for credited_id, packets, size in m.decode_credits(payload):
            channel = channels.get(credited_id)
            if channel is not None:  # else it left, and its bytes went back then
                channel.packet_room += packets
                channel.byte_room += size
                budget.room += size

    def _dispatch_rare(
        self, link: ShardLink, kind: int, peer_id: int, flags: int, payload: bytes
    ) -> None:
        """Every event but messages, credits and relayed frames: per connection, not per message."""
        if kind == m.EV_CONNECTED:
            if not self.running:
                return  # stop() from a handler of this batch: the peer is being closed
            ip, port, protocol, head = m.decode_connected(payload)
            channel = PeerChannel(peer_id, link, self.limits, self.budget)
            self.channels[peer_id] = channel
            link.peers.add(peer_id)
            self.listener.peer_connected(channel, ip, port, protocol, head)
        elif kind == m.EV_HANDSHAKE:
            if self.running:
                self.listener.handshake(link, peer_id, *m.decode_handshake(payload))
        elif kind == m.EV_HANDSHAKE_ENDED:
            self.listener.handshake_ended(peer_id)
        elif kind == m.EV_CLOSE_REQUEST:
            if peer_id in self.channels:
                code, reason = m.decode_close(payload)
                self.listener.close_requested(peer_id, code, reason)
        elif kind == m.EV_DISCONNECTED:
            self._peer_left(link, peer_id, bool(flags & m.FLAG_CLEAN))
        elif kind == m.EV_MP_DROPS:
            if self.relay is not None:
                self.relay.drops(m.decode_drops(payload))
        else:
            log.error("unknown event kind %d from shard %d", kind, link.index)

    def _peer_left(self, link: ShardLink, peer_id: int, clean: bool) -> None:
        channel = self.channels.pop(peer_id, None)
        if channel is None:
            return
        link.peers.discard(peer_id)
        channel.left()
        self.listener.peer_left(channel, clean)

    # -- the supervisor's notices ---------------------------------------------------------------

    def _read_control_if_due(self) -> int:
        if not self._select_mode:  # a select()ing caller is woken by it: read it every time
            now = time.monotonic()
            if now < self._control_due:
                return 0
            self._control_due = now + CONTROL_READ_SECONDS
        return self._read_control()

    def _read_control(self) -> int:
        handled = 0
        while self._control is not None:
            try:
                received = control.receive(self._control)
            except BlockingIOError:
                break
            except control.ControlError as exc:
                log.error("bad message from the supervisor: %s", exc)
                continue
            except OSError as exc:
                received = None
                log.error("lost the control channel to the supervisor: %s", exc)
            if received is None:
                self._supervisor_gone()
                break
            handled += 1
            message, fds = received
            if isinstance(message, control.ShardUp):
                self._shard_up(message.shard, message.pid, fds)
            elif isinstance(message, control.ShardDown):
                self._shard_down(message.shard)
            elif isinstance(message, control.ShardFailed):
                self._shard_failed(message.shard, message.reason)
            elif isinstance(message, control.StopRequested):
                self.listener.stop_requested()
            elif isinstance(message, control.ShardMoved):
                self._shard_moved(message.shard, message.pid)
            else:
                log.error("unexpected message from the supervisor: %r", message)
        return handled

    def _shard_up(self, index: int, pid: int, fds: list[int]) -> None:
        if not 0 <= index < self.shards:
            log.error("the supervisor reported shard %d of %d", index, self.shards)
            for fd in fds:
                os.close(fd)
            return
        if self.links[index] is not None:
            self._shard_down(index)
        link = ShardLink(index, pid, fds)
        self.links[index] = link
        self._spawns[index] += 1
        self._started[index] = time.time()
        link.deferred = True  # we are inside poll(): its commands go at the end of it
        if self.refusing:
            link.command(m.CMD_REFUSE, 0, 1, b"")
        if self._epoll is not None:
            self._epoll.register(link.events.fileno(), select.EPOLLIN)
            self._epoll.register(link.commands.space_fileno(), select.EPOLLIN)
        if self._select_mode:
            self._arm_all()

    def _shard_moved(self, index: int, pid: int) -> None:
        """``wsfleet reload`` gave the shard a new process: same rings, same peers."""
        link = self.links[index] if 0 <= index < self.shards else None
        if link is not None:
            log.info("shard %d reloaded: now pid %d (pid %d before)", index, pid, link.pid)
            link.pid = pid
            self._started[index] = time.time()

    def _shard_down(self, index: int) -> None:
        """A shard died: what it published still counts, then each of its peers is gone."""
        link = self.links[index] if 0 <= index < self.shards else None
        if link is None:
            return
        while True:
            records = link.events.pop_all()
            if not records:
                break
            self._dispatch(link, records)
        for peer_id in sorted(link.peers):
            self._peer_left(link, peer_id, False)
        if self._epoll is not None:
            self._epoll.unregister(link.events.fileno())
            self._epoll.unregister(link.commands.space_fileno())
        self.links[index] = None
        link.close()

    def _shard_failed(self, index: int, reason: str) -> None:
        """The supervisor gave the shard up (its death, `ShardDown`, came first)."""
        log.error("shard %d was given up: %s", index, reason)
        self.failed[index] = reason
        self.listener.shard_failed(index, reason)

    def _supervisor_gone(self) -> None:
        log.error("the supervisor exited: every shard is gone")
        self.supervisor_lost = True
        for index, link in enumerate(self.links):
            if link is not None:
                self._shard_down(index)
        if self._control is not None:
            if self._epoll is not None:
                self._epoll.unregister(self._control.fileno())
            self._control.close()
            self._control = None
