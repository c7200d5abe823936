"""One peer's queues between the fleet and the API objects, and the limits they keep.

Owns the small explicit objects a peer gets instead of the server's fields:

* `PeerLimits` (frozen): the per-peer limits of ``set_buffers`` and what
  to do when the outbound one is reached;
* `CommandSink`: the way to send a command to the shard that holds the
  peer (the fleet's link to that shard implements it);
* `OutboundBudget`: the server-wide cap on bytes sent and not yet handed
  to the kernel (``max_buffered_bytes``) and the count of refused packets;
* `PeerChannel`: one peer's inbound queue, outbound counters and state.
  The fleet's dispatch fills the inbox, returns credits and ends it; the
  `WebSocketPeer` (and the multiplayer relay) read the inbox and send
  through `PeerChannel.send`.  Its fields are public on purpose: both
  sides use them on the per-message path, without calls.

Imports `wsfleet.ipc.messages`, `wsfleet.ipc.inbox` and `wsfleet.errors` only.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Protocol

from wsfleet.ipc import messages as m
from wsfleet.ipc.inbox import Inbox

from .errors import Error

log = logging.getLogger("wsfleet")

# Bound once: send() runs per message.
_OK, _FAILED, _OUT_OF_MEMORY = Error.OK, Error.FAILED, Error.ERR_OUT_OF_MEMORY
#: How often at most refused packets are logged (their count since the last line).
REFUSAL_LOG_SECONDS = 10.0


class CommandSink(Protocol):
    """Where a peer's commands go: the shard that holds its connection."""

    #: That shard's index.
    index: int

    def command(self, kind: int, peer_id: int, flags: int, payload: bytes) -> None:
        """Queue one command record (sent at the end of ``poll``, or at once outside it)."""
        ...

    def command_many(self, kind: int, peer_id: int, payloads: list[bytes]) -> None:
        """Queue one command of ``kind`` (flags 0) per payload, in order."""
        ...


@dataclass(frozen=True, slots=True)
class PeerLimits:
    """Per-peer limits, fixed at ``listen``.

    ``out_bytes`` (payload bytes: the shard adds the frame headers) is at
    least the largest message a peer may send, so that the echo of any
    accepted message fits an empty outbound buffer; it is at most what one
    ring record carries.
    """

    in_packets: int
    in_bytes: int
    out_packets: int
    out_bytes: int
    #: Close a peer whose outbound buffer is full with this code (None: only refuse).
    slow_close_code: int | None


class OutboundBudget:
    """Bytes the application sent that no shard has handed to the kernel yet, over every peer.

    ``limit`` is the server's ``max_buffered_bytes``: beyond it `PeerChannel.send`
    refuses, whatever the peer's own limit, so that many peers with large
    limits cannot exhaust memory together.  Refusals are counted (`stats`)
    and logged at most every `REFUSAL_LOG_SECONDS`.
    """

    __slots__ = ("limit", "room", "refused_by_peer", "refused_by_server", "_logged_at", "_unlogged")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        #: ``limit`` less what is buffered (one number: `PeerChannel.send` checks it per message).
        self.room = limit
        self.refused_by_peer = 0
        self.refused_by_server = 0
        self._logged_at = -REFUSAL_LOG_SECONDS
        self._unlogged = 0

    def refused(self, peer_id: int, by_server: bool) -> None:
        """Count one refused packet; log the count now and then (the refusal path only)."""
        if by_server:
            self.refused_by_server += 1
        else:
            self.refused_by_peer += 1
        self._unlogged += 1
        now = time.monotonic()
        if now - self._logged_at >= REFUSAL_LOG_SECONDS:
            log.warning(
                "put_packet refused %d packet(s) (ERR_OUT_OF_MEMORY) in the last %.0f s, the "
                "latest to peer %d: %s; so far %d for full peer buffers, %d for "
                "max_buffered_bytes (%d bytes buffered)",
                self._unlogged,
                min(now - self._logged_at, REFUSAL_LOG_SECONDS),
                peer_id,
                "max_buffered_bytes is reached" if by_server else "its outbound buffer is full",
                self.refused_by_peer,
                self.refused_by_server,
                self.used,
            )
            self._logged_at = now
            self._unlogged = 0

    @property
    def used(self) -> int:
        """Bytes buffered now."""
        return self.limit - self.room

    def stats(self) -> dict[str, int]:
        return {
            "buffered_bytes": self.used,
            "max_buffered_bytes": self.limit,
            "refused_peer_full": self.refused_by_peer,
            "refused_server_full": self.refused_by_server,
        }


