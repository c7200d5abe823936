"""The shard's wire: one WebSocket server connection as a pure object, without I/O.

`ServerWire` is Sans-I/O in the style of ``h11`` and `websockets`'
``ServerProtocol``: the caller hands it the bytes it reads
(`ServerWire.receive_data`, which returns the `EventKind` events they
complete) and writes what `ServerWire.data_to_send` returns (``b""`` in it is
the end of the stream: close the TCP connection, or half-close it after a
refused handshake).  It never touches a socket, a clock or the shard: timers,
pausing, keepalive deadlines and reporting to the front are the caller's
(`wsfleet.shards.connection`).

Owns:

* the connection's `Phase` and every change of it (`TRANSITIONS`, applied by
  `ServerWire._move` only);
* the fast upgrade: a plain, valid upgrade request (``GET ... HTTP/1.1`` with the
  headers RFC 6455 requires, each once, tokens where tokens go, a subprotocol
  the caller's rule accepts) is answered here with Godot's own 101 response;
  any other request goes whole to ``websockets``, which accepts it or answers
  the right HTTP error.  A request over ``max_request_bytes`` is answered 431
  before either parser sees it; the caller's ``admit`` policy (Origin, a full
  server) may refuse a valid request with its own status;
* frame delimiting and the fast path: the common frame - a whole, unfragmented,
  masked text or binary frame with no reserved bits, within ``max_message``,
  while no fragmented message is open - is unmasked and delivered here
  (``websockets``' parser costs ~3 us a frame).  Every other frame goes to
  ``websockets`` from its first byte, its bytes as they arrive; the wire counts
  them, so the fast path resumes exactly at the next frame boundary;
* the peer's plain close: after the fast upgrade no ``ServerProtocol`` is made
  until a frame or a call needs one, and a whole, valid close frame that comes
  before that is echoed here, as websockets echoes it (`_fast_close_frame`);
* UTF-8: a text message that is not UTF-8 fails the connection with 1007
  (``websockets``' Sans-I/O layer leaves that check to its asyncio layer);
* server frame headers (`frame_header`) and the keepalive ping;
* permessage-deflate (RFC 7692) in `DeflateWire` only (a shard with ``compression``):
  negotiated, inflated and deflated by ``websockets``' own extension; ``max_message``
  holds for the inflated size.  A plain `ServerWire` runs none of it.

``websockets``' ``ServerProtocol``, kept inside, stays the authority for the
handshake rules of any request the fast path does not take, for control
frames (but the plain close above), fragmentation, close codes and the close
handshake.  Deliberate differences from a bare ``ServerProtocol``
(``docs/WIRE.md``, and ``tests/test_wire_differential.py`` names each one):

1. a close frame inside a fragmented message (Autobahn 7.1.5) is a normal close:
   the unfinished message is dropped and the close echoed (RFC 6455 5.4 lets
   control frames interleave with fragments); ``websockets`` fails with 1002;
2. a frame whose header alone breaks RFC 6455 (reserved bits - but RSV1 on a data
   message's first frame once permessage-deflate is negotiated -, a control frame
   over 125 bytes or fragmented) fails the connection (1002) at its header;
   ``websockets`` waits for the payload first, which may be megabytes;
3. text messages must be UTF-8 (1007), see above;
4. requests over ``max_request_bytes`` get 431; a request is judged once its
   head has ended (websockets may refuse a broken line sooner); the 101
   response carries only the headers Godot sends (no ``Date``).

May import: ``websockets`` only (nothing of the project), so it can be tested
and fuzzed in-process.
"""

from __future__ import annotations

import binascii
import enum
import functools
import hashlib
import logging
import re
import struct
from collections.abc import Callable, Mapping, Sequence
from http import HTTPStatus
from types import MappingProxyType
from typing import Any

from websockets.exceptions import NegotiationError
from websockets.extensions.base import ServerExtensionFactory
from websockets.extensions.permessage_deflate import PerMessageDeflate
from websockets.frames import EXTERNAL_CLOSE_CODES, Close, Frame, Opcode, apply_mask
from websockets.http11 import MAX_LINE_LENGTH, MAX_NUM_HEADERS, Request
from websockets.protocol import State
from websockets.server import ServerProtocol

__all__ = [
    "DEFAULT_MAX_MESSAGE",
    "DEFAULT_MAX_REQUEST_BYTES",
    "DeflateWire",
    "PING_FRAME",
    "Event",
    "EventKind",
    "Phase",
    "ServerWire",
    "TRANSITIONS",
    "Trigger",
    "frame_header",
]


class Phase(enum.Enum):
    """Where a connection is in its life; `ServerWire.phase`."""

    # Members are singletons compared by identity: the identity hash (C) instead of
    # Enum's Python-level hash of the name, which made each `TRANSITIONS` lookup ~0.6 us.
    __hash__ = object.__hash__

    #: Reading the upgrade request.
    HANDSHAKE = "handshake"
    #: A valid upgrade request waits for the application's verdict (``hold_upgrades``):
    #: what comes meanwhile is kept for after the 101.
    PENDING = "pending"
    #: Open: data frames flow both ways; the fast path cuts and delivers frames.
    OPEN = "open"
    #: The server sent a close frame and waits for the peer's; ``websockets`` owns the
    #: stream (data messages that still come are delivered).
    CLOSING = "closing"
    #: The server is done: its end of stream is queued (after a close handshake or a
    #: failure); whatever still comes is discarded.
    CLOSED = "closed"
    #: The upgrade request was refused: the HTTP answer (if any) and the end of stream
    #: are queued; whatever still comes is discarded.
    REFUSED = "refused"


class Trigger(enum.Enum):
    """What moves a connection from one `Phase` to the next (`TRANSITIONS`)."""

    __hash__ = object.__hash__  # as Phase's

    ACCEPT = "accept"  # the upgrade request is accepted (101 queued)
    REFUSE = "refuse"  # the upgrade request is refused (an HTTP error or nothing, then EOF)
    SEND_CLOSE = "send_close"  # the server starts the close handshake
    END = "end"  # the server's end of stream is queued: close echoed, or connection failed
    RESUME = "resume"  # an open connection moved here from another shard (wsfleet reload)
    HOLD = "hold"  # a valid upgrade request waits for the application (hold_upgrades)


