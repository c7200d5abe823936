"""Application code in the shards: ``shard_handler="module:attr"`` (``--shard-handler``).

The attr is a factory, called once in every shard process (at its start, again
in a restarted shard and in the fresh interpreter a ``wsfleet reload`` starts)
with a `ShardContext`; it returns the handler, an object with

* ``on_message(peer_id, data, is_text) -> bool | None`` (required): every
  message a peer of this shard sends, ``data`` its bytes (UTF-8 for text), in
  the order they came.  True or None: the message goes on to the front's
  ``poll()`` as if there were no handler (in order with the peer's other
  events); False: consumed here, the front never sees it.
* ``on_connect(peer_id, ip, port, protocol)`` (optional): a peer opened on this
  shard (after ``client_connected`` is on its way to the front), or was taken
  over from the previous process at a reload (its state starts afresh then).
* ``on_disconnect(peer_id)`` (optional): it is gone (its groups are left).

What a handler may do: answer (`ShardContext.put_packet`), close
(`ShardContext.close`), fan out to this shard's peers (`ShardContext.broadcast`,
over all of them or a group of its own: `ShardContext.join` / ``leave``), keep
per-connection state, count, validate, rate-limit.  What it may not:

* block: it runs in the shard's event loop, between socket reads; a slow
  handler stalls every peer of the shard (the heartbeat too: a loop stuck
  longer than ``shard_timeout`` gets the shard killed);
* see the whole server: peers of other shards are not reachable from it (a
  `ShardContext` call with such an id returns False), nor the front's groups
  (``server.join``): its groups are its own, per shard, lost at a reload;
* share state with the front or the other shards except through what it
  forwards: every shard has its own handler object in its own process.

An exception from a hook is logged (the first with its traceback, then at most
one line per `ERROR_LOG_SECONDS` with the count) and counted
(``shard_handler_errors``); the message it raised on is dropped (a handler
that validates must not let through what it choked on) and the connection goes
on.  A factory that raises stops the shard from booting (exit status 3: it is
not restarted; ``shard_failed`` in the front).

What the handler sends is not counted against the front's outbound limits
(``set_buffers``, ``max_buffered_bytes``): `ShardContext.put_packet` refuses
(False) while the peer's socket buffer is over its high-water mark (a peer
that does not read), so a handler that echoes cannot grow a buffer without
bound.  Not in Godot's multiplayer mode (``gd_mp_api``): the server refuses
to listen with both (the relay owns every message there).

Imports `wsfleet.ipc` only (and its siblings through the `Shard` handed in).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Collection
from typing import TYPE_CHECKING, Any

from wsfleet.ipc import handlerspec

from .wire import Phase, frame_header

if TYPE_CHECKING:
    from .connection import PeerConnection
    from .worker import Shard

log = logging.getLogger("wsfleet.shard")

#: At most one log line per this many seconds about a handler's exceptions (per shard).
ERROR_LOG_SECONDS = 10.0
_OPEN = Phase.OPEN


class ShardContext:
    """What a shard handler may do with its shard's peers (the ids are the front's ids)."""

    def __init__(self, shard: Shard) -> None:
        self._shard = shard
        #: This shard's index (0 .. shards - 1).
        self.index: int = shard.index
        self._groups: dict[str, set[int]] = {}
        self._member_of: dict[int, set[str]] = {}

    def _open(self, peer_id: int) -> PeerConnection | None:
        conn = self._shard.peers.get(peer_id)
        if conn is None or conn.wire.phase is not _OPEN:
            return None
        return conn

    def put_packet(self, peer_id: int, data: bytes, text: bool = False) -> bool:
        """Send one message to a peer of this shard (written at the end of this loop
        iteration, after what was queued before); False if it is not an open peer here
        or its socket buffer is full (it does not read)."""
        # The handler's per-message path: inlined rather than shared with `close`.
        conn = self._shard.peers.get(peer_id)
        if conn is None or conn._write_paused:
            return False
        wire = conn.wire
        if wire.phase is not _OPEN:
            return False
        if wire.deflate is not None:
            frame = wire.compress(bytes(data), text)
        else:
            frame = frame_header(0x81 if text else 0x82, len(data)) + data
        self._shard._queue_frame(conn, frame)
        return True

    def close(self, peer_id: int, code: int = 1000, reason: str = "") -> bool:
        """Start the close handshake with a peer of this shard; False if it is not one."""
        conn = self._open(peer_id)
        if conn is None:
            return False
        if not (code == 1000 or 3000 <= code <= 4999 or 1003 <= code <= 1014):
            raise ValueError(f"close code {code}: 1000, 1003-1014 or 3000-4999")
        conn.close(code, reason)
        return True

    def broadcast(
        self,
        data: bytes,
        text: bool = False,
        group: str | None = None,
        exclude: Collection[int] = (),
    ) -> int:
        """Send a message to every open peer of this shard (or of its ``group``, see
        `join`) but those in ``exclude``; how many it was queued for (peers whose
        buffer is full are skipped)."""
        data = bytes(data)
        if group is None:
            ids: Collection[int] = list(self._shard.peers)
        else:
            ids = list(self._groups.get(group, ()))
        sent = 0
        for peer_id in ids:
            if peer_id not in exclude and self.put_packet(peer_id, data, text):
                sent += 1
        return sent

    def join(self, peer_id: int, group: str) -> bool:
        """Put a peer of this shard in one of the handler's groups (not the front's)."""
        if self._open(peer_id) is None:
            return False
        self._groups.setdefault(group, set()).add(peer_id)
        self._member_of.setdefault(peer_id, set()).add(group)
        return True

    def leave(self, peer_id: int, group: str) -> bool:
        """Take a peer out of one of the handler's groups; False if it was not in it."""
        members = self._groups.get(group)
        if members is None or peer_id not in members:
            return False
        members.discard(peer_id)
        if not members:
            del self._groups[group]
        self._member_of[peer_id].discard(group)
        return True

    def group_members(self, group: str) -> list[int]:
        """The peers of this shard in one of the handler's groups."""
        return sorted(self._groups.get(group, ()))

    def peer_ids(self) -> list[int]:
        """The open peers of this shard."""
        return list(self._shard.peers)

    def _forget(self, peer_id: int) -> None:
        for group in self._member_of.pop(peer_id, ()):
            members = self._groups.get(group)
            if members is not None:
                members.discard(peer_id)
                if not members:
                    del self._groups[group]


