"""``wsfleet reload`` inside a shard: hand every connection over, or take them over.

The old shard (`hand_off`, when the supervisor sends `HandOff`) gives its
successor everything it holds, then exits, so that the successor is the only
producer of the events ring and the only consumer of the commands ring from
then on:

1. it stops accepting (the listening sockets stay open in the supervisor; new
   connections wait in their backlog) and stops taking commands (what the
   front sends meanwhile waits in the commands ring, for the successor), after
   finishing a command that arrives in chunks;
2. it closes with 1012 ("service restart") every connection whose
   permessage-deflate keeps a zlib context between messages (context
   takeover, either way: that memory cannot move), counted in
   ``deflate_reload_closes`` and logged; those keep reading until their close
   handshake ends.  It stops reading from every other connection, for good (a
   full events ring that drains does not resume them): what arrives waits in
   the kernel, in the socket that moves.  A deflate connection without context
   takeover moves (its parameters do, `MovedConnection.deflate`), unless a
   compressed message is half received once reading stops: that one is failed
   with 1012 (and counted) too;
3. it waits until every event it has is in the ring, every byte it was to send
   is in the kernel, and every connection that was closing is gone (its
   departure reported).  What is still not settled after `SETTLE_SECONDS`
   (a peer that reads nothing, a close handshake the peer does not finish) is
   cut, counted in ``handoff_dropped`` and logged: its departure is reported
   like any other;
4. it sends the connections and their state (`wsfleet.ipc.handoff`) and exits
   at once, without closing anything: the sockets live on in the successor.

The successor (`take_over`) registers each connection under its peer id (no
event: for the front and the application the peer never left), feeds it the
bytes the old shard had read but not yet parsed, and only then starts taking
commands and accepting.

Imports `wsfleet.ipc` and its siblings.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import sys
import time
from typing import TYPE_CHECKING

from wsfleet.ipc import handoff
from wsfleet.ipc.aio import RingReader

from .connection import PeerConnection

if TYPE_CHECKING:
    from .worker import Shard

log = logging.getLogger("wsfleet.shard")

#: How long the old shard waits for its connections to settle before it cuts the rest.
SETTLE_SECONDS = 5.0
#: How long it waits for the front to finish a command it sends in chunks.
CHUNKED_COMMAND_SECONDS = 5.0
#: Exit status of a shard that handed its connections over.
EXIT_HANDED_OFF = 0


async def hand_off(shard: Shard, reader: RingReader, link: socket.socket) -> None:
    """Hand every connection to the successor on ``link``, then end this process.

    Whatever goes wrong ends this process too (status 1): half handed over, it
    could serve nothing.  The successor then sees the handoff end early and
    exits, and the supervisor takes that as the shard's death (its peers are
    gone, it is restarted).
    """
    try:
        await _hand_off(shard, reader, link)
    except BaseException:
        log.exception("shard %d: the handoff failed", shard.index)
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(1)


async def _hand_off(shard: Shard, reader: RingReader, link: socket.socket) -> None:
    started = time.monotonic()
    for server in shard.servers:
        server.close()
    reader.stop()
    await _finish_chunked_command(shard)
    closing = _close_deflate_contexts(shard)
    unsettled = await _settle(shard, SETTLE_SECONDS, closing)
    if unsettled:
        log.warning(
            "shard %d: %d connection(s) not settled within %g s of the handoff (unsent data "
            "or an unfinished close): cut",
            shard.index,
            len(unsettled),
            SETTLE_SECONDS,
        )
        for conn in unsettled:
            shard.count("handoff_dropped")
            conn.abort()
        if await _settle(shard, SETTLE_SECONDS, closing):  # their departures into the ring
            raise RuntimeError("connections cut at the handoff did not go")
    # From here on nothing awaits: no callback can read, parse or emit between the
    # snapshots and the end of this process.
    moving = list(shard.connections)
    states = [conn.handoff_state() for conn in moving]
    fds = [conn.socket_fd() for conn in moving]
    shard.publish_stats()
    link.setblocking(True)
    handoff.send(link, states, fds, shard.refusing)
    log.info(
        "shard %d: handed %d connection(s) over in %.0f ms",
        shard.index,
        len(states),
        (time.monotonic() - started) * 1000,
    )
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    # Nothing more of this process may touch the rings or the sockets: the successor
    # owns them. No loop teardown, no atexit: the kernel closes our copies of the fds.
    os._exit(EXIT_HANDED_OFF)


async def _finish_chunked_command(shard: Shard) -> None:
    """A command split in chunks must be taken whole here: the successor starts at a record."""
    deadline = time.monotonic() + CHUNKED_COMMAND_SECONDS
    while shard.commands.in_message and time.monotonic() < deadline:
        records = shard.commands.pop_all()
        if records:
            shard.on_commands(records)
        else:
            await asyncio.sleep(0.001)
    if shard.commands.in_message:
        raise RuntimeError("the front did not finish a chunked command; cannot hand off")


def _close_deflate_contexts(shard: Shard) -> set[PeerConnection]:
    """Close (1012) every open connection whose permessage-deflate state cannot move;
    returns them (they keep reading, so that their close handshakes end)."""
    closing = {conn for conn in shard.connections if conn.deflate_unmovable()}
    for conn in closing:
        shard.count("deflate_reload_closes")
        conn.close(1012, "service restart")
    if closing:
        log.info(
            "shard %d: %d connection(s) with permessage-deflate context takeover closed "
            "(1012) for the reload: their compression state cannot move",
            shard.index,
            len(closing),
        )
    return closing


async def _settle(
    shard: Shard,
    seconds: float,
    closing: set[PeerConnection] | frozenset[PeerConnection] = frozenset(),
) -> list[PeerConnection]:
    """Stop reading from every connection (again: one accepted meanwhile too) but those
    ``closing`` for the reload, then wait until every event and credit is in the ring and
    every connection is movable or gone; returns the connections still not movable after
    ``seconds``.  A deflate connection that cannot move once it reads no more (a
    compressed message half received) is failed with 1012.

    Events are never given up: a front that does not take them (an application that
    stopped polling) is waited for, bounded only by the supervisor's handoff deadline
    (past it the shard is killed: its peers are gone, as after a crash).
    """
    deadline = time.monotonic() + seconds
    warned = False
    while True:
        failed = 0
        for conn in shard.connections:
            if conn not in closing:
                conn.stop_reading()
                if conn.deflate_unmovable():
                    shard.count("deflate_reload_closes")
                    conn.fail(1012, "service restart")
                    failed += 1
            conn.release_credits()
        if failed:
            log.info(
                "shard %d: %d connection(s) with permessage-deflate failed (1012) for the "
                "reload: a compressed message was half received",
                shard.index,
                failed,
            )
        shard.flush()
        pending = [conn for conn in shard.connections if not conn.movable()]
        if not pending and not shard.has_backlog:
            return []
        if time.monotonic() >= deadline:
            if pending:
                return pending
            if not warned:
                warned = True
                log.warning(
                    "shard %d: the handoff waits for the front to take its events "
                    "(is the application polling?)",
                    shard.index,
                )
        await asyncio.sleep(0.005)


class _Holding(asyncio.Protocol):
    """A moved connection's protocol until every moved connection is registered: it keeps
    what arrives (uvloop starts reading an attached socket whatever its protocol asks)."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.received: list[bytes] = []
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.received.append(data)
        assert self.transport is not None
        self.transport.pause_reading()  # one read kept is enough: the rest waits in the kernel

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True