#: Every phase change there is; `ServerWire._move` applies this table and nothing else.
TRANSITIONS: Mapping[tuple[Phase, Trigger], Phase] = MappingProxyType(
    {
        (Phase.HANDSHAKE, Trigger.ACCEPT): Phase.OPEN,
        (Phase.HANDSHAKE, Trigger.REFUSE): Phase.REFUSED,
        (Phase.HANDSHAKE, Trigger.RESUME): Phase.OPEN,
        (Phase.HANDSHAKE, Trigger.HOLD): Phase.PENDING,
        (Phase.PENDING, Trigger.ACCEPT): Phase.OPEN,
        (Phase.PENDING, Trigger.REFUSE): Phase.REFUSED,
        (Phase.OPEN, Trigger.SEND_CLOSE): Phase.CLOSING,
        (Phase.OPEN, Trigger.END): Phase.CLOSED,
        (Phase.CLOSING, Trigger.END): Phase.CLOSED,
    }
)


class EventKind(enum.IntEnum):
    """The kind of an event; an event is a ``(kind, value)`` pair.

    A pair, not an object per kind: a pair comes from CPython's free list
    (~0.05 us), an instance of a class with slots costs ~0.2 us, a fifth of a
    small frame's whole receive path.
    """

    #: The handshake succeeded; value: the subprotocol chosen ("" for none).
    OPENED = 1
    #: The handshake was refused; value: the HTTP status answered (None: no answer,
    #: the request was not HTTP).
    REFUSED = 2
    #: A text message; value: its bytes (valid UTF-8).
    TEXT = 3
    #: A binary message; value: its bytes.
    BINARY = 4
    #: The peer started the close handshake (the server echoed it); value: the peer's
    #: ``Close`` (1005 if its frame had no code).
    CLOSE_REQUEST = 5
    #: The connection failed (RFC 6455 7.1.7); value: the ``Close`` sent (1006: none).
    FAILED = 6
    #: A plain HTTP request (no ``Upgrade``) the caller's ``answer_http`` answered (a health
    #: check); value: the HTTP status sent.  The stream ends after it, as after a refusal.
    ANSWERED = 8
    #: A pong came; value: its payload.
    PONG = 7
    #: A valid upgrade request waits for `ServerWire.accept_pending` or `refuse_pending`
    #: (``hold_upgrades``); value: ``(subprotocol the server's rule chose, offered ones)``.
    PENDING = 9


Event = tuple[EventKind, Any]
#: An answer to a plain HTTP request: status, body text, extra headers.
HttpAnswer = tuple[int, str, list[tuple[str, str]]]

DEFAULT_MAX_MESSAGE = 1 << 20
DEFAULT_MAX_REQUEST_BYTES = 8192
#: FIN + ping, no payload: the keepalive ping, built once.
PING_FRAME = b"\x89\x00"

_HANDSHAKE, _OPEN, _CLOSING = Phase.HANDSHAKE, Phase.OPEN, Phase.CLOSING
_PENDING = Phase.PENDING
_PHRASES = {status.value: status.phrase for status in HTTPStatus}
_TEXT, _BINARY, _PONG = EventKind.TEXT, EventKind.BINARY, EventKind.PONG
# Module aliases: an Enum member looked up on its class costs ~0.13 us in Python 3.11.
_REFUSED = Phase.REFUSED
_ACCEPT, _REFUSE, _SEND_CLOSE, _END, _RESUME, _HOLD = (
    Trigger.ACCEPT,
    Trigger.REFUSE,
    Trigger.SEND_CLOSE,
    Trigger.END,
    Trigger.RESUME,
    Trigger.HOLD,
)
_EV_OPENED, _EV_REFUSED, _EV_ANSWERED = EventKind.OPENED, EventKind.REFUSED, EventKind.ANSWERED
_EV_PENDING = EventKind.PENDING
_EV_CLOSE_REQUEST, _EV_FAILED = EventKind.CLOSE_REQUEST, EventKind.FAILED
_OP_TEXT, _OP_BINARY, _OP_CONT = Opcode.TEXT, Opcode.BINARY, Opcode.CONT
_OP_CLOSE, _OP_PONG = Opcode.CLOSE, Opcode.PONG
_WS_OPEN, _WS_CONNECTING = State.OPEN, State.CONNECTING
_TEXT_BYTE, _BINARY_BYTE = 0x81, 0x82  # FIN + opcode
_DEFLATED_TEXT, _DEFLATED_BINARY = 0xC1, 0xC2  # FIN + RSV1 (permessage-deflate) + opcode
_U16 = struct.Struct("!H")
_U64 = struct.Struct("!Q")
_LEN16 = struct.Struct("!BBH")
_LEN64 = struct.Struct("!BBQ")
# The bytes a request head may hold for the fast handshake (tab and printable ASCII): it
# leaves any other (controls, anything not ASCII) to websockets.  Checked by deleting these
# with bytes.translate (~0.4 us for a common request; a regex search took ~1 us).
_PLAIN = b"\t" + bytes(range(0x20, 0x7F))
_BARE_LF = re.compile(rb"(?<!\r)\n")  # a line end websockets refuses
_TOKEN = re.compile(rb"[-!#$%&'*+.^_`|~0-9a-zA-Z]+")  # RFC 9110 token, as websockets
# Header names (lowercased) known to be tokens: a set lookup instead of a regex match for
# each header of a common request; any other name is matched against _TOKEN.
_KNOWN_NAMES = frozenset(
    (
        b"host",
        b"upgrade",
        b"connection",
        b"sec-websocket-key",
        b"sec-websocket-version",
        b"sec-websocket-protocol",
        b"sec-websocket-extensions",
        b"origin",
        b"user-agent",
        b"pragma",
        b"cache-control",
        b"accept",
        b"accept-encoding",
        b"accept-language",
        b"cookie",
    )
)
_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
_MAX_LINE = MAX_LINE_LENGTH - 2  # websockets' limit counts the CRLF
_TOO_LARGE = "Request headers too large.\n"
_SMALL_HEADERS = {
    first: [bytes((first, n)) for n in range(126)]
    for first in (_TEXT_BYTE, _BINARY_BYTE, _DEFLATED_TEXT, _DEFLATED_BINARY)
}
_NO_CLOSE = Close(1006, "")
_CLOSE_BYTE = 0x88  # FIN + close
#: The close codes a peer may send (websockets' ``Close.check``); another goes to websockets.
_PEER_CLOSE_CODES = frozenset(EXTERNAL_CLOSE_CODES) | frozenset(range(3000, 5000))
#: The logger websockets gives every server protocol (``websockets.server``), looked up once:
#: ``logging.getLogger`` takes a lock each time it is called.
_WS_LOGGER = logging.getLogger("websockets.server")