class PeerChannel:
    """One connected peer as the fleet keeps it: inbox, outbound counters, state."""

    __slots__ = (
        "id",
        "link",
        "limits",
        "budget",
        "max_out_bytes",
        "inbox",
        "packet_room",
        "byte_room",
        "open",
        "sendable",
    )

    def __init__(
        self, peer_id: int, link: CommandSink, limits: PeerLimits, budget: OutboundBudget
    ) -> None:
        self.id = peer_id
        #: The shard that holds the connection.
        self.link = link
        self.limits = limits
        self.budget = budget
        self.max_out_bytes = limits.out_bytes
        #: Received messages not yet read, filled by the fleet; its ``paused``: the fleet
        #: asked the shard to stop reading (the inbox reached a limit).
        self.inbox = Inbox(limits.in_packets, limits.in_bytes)
        # What the outbound limits leave: send() takes from them, the shard's credits (what
        # it handed to the kernel) give back.  Counted down, so that send() compares one
        # number per limit with the packet's size.
        self.packet_room = limits.out_packets
        self.byte_room = limits.out_bytes
        #: Connected: until the connection is gone (`left`).
        self.open = True
        #: Open and not closing: `send` works.
        self.sendable = True

    # -- sending -------------------------------------------------------------------------

    def send(self, command: int, payload: bytes) -> Error:
        """Send one message (`CMD_SEND_TEXT` / `CMD_SEND_BINARY`) within the limits."""
        if not self.sendable:
            return _FAILED
        size = len(payload)
        budget = self.budget
        peer_full = not self.packet_room or size > self.byte_room
        if peer_full or size > budget.room:
            return self._refuse(peer_full)
        self.packet_room -= 1
        self.byte_room -= size
        budget.room -= size
        self.link.command(command, self.id, 0, payload)
        return _OK

    def send_many(self, command: int, payloads: list[bytes], size: int) -> Error:
        """Send every message of ``payloads`` (same command; ``size``: their summed
        length), or none of them.

        All-or-nothing: when the limits have no room for the whole batch,
        nothing goes and the refusal is the one `send` gives for the first
        packet that would not fit (counted and logged once).
        """
        if not self.sendable:
            return _FAILED
        count = len(payloads)
        budget = self.budget
        if count > self.packet_room or size > self.byte_room or size > budget.room:
            return self._refuse_batch(payloads)
        self.packet_room -= count
        self.byte_room -= size
        budget.room -= size
        self.link.command_many(command, self.id, payloads)
        return _OK

    def _refuse_batch(self, payloads: list[bytes]) -> Error:
        packets, room, server_room = self.packet_room, self.byte_room, self.budget.room
        for payload in payloads:  # find the first packet that does not fit
            size = len(payload)
            peer_full = not packets or size > room
            if peer_full or size > server_room:
                return self._refuse(peer_full)
            packets, room, server_room = packets - 1, room - size, server_room - size
        raise AssertionError("unreachable: the batch fits")

    @property
    def out_bytes(self) -> int:
        """Bytes sent and not yet handed to the kernel by the shard."""
        return self.max_out_bytes - self.byte_room

    def room(self) -> int:
        """The largest message `send` takes now (0 while the packet count is at its limit)."""
        if not self.sendable or not self.packet_room:
            return 0
        return max(0, min(self.byte_room, self.budget.room))

    def _refuse(self, peer_full: bool) -> Error:
        """A packet refused: the peer's own limits are full (``peer_full``), else the
        server's ``max_buffered_bytes``."""
        self.budget.refused(self.id, by_server=not peer_full)
        code = self.limits.slow_close_code
        if code is not None and peer_full:
            log.warning("peer %d does not read what it is sent: closing it with %d", self.id, code)
            self.close(code, b"slow consumer", fail=True)
        return _OUT_OF_MEMORY

    def command(self, kind: int, flags: int = 0, payload: bytes = b"") -> None:
        """A command about this peer (no delay, ...) to its shard."""
        if self.open:
            self.link.command(kind, self.id, flags, payload)

    def close(self, code: int, reason: bytes, fail: bool = False) -> None:
        """Start the close handshake (``fail``: fail the connection); drops the unread inbox."""
        if not self.sendable:
            return
        self.sendable = False  # sending fails from now on; the fleet reports the end
        self._drop_inbox()
        flags = m.FLAG_FAIL if fail else 0
        self.link.command(m.CMD_CLOSE, self.id, flags, m.encode_close(code, reason))

    # -- receiving -----------------------------------------------------------------------

    def resume_if_room(self) -> None:
        """Called after a read while reading is paused: resume at half the limits."""
        limits = self.limits
        inbox = self.inbox
        if (
            inbox.paused
            and len(inbox) <= limits.in_packets // 2
            and inbox.bytes <= limits.in_bytes // 2
        ):
            inbox.paused = False
            if self.open:
                self.link.command(m.CMD_RESUME_READING, self.id, 0, b"")

    # -- the end -------------------------------------------------------------------------

    def left(self) -> None:
        """The connection is gone (or the server stops): nothing more comes or goes."""
        self.open = self.sendable = False
        self._drop_inbox()
        # What the shard had not handed to the kernel died with the connection.
        self.budget.room += self.max_out_bytes - self.byte_room
        self.packet_room = 0
        self.byte_room = self.max_out_bytes

    def _drop_inbox(self) -> None:
        self.inbox.clear()