class ShardApp:
    """The handler of one shard, its context and the bookkeeping of its errors."""

    def __init__(self, shard: Shard, spec: str) -> None:
        self.spec = spec
        self.shard = shard
        self.context = ShardContext(shard)
        handler = handlerspec.resolve(spec)(self.context)
        on_message = getattr(handler, "on_message", None)
        if not callable(on_message):
            raise ValueError(f"shard_handler {spec}: what it returned has no on_message")
        self.handler: Any = handler
        #: The per-message hook, bound once (the connections call it directly).
        self.on_message = on_message
        self._on_connect = getattr(handler, "on_connect", None)
        self._on_disconnect = getattr(handler, "on_disconnect", None)
        self._logged_at = -ERROR_LOG_SECONDS
        self._unlogged = 0

    def error(self, hook: str, peer_id: int) -> None:
        """A hook raised (called from inside its ``except``): count it, log it (rate-limited)."""
        self.shard.count("shard_handler_errors")
        now = time.monotonic()
        if now - self._logged_at < ERROR_LOG_SECONDS:
            self._unlogged += 1
            return
        self._logged_at = now
        more = f" ({self._unlogged} more since the last line)" if self._unlogged else ""
        self._unlogged = 0
        log.exception(
            "shard %d: shard handler %s: %s raised for peer %d; the message was dropped%s",
            self.shard.index,
            self.spec,
            hook,
            peer_id,
            more,
        )

    def connected(self, conn: PeerConnection, protocol: str) -> None:
        if self._on_connect is not None:
            try:
                self._on_connect(conn.peer_id, conn.ip, conn.port, protocol)
            except Exception:
                self.error("on_connect", conn.peer_id)

    def disconnected(self, peer_id: int) -> None:
        self.context._forget(peer_id)
        if self._on_disconnect is not None:
            try:
                self._on_disconnect(peer_id)
            except Exception:
                self.error("on_disconnect", peer_id)