def frame_header(first: int, size: int) -> bytes:
    """The header of an unmasked, unfragmented server frame (``first`` = FIN | opcode)."""
    if size < 126:
        return _SMALL_HEADERS[first][size]
    if size < 65536:
        return _LEN16.pack(first, 126, size)
    return _LEN64.pack(first, 127, size)


def _valid_key(key: bytes) -> bool:
    """Sec-WebSocket-Key must be 16 bytes in base64 (RFC 6455 4.2.1)."""
    try:
        # binascii directly: base64.b64decode(validate=True) is this call behind a wrapper.
        return len(key) == 24 and len(binascii.a2b_base64(key, strict_mode=True)) == 16
    except binascii.Error:
        return False


def _tokens(value: bytes) -> list[bytes] | None:
    """A comma-separated token list, or None when it is anything else (websockets decides)."""
    if _TOKEN.fullmatch(value):
        return [value]  # one token (the common ``Connection: Upgrade``): one match, no list
    items = [item.strip() for item in value.split(b",")]
    if all(_TOKEN.fullmatch(item) for item in items):
        return items
    return None


def _early_violation(first: int, second: int) -> str | None:
    """What websockets refuses after a frame's first two bytes (its order), or None."""
    opcode = first & 0x0F
    if opcode > 2 and opcode not in (8, 9, 10):
        return "invalid opcode"
    if not second & 0x80:
        return "incorrect masking"
    return None


def _header_violation(first: int, length: int) -> str | None:
    """What websockets refuses after a frame's payload, known from its header (its order)."""
    if first & 0x70:
        return "reserved bits must be 0"
    if first & 0x08:  # a control frame
        if length > 125:
            return "control frame too long"
        if not first & 0x80:
            return "fragmented control frame"
    return None


def _deflate_header_violation(deflate: PerMessageDeflate, first: int, length: int) -> str | None:
    """`_header_violation` on a connection that negotiated permessage-deflate: RSV1 may mark
    the first frame of a data message, which is a text or binary frame (RFC 7692 6): such a
    frame goes to websockets, which inflates it before it judges RSV2 and RSV3 (so it says
    why, as it would).  On a continuation frame RSV1 is refused at the header, with
    websockets' reason (its inflater's inside a compressed message); on a control frame
    as before."""
    if first & 0x40:
        opcode = first & 0x0F
        if 0 < opcode < 3:
            return None
        if opcode == 0 and deflate.decode_cont_data:
            return "RSV1 bit set in continuation frame"
    return _header_violation(first, length)


def _offered(head: bytes) -> list[str]:
    """The subprotocols a request head offers, in order (every Sec-WebSocket-Protocol line)."""
    offered: list[str] = []
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"sec-websocket-protocol":
            offered += [p.strip().decode("latin-1") for p in value.split(b",") if p.strip()]
    return offered


def _accept_all(_origins: Sequence[str]) -> tuple[HTTPStatus, str] | None:
    return None


def _no_subprotocol(offered: Sequence[str]) -> str | None:
    if offered:
        raise NegotiationError("this server speaks no subprotocol")
    return None


def _response_101(key: bytes, protocol: str) -> bytes:
    """Godot's 101 response: exactly the headers it sends, in its order."""
    accept = binascii.b2a_base64(hashlib.sha1(key + _GUID).digest(), newline=False)
    response = (
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: " + accept
    )
    if protocol:
        response += b"\r\nSec-WebSocket-Protocol: " + protocol.encode()
    return response + b"\r\n\r\n"