async def take_over(
    shard: Shard,
    loop: asyncio.AbstractEventLoop,
    moved: list[handoff.MovedConnection],
    fds: list[int],
    refusing: bool = False,
) -> int:
    """Serve the connections the old shard handed over; returns how many are still open.

    Three steps, so that nothing is read before every connection is registered (a
    frame one of them relays must find every other): attach each socket to a
    `_Holding` protocol; give each transport its `PeerConnection` (registered under
    its peer id, no event); then let each replay its bytes and read.
    """
    shard.refusing = refusing  # set_refuse_new_connections, before anything is accepted
    held: list[tuple[handoff.MovedConnection, _Holding]] = []
    for state, fd in zip(moved, fds, strict=True):
        sock = socket.socket(fileno=fd)
        holding = _Holding()
        try:
            await loop.connect_accepted_socket(lambda holding=holding: holding, sock)
        except OSError as exc:
            log.info("shard %d: a moved connection was already gone: %s", shard.index, exc)
            sock.close()
            holding.lost = True
        held.append((state, holding))
    started: list[tuple[PeerConnection, bytes]] = []
    for state, holding in held:
        if holding.lost or holding.transport is None:
            shard.left_during_handoff(state.peer_id, state.pending_token, state.ip)
            continue
        conn = PeerConnection.moved(shard, state)
        holding.transport.set_protocol(conn)
        conn.connection_made(holding.transport)
        started.append((conn, b"".join(holding.received)))
    for conn, received in started:
        conn.start_after_move(received)
    shard.flush()
    return len(shard.connections)
