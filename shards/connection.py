"""One client connection inside a shard: the asyncio side of a `ServerWire`.

`wsfleet.shards.wire.ServerWire` owns the bytes: the upgrade, frame
delimiting and the fast path for data frames, ``websockets`` for the rest,
the connection's phase.  This class is the adapter around it: it feeds the
wire what the uvloop transport reads, writes what the wire queues, turns the
wire's events into event records for the front (`Shard.emit`), and owns what
needs a clock or a socket: the handshake and close deadlines, keepalive
(`keepalive`, called by the shard's sweep), pausing reading, and credits.
Data frames from the front are built here directly with `frame_header`
(server frames are unmasked: a 2-10 byte header plus the payload) and
written with one ``writelines`` per connection per batch of commands.  A
connection that negotiated permessage-deflate (its wire a `DeflateWire`, the
shard's ``compression``) deflates them instead (`_queue_deflated`, which
replaces `queue_message` on that connection only).

The server's limits apply at handshake or timer time only (nothing is added
per message): ``max_message`` and ``max_request_bytes`` are the wire's; an
Origin outside ``allowed_origins`` gets 403 and a server that holds
``max_peers`` answers 503 (`_admission`, which the wire calls); a handshake
not done within ``handshake_timeout`` is dropped.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Sequence
from http import HTTPStatus
from typing import TYPE_CHECKING

from wsfleet.ipc import messages as m
from wsfleet.ipc.handoff import MovedConnection
from wsfleet.ipc.shardstate import AddressTableFull
from wsfleet.ipc.stats import close_field, refuse_field

from .wire import EventKind, Phase, ServerWire, frame_header

if TYPE_CHECKING:
    from .worker import Shard

__all__ = ["CLOSE_GRACE_SECONDS", "Deadlines", "PeerConnection", "frame_header"]

log = logging.getLogger("wsfleet.shard")

#: Once the server closes a connection, how long what it still has to send (its close
#: frame, an HTTP error) may wait for a peer that does not read before the TCP
#: connection is cut (the peer is reported gone then).
CLOSE_GRACE_SECONDS = 1.0
_FORBIDDEN = "Origin not allowed.\n"
_FULL = "Server full: try again later.\n"
_DRAINING = "Server draining: try another one.\n"
_TOO_MANY = "Too many connections from your address: try again later.\n"
_OPEN, _REFUSED, _HANDSHAKE = Phase.OPEN, Phase.REFUSED, Phase.HANDSHAKE
_TEXT, _BINARY, _PONG = EventKind.TEXT, EventKind.BINARY, EventKind.PONG
_OPENED, _CLOSE_REQUEST = EventKind.OPENED, EventKind.CLOSE_REQUEST
_REFUSED_EVENT, _FAILED = EventKind.REFUSED, EventKind.FAILED
_ANSWERED, _PENDING_EVENT = EventKind.ANSWERED, EventKind.PENDING
_PENDING = Phase.PENDING
#: Close codes of an orderly departure (the others are logged as abnormal).
_NORMAL_CLOSES = (1000, 1001)
_EV_TEXT, _EV_BINARY = m.EV_TEXT, m.EV_BINARY
#: A deadline this close to now is due (the loop's timers are not exact to the microsecond).
_DUE_SLACK = 0.001


class Deadlines:
    """The connections that must end within one fixed delay (the shard has one for the
    handshake's, one for a close's grace), with one timer for them all.

    A timer per connection cost ~3 us to arm and cancel (uvloop makes a handle and a
    libuv timer each time); here a deadline is a dict entry, and since every entry has
    the same delay the dict's insertion order is the order they fall due: the one timer
    waits for the first entry, and when it fires cuts those due and waits for the next.
    A cleared deadline is deleted at once (no reference outlives its connection).
    """

    __slots__ = ("_loop", "delay", "_due", "_timer")

    def __init__(self, loop: asyncio.AbstractEventLoop, delay: float) -> None:
        self._loop = loop
        self.delay = delay
        self._due: dict[PeerConnection, float] = {}
        self._timer: asyncio.TimerHandle | None = None

    def __len__(self) -> int:
        return len(self._due)

    def add(self, conn: PeerConnection) -> None:
        """``conn._deadline_passed()`` in `delay` seconds unless discarded first."""
        when = self._loop.time() + self.delay
        self._due[conn] = when
        if self._timer is None:
            self._timer = self._loop.call_at(when, self._fire)

    def discard(self, conn: PeerConnection) -> None:
        self._due.pop(conn, None)

    def _fire(self) -> None:
        self._timer = None
        due = self._due
        now = self._loop.time() + _DUE_SLACK
        while due:
            conn = next(iter(due))
            when = due[conn]
            if when > now:
                self._timer = self._loop.call_at(when, self._fire)
                return
            del due[conn]
            conn._deadline_passed()

    def cancel(self) -> None:
        """Stop the timer (the shard's loop is closing)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


class PeerConnection(asyncio.Protocol):
    """A TCP (or TLS) connection from accept to close."""

    def __init__(self, shard: Shard) -> None:
        self.shard = shard
        self.transport: asyncio.Transport | None = None
        self.peer_id = 0  # assigned when the handshake completes
        self.wire: ServerWire = shard.wire_factory(
            max_message=shard.max_message,
            max_request_bytes=shard.max_request_bytes,
            select_subprotocol=shard.choose_subprotocol,
            admit=self._admission,
            answer_http=shard.http_answerer,
            hold_upgrades=shard.hold_upgrades,
        )
        self._token = 0  # while its upgrade waits for the application: the id it will have
        #: The groups it is in (`Shard.join`); None until it joins one.
        self.groups: set[bytes] | None = None
        self.ip = ""
        self.port = 0
        # The one deadline a connection may have: the handshake's, later its close's
        # (CLOSE_GRACE_SECONDS): the shard's `Deadlines` it is in. Keepalive is the
        # shard's sweep.
        self._deadline: Deadlines | None = None
        self._next_ping = 0.0  # loop time of the next keepalive ping
        self._pong_due = 0.0  # loop time by which a pong must come (0: none awaited)
        self._close_due = 0.0  # loop time by which our close handshake must end (0: none)
        self._paused_by_front = False
        self._paused_by_shard = False
        self._reading_off = False  # reading is paused (counted in shard.paused_sockets)
        # Frames queued during the current batch of commands.
        self.outbox: list[bytes] = []
        # Packets/bytes handed to the transport and not yet credited to the front.
        self._credit_packets = 0
        self._credit_bytes = 0
        self._write_paused = False
        self.mp_welcomed = False  # multiplayer mode: the front has sent this peer its id
        #: Multiplayer mode with relay groups (welcomed so): its frames reach only the peers
        #: it shares a group with.
        self.mp_rooms = False
        self._mp = shard.mp  # multiplayer mode: messages are relay frames
        #: The shard handler (`wsfleet.shards.app.ShardApp`), None without one: one
        #: attribute test per read.
        self._app = shard.app
        #: Set for a connection another shard handed over (`moved`) until it is made.
        self._moved_from: MovedConnection | None = None
        # Reading is held by a handoff: in the old process for good (`stop_reading`), in the
        # new one until every moved connection is registered (`start_after_move`).
        self._reading_held = False
        # The message-rate token bucket, [tokens, loop time of the last refill] (None: no
        # limit, or not open yet): one attribute check per read when off.
        self._bucket: list[float] | None = None
        self._unparsed = b""  # a moved connection's bytes to replay once it starts
        # It counts against max_peers_per_address (`Shard.claim_address`) until it ends.
        self._address_claimed = False
        # A moved upgrade that waited for its verdict: the token the front knows it by. Its
        # replayed request is not admitted again (the old process did) and waits under it.
        self._moved_token = 0

    @classmethod
    def moved(cls, shard: Shard, state: MovedConnection) -> PeerConnection:
        """A connection the previous shard process handed over (``wsfleet reload``); give it
        to ``loop.connect_accepted_socket`` with its socket. No signal fires for it."""
        conn = cls(shard)
        conn._moved_from = state
        return conn

    # -- asyncio.Protocol ------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.shard.connections.add(self)
        if self._moved_from is not None:
            self._carry_on(self._moved_from)
            return
        if self.shard.refusing:
            self.shard.count("refused_dropped")
            transport.abort()  # as Godot: a refused connection is dropped at once
            if self.shard.conn_log_level is not None:
                self._log_refusal(transport, "dropped: the server refuses connections")
            return
        # No TCP_NODELAY here: uvloop sets it on every TCP connection it accepts (as Godot
        # does; tests/test_shard_nodelay.py holds it to that), and asking for the socket
        # builds a socket object per connection (~3 us, plus ~3 us for the setsockopt).
        peername = transport.get_extra_info("peername") or ("", 0)
        ip = peername[0]
        self.ip = ip[7:] if ip.startswith("::ffff:") else ip
        self.port = peername[1]
        self._set_deadline(self.shard.handshake_deadlines)
        if self.shard.reading_paused:
            self._paused_by_shard = True
            self._reading_off = True
            self.shard.paused_sockets += 1
            transport.pause_reading()  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        wire = self.wire
        events = wire.receive_data(data)
        shard = self.shard
        shard.bytes_in += len(data)  # counters: per read, not per message (see _event)
        if events:
            shard.messages_in += len(events)
            if self._bucket is not None and not self._take_tokens(len(events)):
                return
            if self._mp:
                self._events_mp(events)
            elif self._app is not None:
                self._events_app(events)
            else:
                for kind, value in events:
                    if kind is _BINARY:
                        shard.emit(_EV_BINARY, self.peer_id, 0, value)
                    elif kind is _TEXT:
                        shard.emit(_EV_TEXT, self.peer_id, 0, value)
                    else:
                        self._event(kind, value)
        if wire.wants_write:
            self._write_wire_output()

    def _take_tokens(self, count: int) -> bool:
        """Spend ``count`` messages from the token bucket; over it: close 1008 (False)."""
        bucket = self._bucket
        assert bucket is not None
        shard = self.shard
        now = shard.loop.time()
        tokens = min(shard.message_burst, bucket[0] + (now - bucket[1]) * shard.message_rate)
        bucket[0], bucket[1] = tokens - count, now
        if bucket[0] >= 0:
            return True
        shard.messages_in -= count  # not delivered
        shard.count("rate_limited")
        if shard.conn_log_level is not None:
            shard.log_connection(
                shard.conn_log_level,
                "peer %d from %s:%d: over %g messages/s, closed (1008); %d message(s) dropped",
                self.peer_id,
                self.ip,
                self.port,
                shard.message_rate,
                count,
            )
        self._bucket = None
        self.fail(1008, "message rate limit exceeded")
        return False

    def accept_pending(self, protocol: str | None, headers: list[tuple[str, str]]) -> None:
        """The application accepted this waiting upgrade: 101, then it opens."""
        self._deliver(self.wire.accept_pending(protocol, headers))

    def refuse_pending(self, status: int, text: str, headers: list[tuple[str, str]]) -> None:
        """The application refused it: its HTTP answer, then the connection ends."""
        self._token = 0  # no HANDSHAKE_ENDED: the verdict ended it
        self._deliver(self.wire.refuse_pending(status, text, headers))

    def _deliver(self, events: list) -> None:
        """Events that came from a verdict rather than a read, handled as `data_received`
        handles a read's (not shared with it: that is the per-read path, kept call-free)."""
        shard = self.shard
        shard.messages_in += len(events)
        if self._mp:
            self._events_mp(events)
        elif self._app is not None:
            self._events_app(events)
        else:
            for kind, value in events:
                if kind is _BINARY:
                    shard.emit(_EV_BINARY, self.peer_id, 0, value)
                elif kind is _TEXT:
                    shard.emit(_EV_TEXT, self.peer_id, 0, value)
                else:
                    self._event(kind, value)
        if self.wire.wants_write:
            self._write_wire_output()

    def _events_app(self, events: list) -> None:
        """A shard handler is set (`wsfleet.shards.app`): it sees every message first; what
        it does not consume (False) goes to the front, in order.  If it raises, the
        message is dropped (counted, logged) and the connection goes on."""
        app = self._app
        assert app is not None
        on_message = app.on_message
        shard = self.shard
        for kind, value in events:
            if kind is _BINARY or kind is _TEXT:
                text = kind is _TEXT
                try:
                    keep = on_message(self.peer_id, value, text)
                except Exception:
                    app.error("on_message", self.peer_id)
                    continue
                if keep is not False:
                    shard.emit(_EV_TEXT if text else _EV_BINARY, self.peer_id, 0, value)
            else:
                self._event(kind, value)

    def _events_mp(self, events: list) -> None:
        """Multiplayer mode: every message is a relay frame (`Shard.mp_frame`)."""
        for kind, value in events:
            if kind is _TEXT or kind is _BINARY:
                self.shard.mp_frame(self, value)
            else:
                self._event(kind, value)

    def _event(self, kind: EventKind, value: object) -> None:
        """The wire's other events (see `EventKind`); FAILED and REFUSED need nothing here:
        the end of stream the wire queued with them closes the connection."""
        self.shard.messages_in -= 1  # data_received counted every event as a message
        if kind is _PONG:
            self._pong_due = 0.0  # alive (any pong will do: it is a heartbeat)
        elif kind is _OPENED:
            self._clear_deadline()
            self.shard.count("handshakes_accepted")
            token, self._token = self._token, 0
            self.peer_id = self.shard.peer_connected(self, value, token)  # type: ignore[arg-type]
            if self.shard.ping_interval:
                self._next_ping = self.shard.first_ping_time()
            if self.shard.message_rate:
                self._bucket = [self.shard.message_burst, self.shard.loop.time()]
            if self.wire.deflate is not None:
                self._deflating()
        elif kind is _ANSWERED:
            self.shard.count("health_checks")
        elif kind is _PENDING_EVENT:
            protocol, offered = value  # type: ignore[misc]
            if self._moved_token:
                self._token, self._moved_token = self._moved_token, 0
                self.shard.hold_moved(self, self._token)
            else:
                self._token = self.shard.hold(self, protocol, offered)
        elif kind is _REFUSED_EVENT:
            self.shard.count(refuse_field(value))  # type: ignore[arg-type]
            if self.shard.conn_log_level is not None:
                self._log_refusal(self.transport, f"handshake refused: HTTP {value or 'none'}")
        elif kind is _FAILED:
            if self.shard.conn_log_level is not None:
                self.shard.log_connection(
                    self.shard.conn_log_level,
                    "peer %d from %s:%d failed: close %d (%s)",
                    self.peer_id,
                    self.ip,
                    self.port,
                    value.code,  # type: ignore[attr-defined]
                    value.reason or "no reason",  # type: ignore[attr-defined]
                )
        elif kind is _CLOSE_REQUEST:
            close = value
            reason = close.reason  # type: ignore[attr-defined]
            if reason.endswith("\0"):
                reason = reason[:-1]  # Godot appends one NUL to every reason it sends
            payload = m.encode_close(close.code, reason)  # type: ignore[attr-defined]
            self.shard.emit(m.EV_CLOSE_REQUEST, self.peer_id, 0, payload)

    def _carry_on(self, state: MovedConnection) -> None:
        """Continue where the previous shard process stopped: same peer, same protocol state."""
        self._moved_from = None
        shard = self.shard
        self.ip, self.port = state.ip, state.port
        self.mp_welcomed = state.mp_welcomed
        self.mp_rooms = state.mp_rooms
        if state.peer_id:
            self.wire.resume(
                state.subprotocol,
                state.fragments,
                state.fragments_text,
                state.deflate,
                shard.compress_settings,
            )
            self.peer_id = state.peer_id
            # The old process counted it against max_peers_per_address in this shard's
            # table, which the successor keeps: it is released here when it ends.
            self._address_claimed = bool(shard.max_peers_per_address)
            shard.adopt(self)
            if shard.app is not None:  # the new process's handler meets it afresh
                shard.app.connected(self, state.subprotocol)
            if state.deflate is not None:
                self._deflating()
            for group in state.groups:
                shard.join(self, group.encode())
            self._next_ping = shard.first_ping_time()
            if shard.message_rate:  # a fresh bucket: the old process's is not carried
                self._bucket = [shard.message_burst, shard.loop.time()]
        else:  # still in its upgrade: a fresh deadline
            self._set_deadline(shard.handshake_deadlines)
            if state.pending_token:  # admitted, waiting for its verdict: waits again
                self._moved_token = state.pending_token
                self._address_claimed = bool(shard.max_peers_per_address)
        self._paused_by_front = state.paused_by_front
        self._unparsed = state.unparsed
        # Nothing is read before every moved connection is registered: a frame relayed to
        # a peer not yet taken over would be lost (`wsfleet.shards.handoff.take_over`).
        self._reading_held = True

    def start_after_move(self, received: bytes) -> None:
        """Every moved connection is registered: replay this one's unparsed bytes, then
        what arrived meanwhile (``received``), then read."""
        self._reading_held = False
        self._paused_by_shard = self.shard.reading_paused
        unparsed, self._unparsed = self._unparsed, b""
        if unparsed:
            self.shard.bytes_in -= len(unparsed)  # counted when the old shard read them
        if unparsed or received:
            self.data_received(unparsed + received)
        self._apply_reading()  # resumes it (the holding protocol paused it) unless paused

    def connection_lost(self, exc: Exception | None) -> None:
        self.shard.connections.discard(self)
        self.wire.drop_policy()  # no cycle left: it goes with its last reference
        self._clear_deadline()
        self._release_address()
        if self._token:  # it left while its upgrade waited
            self.shard.end_pending(self._token)
            self._token = 0
        if self._reading_off:
            self._reading_off = False
            self.shard.paused_sockets -= 1
        if self.peer_id:
            shard = self.shard
            if self.wire.deflate is not None:
                shard.deflate_peers.discard(self)
            shard.count(close_field(self.wire.close_code()))
            if shard.access or shard.conn_log_level is not None:
                self._log_departure(exc)
            shard.peer_gone(self, self.wire.peer_closed_first)

    # -- per-connection log lines (only when asked for: see `Shard.conn_log_level`) ------

    def _log_refusal(self, transport: asyncio.BaseTransport | None, why: str) -> None:
        if self.ip:
            address = f"{self.ip}:{self.port}"
        else:  # dropped before connection_made took the address
            peer = transport.get_extra_info("peername") if transport is not None else None
            address = f"{peer[0]}:{peer[1]}" if peer else "?"
        assert self.shard.conn_log_level is not None
        self.shard.log_connection(self.shard.conn_log_level, "%s from %s", why, address)

    def _log_departure(self, exc: Exception | None) -> None:
        """The access log's departure line; an abnormal one also at the refusal level."""
        received, sent = self.wire.close_status()
        clean = self.wire.peer_closed_first
        code = received if received is not None else 1006
        abnormal = received not in _NORMAL_CLOSES or (
            sent is not None and sent not in _NORMAL_CLOSES
        )
        shard = self.shard
        level = logging.INFO if shard.access else None
        if abnormal and shard.conn_log_level is not None:
            level = max(level or 0, shard.conn_log_level)
        if level is None:
            return
        shard.log_connection(
            level,
            "peer %d from %s:%d left: code %d%s, clean %s%s%s",
            self.peer_id,
            self.ip,
            self.port,
            code,
            f" (we sent {sent})" if sent is not None else "",
            clean,
            ", abnormal" if abnormal else "",
            f" ({exc})" if exc else "",
        )

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        self.release_credits()

    # -- handshake ------------------------------------------------------------------

    def _admission(self, origins: Sequence[str]) -> tuple[HTTPStatus, str] | None:
        """The server's policy for a valid upgrade request: None to accept, else the refusal.

        None also means that a ``max_peers`` slot is now counted for this
        connection: the wire opens it at once (`EventKind.OPENED`).
        """
        if self._moved_token:
            return None  # admitted and counted by the previous shard process
        if self.shard.draining:
            return HTTPStatus.SERVICE_UNAVAILABLE, _DRAINING
        if not self.shard.origin_allowed(origins):
            return HTTPStatus.FORBIDDEN, _FORBIDDEN
        if self.shard.max_peers_per_address:
            try:
                if not self.shard.claim_address(self.ip):
                    return HTTPStatus.TOO_MANY_REQUESTS, _TOO_MANY
            except AddressTableFull as full:
                log.error("refused an upgrade from %s: %s", self.ip, full)
                return HTTPStatus.SERVICE_UNAVAILABLE, _FULL
            self._address_claimed = True
        if not self.shard.admit():
            self._release_address()
            return HTTPStatus.SERVICE_UNAVAILABLE, _FULL
        return None

    def _release_address(self) -> None:
        if self._address_claimed:
            self._address_claimed = False
            self.shard.release_address(self.ip)

    def _linger(self) -> None:
        """End the stream without resetting a client that is still sending.

        Closing a socket with unread bytes makes the kernel answer with a
        reset, which can destroy what was sent last at the client before it
        is read: a 431 while the client still sends its request, a close
        frame (1008, 1009) while it still sends messages.  So: half-close
        (the last bytes, then FIN), read and discard what comes (the wire
        discards in these phases, so reading resumes even if it was paused)
        until the client closes, and cut it after `CLOSE_GRACE_SECONDS` if it
        does not.

        After the peer's own close (it closed first, its close frame echoed) there is
        nothing to wait for: it sends nothing after its close frame (RFC 6455 5.5.1), so
        nothing unread can make a reset, and the server closes TCP first (RFC 6455
        7.1.1) at once, without a half-close, a read of its FIN and a loop iteration
        more (the grace still bounds a peer that does not read the echo).
        """
        self._set_deadline(self.shard.close_deadlines)
        transport = self.transport
        if self.wire.peer_closed_first or not transport.can_write_eof():
            transport.close()  # (and TLS cannot half-close)
            return
        transport.write_eof()
        if self._reading_off and not self._reading_held:
            self._paused_by_front = self._paused_by_shard = False
            self._apply_reading()

    def _set_deadline(self, deadlines: Deadlines) -> None:
        """Cut the TCP connection in ``deadlines.delay`` seconds unless it is gone or the
        deadline cleared."""
        if self._deadline is not None:
            self._deadline.discard(self)
        self._deadline = deadlines
        deadlines.add(self)

    def _clear_deadline(self) -> None:
        if self._deadline is not None:
            self._deadline.discard(self)
            self._deadline = None

    def _deadline_passed(self) -> None:
        """Called by the `Deadlines` it was in (which has dropped it)."""
        self._deadline = None
        if self.wire.phase is _HANDSHAKE or self.wire.phase is _PENDING:
            self.shard.count("refused_timeout")
            if not self.peer_id and self.shard.conn_log_level is not None:
                self._log_refusal(self.transport, "handshake timeout")
        if self.transport is not None:
            self.transport.abort()  # connection_lost follows: a peer is reported gone

    # -- sending ----------------------------------------------------------------------

    def _write_wire_output(self) -> None:
        transport = self.transport
        if transport is None:
            return
        for chunk in self.wire.data_to_send():
            if chunk:
                transport.write(chunk)
            else:  # the end of stream: a refused handshake, a close handshake, a failure
                self._linger()

    def queue_message(self, payload: bytes, text: bool) -> bool:
        """Queue one data frame for this batch; False if the connection no longer sends."""
        if self.wire.phase is not _OPEN:
            return False
        size = len(payload)
        self.outbox.append(frame_header(0x81 if text else 0x82, size))
        self.outbox.append(payload)
        self._credit_packets += 1
        self._credit_bytes += size
        return True

    def _deflating(self) -> None:
        """permessage-deflate was negotiated (or moved here with the connection): what the
        front sends is deflated (`_queue_deflated` replaces `queue_message` for this
        connection only: the others' per-message path stays as it is), and broadcasts
        deflate for it (`Shard.deflate_peers`)."""
        self.queue_message = self._queue_deflated  # type: ignore[method-assign]
        self.shard.deflate_peers.add(self)

    def _queue_deflated(self, payload: bytes, text: bool) -> bool:
        """`queue_message` for a connection with permessage-deflate: one deflated frame
        (credited by the payload's size, as the front counts it)."""
        if self.wire.phase is not _OPEN:
            return False
        self.outbox.append(self.wire.compress(payload, text))
        self._credit_packets += 1
        self._credit_bytes += len(payload)
        return True

    def queue_frame(self, frame: bytes) -> bool:
        """Queue an already built frame (a broadcast's) for this batch."""
        if self.wire.phase is not _OPEN:
            return False
        self.outbox.append(frame)
        return True

    def write_outbox(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.writelines(self.outbox)
        self.outbox = []
        if not self._write_paused:
            self.release_credits()

    def release_credits(self) -> None:
        """Tell the front that what it sent left this shard's buffers (for its limits)."""
        if self._credit_packets:
            self.shard.credit(self.peer_id, self._credit_packets, self._credit_bytes)
            self._credit_packets = self._credit_bytes = 0

    def close(self, code: int, reason: str) -> None:
        self.wire.send_close(code, reason)  # nothing unless open
        if self.wire.wants_write:
            self._write_wire_output()

    def fail(self, code: int, reason: str) -> None:
        """Fail the connection (RFC 6455 7.1.7): a close frame, then close TCP without waiting.

        A peer that does not read (a dead or slow one: why we fail it) may
        never take the close frame; the connection is cut after
        `CLOSE_GRACE_SECONDS` then.
        """
        self.wire.fail(code, reason)  # nothing unless open
        if self.wire.wants_write:
            self._write_wire_output()  # the close frame, then transport.close()

    def keepalive(self, now: float, interval: float, timeout: float | None) -> None:
        """The shard's sweep: ping when due; fail (1011) a peer whose pong is overdue.

        Pings go out every ``interval`` whatever the traffic (websockets'
        model), each an unmasked empty frame built once.  While reading from
        the peer is paused its pong may sit unread, so no verdict is reached
        then: the next ping after reading resumes gets a fresh ``timeout``.
        A close handshake we started that the peer does not finish within
        ``timeout`` (or ``interval``) ends with the TCP connection cut.
        """
        transport = self.transport
        if transport is None or transport.is_closing():
            return  # closed already: CLOSE_GRACE_SECONDS bounds it
        if self.wire.phase is not _OPEN:
            if not self._close_due:
                self._close_due = now + (timeout or interval)
            elif now >= self._close_due:
                transport.abort()
            return
        if self._paused_by_front or self._paused_by_shard:
            self._pong_due = 0.0
            return
        if self._pong_due and now >= self._pong_due:
            if self.shard.conn_log_level is not None:
                self.shard.log_connection(
                    self.shard.conn_log_level,
                    "peer %d from %s:%d: no pong in time, failing it (1011)",
                    self.peer_id,
                    self.ip,
                    self.port,
                )
            self.fail(1011, "keepalive ping timeout")
            return
        if now >= self._next_ping:
            self.wire.send_ping()
            self._write_wire_output()
            self._next_ping = now + interval
            if timeout and not self._pong_due:
                self._pong_due = now + timeout

    def set_no_delay(self, enabled: bool) -> None:
        sock = self.transport.get_extra_info("socket") if self.transport else None
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, int(enabled))

    # -- handing over to the next shard process (wsfleet reload) --------------------------

    def stop_reading(self) -> None:
        """Read nothing more, whatever pauses or resumes later (the handoff): what the kernel
        holds moves with the socket."""
        if not self._reading_held:
            self._reading_held = True
            if self.transport is not None and not self.transport.is_closing():
                self.transport.pause_reading()  # type: ignore[attr-defined]

    def movable(self) -> bool:
        """Whether this connection can be handed over now: in its upgrade or open, with
        every byte it was sent in the kernel's hands (nothing queued in the transport)."""
        transport = self.transport
        return (
            transport is not None
            and not transport.is_closing()
            and self.wire.phase in (_OPEN, _HANDSHAKE, _PENDING)
            and not self.outbox
            and not self.wire.wants_write
            and transport.get_write_buffer_size() == 0
        )

    def deflate_unmovable(self) -> bool:
        """Open with a permessage-deflate state that cannot move to another process: a
        zlib context kept between messages (context takeover, either way), or a compressed
        message half received (`ServerWire.deflate_parameters`)."""
        if self.wire.deflate is None or self.wire.phase is not _OPEN:
            return False
        try:
            self.wire.deflate_parameters()
        except ValueError:
            return True
        return False

    def handoff_state(self) -> MovedConnection:
        """Its state for the successor (`movable` must hold, its credits released)."""
        unparsed, fragments, fragments_text = self.wire.snapshot()
        return MovedConnection(
            peer_id=self.peer_id,
            pending_token=self._token,
            ip=self.ip,
            port=self.port,
            subprotocol=self.wire.subprotocol,
            mp_welcomed=self.mp_welcomed,
            mp_rooms=self.mp_rooms,
            paused_by_front=self._paused_by_front,
            groups=tuple(sorted(g.decode() for g in self.groups)) if self.groups else (),
            unparsed=unparsed,
            fragments=fragments,
            fragments_text=fragments_text,
            deflate=self.wire.deflate_parameters(),
        )

    def socket_fd(self) -> int:
        """The connection's socket descriptor (sent to the successor with ``SCM_RIGHTS``)."""
        assert self.transport is not None
        return self.transport.get_extra_info("socket").fileno()

    def abort(self) -> None:
        """Cut the TCP connection (the peer is reported gone)."""
        if self.transport is not None:
            self.transport.abort()

    # -- reading control ---------------------------------------------------------------

    def pause_by_front(self, paused: bool) -> None:
        self._paused_by_front = paused
        self._apply_reading()

    def pause_by_shard(self, paused: bool) -> None:
        self._paused_by_shard = paused
        self._apply_reading()

    def _apply_reading(self) -> None:
        transport = self.transport
        if transport is None or transport.is_closing() or self._reading_held:
            return
        off = self._paused_by_front or self._paused_by_shard
        if off != self._reading_off:
            self._reading_off = off
            self.shard.paused_sockets += 1 if off else -1
        if off:
            transport.pause_reading()
        else:
            transport.resume_reading()