class ServerWire:
    """One server connection's bytes, from the upgrade request to the end of the stream.

    Limits and policy, all given here:

    * ``max_message``: the largest message accepted, in bytes, whole or as the sum
      of its fragments; a larger one fails the connection with 1009 (``websockets``'
      ``max_size``).
    * ``max_request_bytes``: the largest upgrade request head (up to its blank
      line); a larger one is answered 431.  ``websockets``' own line and header
      count limits (``MAX_LINE_LENGTH``, ``MAX_NUM_HEADERS``) apply below it.
    * ``select_subprotocol(offered)``: the subprotocol for the client's list ("" or
      None for none); raises ``NegotiationError`` to refuse the request (400).
    * ``admit(origins)``: called for a valid upgrade request, with its Origin
      values, just before it is accepted: None accepts (the caller must then open
      the connection: `EventKind.OPENED` follows at once), ``(status, text)``
      refuses it with that HTTP answer.
    * ``answer_http(path)``: called for a well-formed HTTP request without an
      ``Upgrade`` header, with its path (no query): ``(status, text, headers)``
      is answered (`EventKind.ANSWERED`), None leaves it to websockets' ``426
      Upgrade Required``.
    * ``hold_upgrades``: a valid, admitted upgrade request is not answered at
      once: the wire waits in `Phase.PENDING` (`EventKind.PENDING`) for
      `accept_pending` (101, then `EventKind.OPENED`) or `refuse_pending` (an
      HTTP refusal); bytes that come meanwhile are kept for after the 101.

    permessage-deflate is `DeflateWire`'s; on this class `deflate` stays None
    unless a moved connection brings it (`resume`).
    """

    #: The negotiated permessage-deflate extension (``websockets``' ``PerMessageDeflate``,
    #: which inflates what websockets reads and deflates what `compress` builds); None: none.
    deflate: PerMessageDeflate | None = None
    # The header check of the frames the fast path leaves to websockets (deviation 2); a
    # connection with deflate gets `_deflate_header_violation` (`_use_deflate`).
    _check_header = staticmethod(_header_violation)

    def __init__(
        self,
        *,
        max_message: int = DEFAULT_MAX_MESSAGE,
        max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
        select_subprotocol: Callable[[Sequence[str]], str | None] = _no_subprotocol,
        admit: Callable[[Sequence[str]], tuple[HTTPStatus, str] | None] = _accept_all,
        answer_http: Callable[[str], HttpAnswer | None] | None = None,
        hold_upgrades: bool = False,
    ) -> None:
        self.max_message = max_message
        self.max_request_bytes = max_request_bytes
        self._select_subprotocol = select_subprotocol
        self._admit = admit
        self._answer_http = answer_http
        self._hold = hold_upgrades
        # While PENDING: how to answer (a 101 of ours: the key; websockets': its response),
        # and the subprotocol the server's rule chose.
        self._held: tuple[bytes | None, Any, str] | None = None
        # While PENDING: the request itself, up to its blank line: what a successor replays
        # to wait again in the same state (`snapshot`).
        self._held_request = b""
        self.phase = _HANDSHAKE
        self.subprotocol = ""
        #: The accepted upgrade request's head (request line and headers, without the blank
        #: line), for the application (`take_request_head`); b"" before and after.
        self.request_head = b""
        #: The peer sent the first close frame (Godot's "clean close" for the server).
        self.peer_closed_first = False
        #: Whether `data_to_send` has something (a cheap check for the caller).
        self.wants_write = False
        # websockets' protocol: made when the handshake is decided for a request it parses
        # (CONNECTING); after the fast upgrade only once a frame or a call needs it
        # (`_websockets`): a connection that just opens and closes never builds one.
        self._ws: ServerProtocol | None = None
        # The peer's close, when the fast path answered it (no websockets): for the logs
        # and counters (`close_status`, `close_code`).
        self._fast_close: Close | None = None
        self._out: list[bytes] = []
        self._partial = b""  # the start of an upgrade request, waiting for its end
        # The start of a frame waiting for the rest, and the bytes it needs in all (0: its
        # header is not complete yet). A bytearray: a large frame may come in many reads.
        self._pending = bytearray()
        self._pending_need = 0
        self._ws_left = 0  # bytes of a frame websockets has begun that it has not had yet
        # The bytes websockets has had of that frame: what a successor must be fed again
        # (`snapshot`), since websockets' parser state cannot move. Kept only while a frame
        # of the slow path spans reads.
        self._ws_begun: bytes | bytearray = b""
        self._fragments: list[bytes] = []  # the fragmented message websockets is reading
        # Its bytes so far, kept as a running total: summing the list for every frame made
        # a message of many small fragments quadratic (Autobahn 9.3.1: 65,536 fragments
        # of 64 bytes, 46 s of one shard's loop).
        self._fragments_size = 0
        self._fragments_text = False

    # -- phases ------------------------------------------------------------------------

    def _move(self, trigger: Trigger) -> None:
        """The one place a phase changes; a change not in `TRANSITIONS` is a bug."""
        try:
            self.phase = TRANSITIONS[self.phase, trigger]
        except KeyError:
            raise AssertionError(f"no transition from {self.phase} on {trigger}") from None

    # -- bytes in ------------------------------------------------------------------------

    def receive_data(self, data: bytes) -> list[Event]:
        """Take bytes read from the peer; returns the events they complete, in order.

        Call `data_to_send` afterwards when `wants_write` is set.
        """
        events: list[Event] = []
        if self.phase is not _OPEN:
            if self.phase is _HANDSHAKE:
                self._handshake(data, events)
            elif self.phase is _PENDING:
                self._partial += data  # frames sent before the 101: read after it
            elif self.phase is _CLOSING:
                self._to_websockets(data, events)
            # CLOSED, REFUSED: discarded, as websockets does.
            return events
        if self._pending:
            self._pending += data
            if len(self._pending) < self._pending_need:
                return events  # a large frame still coming: no copy until it is whole
            data = bytes(self._pending)
            self._pending = bytearray()
        size = len(data)
        pos = need = 0
        if self._ws_left:  # the rest of a frame websockets has begun
            pos = min(self._ws_left, size)
            self._ws_left -= pos
            chunk = data[:pos]
            if self._ws_left:
                self._ws_begun += chunk
            else:
                self._ws_begun = b""
            self._to_websockets(chunk, events)
        max_message = self.max_message
        while pos < size:
            if self.phase is not _OPEN:
                break  # CLOSED by the last frame: the rest is discarded, as websockets does
            if size - pos < 2:
                break
            first, second = data[pos], data[pos + 1]
            # A whole masked data frame, perhaps: the fast path.
            fast = (first == 0x82 or first == 0x81) and second & 0x80 and not self._fragments
            if not fast:
                early = _early_violation(first, second)
                if early is not None:
                    self._fail(1002, early, events)  # as websockets, on the same two bytes
                    break
            # The header's length (masked: the early check refused any other frame).
            length = second & 0x7F
            start = pos + 6
            if length == 126:
                if size - pos < 4:
                    break
                length = _U16.unpack_from(data, pos + 2)[0]
                start += 2
            elif length == 127:
                if size - pos < 10:
                    break
                length = _U64.unpack_from(data, pos + 2)[0]
                start += 8
            end = start + length
            if fast and length <= max_message:
                if end > size:
                    need = end - pos
                    break
                payload = apply_mask(data[start:end], data[start - 4 : start])
                if first == 0x81 and not payload.isascii():
                    try:
                        payload.decode()
                    except UnicodeDecodeError:
                        self._fail(1007, "invalid UTF-8 in a text message", events)
                        break
                events.append((_TEXT if first == 0x81 else _BINARY, payload))
                pos = end
                continue
            if (
                first == _CLOSE_BYTE
                and self._ws is None
                and end <= size
                and self._fast_close_frame(data[start:end], data[start - 4 : start], events)
            ):
                break  # CLOSED: the rest is discarded, as websockets does
            # Any other frame: checked on its header, then websockets reads it.
            if length <= max_message - self._fragments_size:
                refusal = self._check_header(first, length)
                if refusal is not None:
                    # websockets would wait for the payload first: fail on the header now.
                    self._fail(1002, refusal, events)
                    break
                if first & 0x0F == 8 and self._fragments:
                    self._close_inside_message()
            # else websockets refuses the length (1009) as soon as it reads it.
            taken = min(end, size)
            self._ws_left = end - taken
            chunk = data[pos:taken]
            if self._ws_left:
                self._ws_begun = bytearray(chunk)
            self._to_websockets(chunk, events)
            pos = taken
        if pos < size and self.phase is _OPEN:
            self._pending = bytearray(data[pos:])
            self._pending_need = need
        return events

    def _fast_close_frame(self, masked: bytes, mask: bytes, events: list[Event]) -> bool:
        """The peer's whole close frame while websockets has seen no frame (the common close
        after the fast upgrade): answered as websockets answers it - the payload echoed,
        the end of stream, CLOSED - without building a ``ServerProtocol``.  False (nothing
        done) for anything websockets must judge: a control frame over 125 bytes, one
        byte of payload or more than ``max_message``, a code a peer may not send, a reason
        that is not UTF-8."""
        length = len(masked)
        if length > 125 or length == 1 or length > self.max_message:
            return False
        if length:
            payload = apply_mask(masked, mask)
            code = (payload[0] << 8) | payload[1]
            if code not in _PEER_CLOSE_CODES:
                return False
            try:
                reason = payload[2:].decode()
            except UnicodeDecodeError:
                return False
            close = Close(code, reason)
        else:
            payload = b""
            close = Close(1005, "")
        self._fast_close = close
        self.peer_closed_first = True
        events.append((_EV_CLOSE_REQUEST, close))
        self._out += [bytes((_CLOSE_BYTE, length)) + payload, b""]
        self.wants_write = True
        self._move(_END)
        return True

    def _websockets(self) -> ServerProtocol:
        """websockets' protocol of an open connection, made on first need."""
        ws = self._ws
        if ws is None:
            ws = self._ws = self._new_ws(_WS_OPEN)
        return ws

    def _close_inside_message(self) -> None:
        """Deviation 1 (Autobahn 7.1.5): a close frame inside a fragmented message.

        RFC 6455 lets control frames come between fragments and wants the close
        echoed; websockets fails with 1002 ("incomplete fragmented message").  The
        unfinished message is dropped, and a fresh ``ServerProtocol`` takes the close
        frame: in the OPEN state the open message and the extensions are the only state
        websockets keeps between frames, and its parser is at a frame boundary here, its
        output already taken.  A permessage-deflate extension moves to the fresh one (a
        close frame is not inflated; the message it was inflating is dropped).
        """
        self._fragments = []
        self._fragments_size = 0
        self._ws = self._new_ws(_WS_OPEN)
        if self.deflate is not None:
            self.deflate.decode_cont_data = False
            self._ws.extensions = [self.deflate]

    def _to_websockets(self, data: bytes, events: list[Event]) -> None:
        """Let websockets parse ``data`` (whole frames, or the rest of a closing stream)."""
        ws = self._websockets()
        ws.receive_data(data)
        for frame in ws.events_received():
            if isinstance(frame, Frame):
                self._frame(frame, events)
                if self.phase is not _OPEN and self.phase is not _CLOSING:
                    break  # a message failed the connection: deliver no more
        self._take_output(events)

    def _frame(self, frame: Frame, events: list[Event]) -> None:
        """One frame websockets parsed (from an OPEN or CLOSING connection)."""
        opcode = frame.opcode
        if opcode is _OP_BINARY or opcode is _OP_TEXT:
            if frame.fin:
                self._message(frame.data, opcode is _OP_TEXT, events)
            else:
                self._fragments = [frame.data]
                self._fragments_size = len(frame.data)
                self._fragments_text = opcode is _OP_TEXT
        elif opcode is _OP_CONT:
            if frame.data:  # empty fragments add nothing (and cannot grow the list)
                self._fragments.append(frame.data)
                self._fragments_size += len(frame.data)
            if frame.fin:
                data = b"".join(self._fragments)
                self._fragments = []
                self._fragments_size = 0
                self._message(data, self._fragments_text, events)
        elif opcode is _OP_CLOSE:
            ws = self._ws
            assert ws is not None
            if ws.close_rcvd_then_sent:  # not the answer to our own close
                self.peer_closed_first = True
                events.append((_EV_CLOSE_REQUEST, ws.close_rcvd or Close(1005, "")))
        elif opcode is _OP_PONG:
            events.append((_PONG, frame.data))

    def _message(self, data: bytes, text: bool, events: list[Event]) -> None:
        if text and not data.isascii():
            try:
                data.decode()
            except UnicodeDecodeError:
                self._fail(1007, "invalid UTF-8 in a text message", events)
                return
        events.append((_TEXT if text else _BINARY, data))

    def _take_output(self, events: list[Event]) -> None:
        """Move websockets' output into ours; its end of stream ends the connection."""
        ws = self._ws
        assert ws is not None
        out = ws.data_to_send()
        if not out:
            return
        self._out += out
        self.wants_write = True
        if out[-1] == b"" and self.phase is not _REFUSED:
            if self.phase is _HANDSHAKE:
                self._move(_REFUSE)
            else:
                closing = self.phase is _CLOSING
                self._move(_END)
                if ws.parser_exc is not None or (ws.close_rcvd is None and not closing):
                    events.append((_EV_FAILED, ws.close_sent or _NO_CLOSE))

    # -- the handshake -------------------------------------------------------------------

    def _new_ws(self, state: State) -> ServerProtocol:
        if state is _WS_OPEN:
            # Past the handshake: no subprotocol to select, so no closure for it (websockets
            # binds one to each protocol), and the logger websockets would look up anyway.
            return ServerProtocol(max_size=self.max_message, state=state, logger=_WS_LOGGER)
        select = self._select_subprotocol
        return ServerProtocol(
            select_subprotocol=lambda _protocol, offered: select(offered) or None,
            max_size=self.max_message,
            state=state,
            logger=_WS_LOGGER,
        )

    def _handshake(self, data: bytes, events: list[Event]) -> None:
        """Answer a plain upgrade request here; hand any other to websockets."""
        request = self._partial + data if self._partial else data
        end = request.find(b"\r\n\r\n")
        limit = self.max_request_bytes
        stop = end if end >= 0 else len(request)
        # Every LF in a CRLF (two counts, ~0.5 us) or else the regex for where the first
        # bare one is (~3 us on every request).
        if request.count(b"\n", 0, stop) == request.count(b"\r\n", 0, stop):
            bare_lf = None
        else:
            bare_lf = _BARE_LF.search(request, 0, stop)
        if bare_lf is not None and bare_lf.start() < limit:
            # A line without CRLF, which websockets refuses at once: let it say so.
            return self._handshake_by_websockets(request, len(request) - 4, events)
        if end < 0:
            if len(request) < limit:
                self._partial = request  # wait for the rest of the request
                return
            return self._refuse(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, _TOO_LARGE, events)
        if end + 4 > limit:
            return self._refuse(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, _TOO_LARGE, events)
        self._partial = b""
        plain = self._plain_request(request[:end])
        if plain is None:
            return self._handshake_by_websockets(request, end, events)
        protocol, origins, key = plain
        refusal = self._admit(origins)
        if refusal is not None:
            return self._refuse(*refusal, events)
        if self._hold:
            self.request_head = request[:end]
            self._partial = request[end + 4 :]
            self._held = (key, None, protocol)
            self._held_request = request[: end + 4]
            self._move(_HOLD)
            events.append((_EV_PENDING, (protocol, _offered(request[:end]))))
            return
        self._out.append(_response_101(key, protocol))
        self.wants_write = True
        self.request_head = request[:end]
        self._opened(protocol, events)
        rest = request[end + 4 :]
        if rest:
            events += self.receive_data(rest)  # frames that came with the request

    def _plain_request(self, head: bytes) -> tuple[str, list[str], bytes] | None:
        """(subprotocol, Origin values, key) of an upgrade request the fast path accepts, or None
        when websockets must judge it (anything unusual, or a refusal: it says why)."""
        if head.replace(b"\r\n", b"").translate(None, _PLAIN):
            return None  # control or non-ASCII bytes
        lines = head.split(b"\r\n")
        if len(lines) > MAX_NUM_HEADERS + 1 or (
            len(head) > _MAX_LINE and max(map(len, lines)) > _MAX_LINE
        ):
            return None  # its limits (414, 431) apply (no line is longer than the head)
        request_line = lines[0].split(b" ")
        if len(request_line) != 3 or request_line[0] != b"GET" or request_line[2] != b"HTTP/1.1":
            return None
        headers: dict[bytes, bytes] = {}
        for line in lines[1:]:
            name, colon, value = line.partition(b":")
            name = name.lower()
            if (
                not colon
                or name in headers
                or (name not in _KNOWN_NAMES and not _TOKEN.fullmatch(name))
            ):
                return None  # odd or repeated: the full rules
            headers[name] = value.strip()
        if b"content-length" in headers or b"transfer-encoding" in headers:
            return None  # a body
        connection = _tokens(headers.get(b"connection", b""))
        if (
            connection is None
            or b"upgrade" not in [token.lower() for token in connection]
            or headers.get(b"upgrade", b"").lower() != b"websocket"
            or headers.get(b"sec-websocket-version") != b"13"
            or not _valid_key(key := headers.get(b"sec-websocket-key", b""))
        ):
            return None
        offered: list[str] = []
        if b"sec-websocket-protocol" in headers:
            tokens = _tokens(headers[b"sec-websocket-protocol"])
            if tokens is None:
                return None  # empty or malformed: its 400
            offered = [token.decode("ascii") for token in tokens]
        try:
            protocol = self._select_subprotocol(offered) or ""
        except NegotiationError:
            return None  # it answers 400 with the reason
        origin = headers.get(b"origin")
        return protocol, [] if origin is None else [origin.decode("latin-1")], key

    def _handshake_by_websockets(self, request: bytes, end: int, events: list[Event]) -> None:
        """Let websockets judge the request (``request[:end]``); frames after it are ours."""
        self._partial = b""
        ws = self._ws = self._new_ws(_WS_CONNECTING)
        ws.receive_data(request[: end + 4])
        parsed = ws.events_received()
        if parsed and isinstance(parsed[0], Request):
            request_event = parsed[0]
            answer = None
            if self._answer_http is not None and "Upgrade" not in request_event.headers:
                answer = self._answer_http(request_event.path.partition("?")[0])
            if answer is not None:
                status, text, headers = answer
                response = ws.reject(status, text)
                for name, value in headers:
                    response.headers[name] = value
                ws.send_response(response)
                self._out += ws.data_to_send()
                self.wants_write = True
                self._move(_REFUSE)  # the stream ends after the answer, as after a refusal
                events.append((_EV_ANSWERED, int(status)))
                return
            response = ws.accept(request_event)
            if response.status_code == 101:
                refusal = self._admit(request_event.headers.get_all("Origin"))
                if refusal is not None:
                    response = ws.reject(*refusal)
            if response.status_code == 101 and self._hold:
                self.request_head = request[:end]
                self._partial = request[end + 4 :]
                protocol = response.headers.get("Sec-WebSocket-Protocol", "")
                self._held = (None, response, protocol)
                self._held_request = request[: end + 4]
                self._move(_HOLD)
                events.append((_EV_PENDING, (protocol, _offered(request[:end]))))
                return
            ws.send_response(response)
            if response.status_code == 101:
                if ws.extensions:
                    self._use_deflate(ws.extensions[0])
                self._take_output(events)
                self.request_head = request[:end]
                self._opened(response.headers.get("Sec-WebSocket-Protocol", ""), events)
                rest = request[end + 4 :]
                if rest:
                    events += self.receive_data(rest)
                return
            status: int | None = response.status_code
        else:  # its HTTP parser refused the request: its answer (if any) is queued
            status = None
        out = ws.data_to_send()
        if status is None and out and out[0].startswith(b"HTTP/1.1 "):
            status = int(out[0][9:12])  # 414 or 431
        self._out += out
        self.wants_write = True
        self._move(_REFUSE)  # websockets ends the stream after any refusal
        events.append((_EV_REFUSED, status))

    def _opened(self, protocol: str, events: list[Event]) -> None:
        self._move(_ACCEPT)
        self.subprotocol = protocol
        events.append((_EV_OPENED, protocol))

    def _refuse(
        self,
        status: int,
        text: str,
        events: list[Event],
        headers: Sequence[tuple[str, str]] = (),
    ) -> None:
        """Answer the upgrade request with an HTTP error (and ``headers``) and end, as
        websockets' ``reject``."""
        body = text.encode()
        extra = "".join(f"{name}: {value}\r\n" for name, value in headers)
        head = (
            f"HTTP/1.1 {int(status)} {_PHRASES.get(status, 'Refused')}\r\nConnection: close\r\n"
            f"{extra}Content-Type: text/plain; charset=utf-8\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        )
        self._partial = b""
        self._out += [head.encode("latin-1") + body, b""]
        self.wants_write = True
        self._move(_REFUSE)
        events.append((_EV_REFUSED, int(status)))

    # -- bytes out -----------------------------------------------------------------------

    # -- moving to another shard (wsfleet reload) -----------------------------------

    def snapshot(self) -> tuple[bytes, bytes | None, bool]:
        """What a successor needs to continue this connection: ``(unparsed, fragments,
        fragments_text)``; see `resume`.

        ``unparsed``: the bytes received that no complete frame took (in the
        handshake: the start of the request; waiting for a verdict: the whole
        request and what came after it, which a fresh wire fed with them turns
        into the same PENDING wait), from a frame boundary on; ``fragments``:
        the fragmented message being received (None outside one).  Only in
        HANDSHAKE, PENDING and OPEN, with nothing left to send (the caller
        hands off only then).
        """
        if self.phase is _HANDSHAKE:
            return self._partial, None, False
        if self.phase is _PENDING:
            return self._held_request + self._partial, None, False
        if self.phase is not _OPEN or self._out:
            raise ValueError(f"a connection in phase {self.phase.value} cannot move")
        unparsed = bytes(self._ws_begun) + bytes(self._pending)
        fragments = b"".join(self._fragments) if self._fragments else None
        return unparsed, fragments, self._fragments_text

    def resume(
        self,
        subprotocol: str,
        fragments: bytes | None,
        fragments_text: bool,
        deflate: tuple[int, int] | None = None,
        compress_settings: Mapping[str, int] | None = None,
    ) -> None:
        """Continue an open connection another shard had (a fresh wire, in HANDSHAKE).

        Feed it the ``unparsed`` bytes of the `snapshot` next, with
        `receive_data`: they start at a frame boundary.  ``deflate``: the
        connection has permessage-deflate without context takeover either way
        (`deflate_parameters`), re-created here with ``compress_settings``.
        """
        self._move(_RESUME)
        self.subprotocol = subprotocol
        self._ws = self._new_ws(_WS_OPEN)
        if deflate is not None:
            remote_bits, local_bits = deflate
            settings = dict(compress_settings or {})
            self._use_deflate(PerMessageDeflate(True, True, remote_bits, local_bits, settings))
        if fragments is not None:
            self._fragments = [fragments]
            self._fragments_size = len(fragments)
            self._fragments_text = fragments_text
            # websockets checks continuation frames against its own running size.
            self._ws.current_size = len(fragments)

    def deflate_parameters(self) -> tuple[int, int] | None:
        """What a successor needs to re-create this connection's permessage-deflate:
        ``(client's window bits, server's window bits)``; None without deflate.

        ValueError when the extension cannot move: it keeps a zlib context
        between messages (context takeover, either way), or a compressed
        message is half received (its inflater holds the message so far).
        """
        deflate = self.deflate
        if deflate is None:
            return None
        if not (deflate.remote_no_context_takeover and deflate.local_no_context_takeover):
            raise ValueError("permessage-deflate with context takeover cannot move")
        if deflate.decode_cont_data:
            raise ValueError("a compressed message is half received")
        return deflate.remote_max_window_bits, deflate.local_max_window_bits

    def _use_deflate(self, extension: Any) -> None:
        """permessage-deflate was negotiated (or moved here): RSV1 may mark a data frame."""
        assert self._ws is not None and isinstance(extension, PerMessageDeflate)
        self.deflate = extension
        self._ws.extensions = [extension]
        # A partial of the extension, not a bound method: no reference cycle through the wire.
        self._check_header = functools.partial(_deflate_header_violation, extension)  # type: ignore[method-assign]

    def compress(self, payload: bytes, text: bool) -> bytes:
        """A whole data frame for ``payload``, deflated (RSV1 set) by the negotiated
        extension (`deflate` must be set).  With context takeover the extension's zlib
        stream goes on from the last message: frames must be sent in the order built."""
        deflate = self.deflate
        assert deflate is not None
        data = deflate.encode(Frame(_OP_TEXT if text else _OP_BINARY, payload)).data
        return frame_header(_DEFLATED_TEXT if text else _DEFLATED_BINARY, len(data)) + data

    def accept_pending(
        self, protocol: str | None = None, headers: Sequence[tuple[str, str]] = ()
    ) -> list[Event]:
        """The application accepts a PENDING upgrade: 101 (with ``protocol`` instead of the
        server's choice when given, and ``headers``); returns OPENED and the events of the
        bytes that came meanwhile (nothing unless PENDING)."""
        if self.phase is not _PENDING or self._held is None:
            return []
        key, response, rule_chose = self._held
        self._held = None
        self._held_request = b""
        events: list[Event] = []
        if response is None:  # our own 101
            chosen = protocol if protocol is not None else rule_chose
            head = _response_101(key, chosen)
            if headers:
                extra = "".join(f"{name}: {value}\r\n" for name, value in headers).encode()
                head = head[:-2] + extra + b"\r\n"
            self._out.append(head)
            self.wants_write = True
        else:  # websockets' 101
            if protocol is not None:
                if "Sec-WebSocket-Protocol" in response.headers:
                    del response.headers["Sec-WebSocket-Protocol"]
                if protocol:
                    response.headers["Sec-WebSocket-Protocol"] = protocol
            for name, value in headers:
                response.headers[name] = value
            chosen = response.headers.get("Sec-WebSocket-Protocol", "")
            assert self._ws is not None
            self._ws.send_response(response)
            if self._ws.extensions:
                self._use_deflate(self._ws.extensions[0])
            self._take_output(events)
        self._opened(chosen, events)
        rest, self._partial = self._partial, b""
        if rest:
            events += self.receive_data(rest)
        return events

    def refuse_pending(
        self, status: int, text: str, headers: Sequence[tuple[str, str]] = ()
    ) -> list[Event]:
        """The application refuses a PENDING upgrade with an HTTP answer; REFUSED."""
        if self.phase is not _PENDING:
            return []
        self._held = None
        self._held_request = b""
        self.request_head = b""
        events: list[Event] = []
        self._refuse(status, text, events, headers)
        return events

    def drop_policy(self) -> None:
        """The connection is gone: let go of the caller's callables.  ``admit`` is usually
        a bound method of the caller, which holds this wire: without this the two would
        wait for the cyclic garbage collector (every connection, a collection every few
        hundred handshakes) instead of going when the caller drops them."""
        self._admit = _accept_all
        self._select_subprotocol = _no_subprotocol
        self._answer_http = None

    def take_request_head(self) -> bytes:
        """The accepted request's head, once (the wire keeps no copy after)."""
        head, self.request_head = self.request_head, b""
        return head

    def data_to_send(self) -> list[bytes]:
        """What to write, in order, since the last call; ``b""``: the end of the stream."""
        out, self._out = self._out, []
        self.wants_write = False
        return out

    def close_status(self) -> tuple[int | None, int | None]:
        """The close codes received from the peer and sent to it (None: no close frame).

        For logs, once the connection is gone: never on the per-message path.
        """
        ws = self._ws
        if ws is None:
            close = self._fast_close
            return (None, None) if close is None else (close.code, close.code)
        received, sent = ws.close_rcvd, ws.close_sent
        return (received.code if received else None), (sent.code if sent else None)

    def send_close(self, code: int, reason: str) -> None:
        """Start the close handshake (OPEN only; otherwise nothing happens)."""
        if self.phase is _OPEN:
            self._websockets().send_close(code, reason)
            self._move(_SEND_CLOSE)
            if self._pending:
                # The start of a frame the fast path held: websockets reads the stream from
                # now on, so it gets it first (only the start of one frame: no event).
                pending, self._pending = bytes(self._pending), bytearray()
                self._ws.receive_data(pending)
            self._take_output([])

    def fail(self, code: int, reason: str) -> None:
        """Fail the connection (RFC 6455 7.1.7): a close frame, then the end of the stream,
        without waiting for the peer (OPEN only; otherwise nothing happens)."""
        if self.phase is _OPEN:
            self._fail(code, reason, [])

    def _fail(self, code: int, reason: str, events: list[Event]) -> None:
        self._websockets().fail(code, reason)
        self._take_output(events)  # the close frame and the end of stream: CLOSED, FAILED

    def close_code(self) -> int:
        """The code the connection ended with (for the counters, once it is gone): the
        peer's if it closed first, else the one sent; 1006 without a close frame."""
        ws = self._ws
        if ws is None:
            close = self._fast_close
            return 1006 if close is None else close.code
        close = ws.close_rcvd if self.peer_closed_first else ws.close_sent or ws.close_rcvd
        return 1006 if close is None else close.code

    def send_ping(self) -> None:
        """Queue the keepalive ping (an empty ping frame); OPEN only."""
        if self.phase is _OPEN:
            self._out.append(PING_FRAME)
            self.wants_write = True


class DeflateWire(ServerWire):
    """A `ServerWire` that negotiates permessage-deflate (RFC 7692) with clients offering it.

    ``extensions``: websockets' ``ServerPerMessageDeflateFactory`` (its parameters are
    the server's).  An upgrade request with ``Sec-WebSocket-Extensions`` goes whole to
    websockets' handshake, which negotiates (or, for a malformed header, refuses with
    400); one without it takes the fast upgrade, as on a `ServerWire`, and its connection
    has no extension.  Once negotiated, a frame with RSV1 (a compressed message) leaves
    the fast path for websockets, which inflates it, checking ``max_message`` against
    the inflated size (whole or fragmented: no zip bombs, 1009); `compress` deflates what
    the server sends.
    """

    def __init__(self, *, extensions: Sequence[ServerExtensionFactory], **options: Any) -> None:
        super().__init__(**options)
        self._extensions = extensions  # the shard's one list, shared by its connections

    def _plain_request(self, head: bytes) -> tuple[str, list[str], bytes] | None:
        # A conservative test (a header value naming it also goes to websockets, which is
        # always right): the fast upgrade answers without extensions.
        if b"sec-websocket-extensions" in head.lower():
            return None
        return super()._plain_request(head)

    def _new_ws(self, state: State) -> ServerProtocol:
        ws = super()._new_ws(state)
        if state is _WS_CONNECTING:
            ws.available_extensions = self._extensions
        return ws
