"""``RemotePeer``: a client held by another node of the cluster, as this node sees it.

``server.get_peer(id)`` returns one for a peer of another node: the same
method names as `wsfleet.peer.WebSocketPeer`, so that code that sends to a
peer works whichever node holds it.  What it sends goes to the owner node's
inbox with the rest of this ``poll()`` tick (one NATS message per node per
tick), and the owner puts it on the peer's socket.

What differs from a local peer: its packets arrive at its own node (a
remote peer has no inbox here: ``get_packet`` returns ``b""`` with
``ERR_UNAVAILABLE``); ``put_packet`` returns ``ERR_CONNECTION_ERROR`` while
this node is cut from NATS (counted, logged at most every 10 s) and ``OK``
once the packet is queued for the owner node, whose own outbound limits
then apply (a packet the owner's buffers refuse is dropped there and
counted in its ``dropped_full``); ``set_no_delay`` is ignored.

Imports `.errors`, `.peer` (the close checks) and `.variant` only; the
cluster (`wsfleet.cluster`) is handed in.
"""

from __future__ import annotations

import logging
from typing import Any, Protocol

from .errors import Error
from .peer import check_close, is_utf8, packet_bytes, var_packet

log = logging.getLogger("wsfleet")


class RemoteSink(Protocol):
    """What a remote peer sends through (`wsfleet.cluster.Cluster`)."""

    def send(self, peer: RemotePeer, text: bool, payload: bytes) -> Error: ...

    def close_peer(self, peer: RemotePeer, code: int, reason: bytes) -> Error: ...

    def room(self) -> int: ...


class RemotePeer:
    """A peer held by another node (``node``). Obtain it with ``server.get_peer(id)``."""

    WRITE_MODE_TEXT = 0
    WRITE_MODE_BINARY = 1

    __slots__ = (
        "id",
        "node",
        "protocol",
        "_ip",
        "_port",
        "_sink",
        "_write_mode",
        "_open",
        "_error",
    )

    def __init__(
        self, sink: RemoteSink, node: str, peer_id: int, ip: str, port: int, protocol: str
    ) -> None:
        self._sink = sink
        #: The name of the node that holds the connection.
        self.node = node
        self.id = peer_id
        #: The subprotocol agreed in the handshake ("" if none).
        self.protocol = protocol
        self._ip = ip
        self._port = port
        self._write_mode = self.WRITE_MODE_BINARY
        self._open = True
        self._error = Error.OK

    def __repr__(self) -> str:
        state = "connected" if self._open else "gone"
        return f"<RemotePeer {self.id} on {self.node} {self._ip}:{self._port} {state}>"

    def gone(self) -> None:
        """Its node reported it gone (or died): sends fail from now on."""
        self._open = False

    # -- PacketPeer ----------------------------------------------------------------------

    def put_packet(self, data: bytes | bytearray | memoryview | str) -> Error:
        """Send one message (text or binary by the write mode) through its node.

        ``OK`` once queued for the owner node (it leaves at the end of this
        ``poll``); ``FAILED`` once the peer is gone; ``ERR_CONNECTION_ERROR``
        while NATS is unreachable; ``ERR_OUT_OF_MEMORY`` for a packet larger
        than one NATS message may carry (``max_payload``, 1 MiB by default), or
        while more than 64 MiB wait for a slow NATS.
        """
        payload = packet_bytes(data)
        if not self._open:
            return Error.FAILED
        text = self._write_mode == self.WRITE_MODE_TEXT
        if text and not is_utf8(payload):
            log.error("put_packet: text write mode needs UTF-8 data (peer %d)", self.id)
            return Error.ERR_INVALID_PARAMETER
        return self._sink.send(self, text, payload)

    def put_var(self, value: Any, full_objects: bool = False) -> Error:
        """Send ``value`` in Godot 3.2's Variant encoding."""
        encoded = var_packet(value, full_objects)
        return encoded if isinstance(encoded, Error) else self.put_packet(encoded)

    def get_packet(self) -> bytes:
        """Always ``b""``: a remote peer's packets arrive at its own node."""
        self._error = Error.ERR_UNAVAILABLE if self._open else Error.FAILED
        return b""

    def get_var(self, allow_objects: bool = False) -> Any:
        self.get_packet()
        return None

    def get_packet_error(self) -> Error:
        return self._error

    def get_available_packet_count(self) -> int:
        return 0

    # -- WebSocketPeer -------------------------------------------------------------------

    def get_write_mode(self) -> int:
        return self._write_mode

    def set_write_mode(self, mode: int) -> None:
        if mode != 1 and mode != 0:
            raise ValueError(
                f"write mode must be WRITE_MODE_TEXT (0) or WRITE_MODE_BINARY (1): {mode}"
            )
        self._write_mode = mode

    def was_string_packet(self) -> bool:
        return False

    def is_connected_to_host(self) -> bool:
        """True while its node reports it connected."""
        return self._open

    def close(self, code: int = 1000, reason: str = "") -> None:
        """Ask its node to start the close handshake (the client sees ``code`` and
        ``reason``); it leaves (``remote_peer_disconnected``) once its node reports it.
        ValueError for a code or reason RFC 6455 does not allow."""
        encoded = check_close(code, reason)
        if self._open:
            self._sink.close_peer(self, code, encoded)

    def get_connected_host(self) -> str:
        """The client's address, as its node saw it."""
        return self._ip

    def get_connected_port(self) -> int:
        return self._port

    def get_node_name(self) -> str:
        """The node that holds the connection."""
        return self.node

    def is_remote(self) -> bool:
        return True

    def set_no_delay(self, enabled: bool) -> None:
        """Ignored for a remote peer (its node's default applies)."""

    def get_outbound_room(self) -> int:
        """The largest packet `put_packet` takes now: what one cluster message carries,
        0 while NATS is unreachable (the owner node's own limits apply there)."""
        return self._sink.room() if self._open else 0
