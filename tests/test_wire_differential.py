"""The shard's wire against websockets, in-process: the same bytes, the same outcome.

Each example is one connection's byte stream from the client: an upgrade
request (valid, varied or broken), then frames (whole and fragmented
messages, control frames, bad opcodes, reserved bits, unmasked frames, bad
UTF-8, bad close codes, frames over the size limit, garbage), sometimes
mutated (bytes flipped, inserted, deleted, the stream cut short), split at
random points into reads.  It goes to a `ServerWire` and to a bare
``websockets`` ``ServerProtocol`` with the same limits and policy (the
reference: it reads the request head, accepts or refuses it with the same
subprotocol rule and admission policy, then reads the frames), and both must
give the same `Outcome`: HTTP status and subprotocol, messages delivered (in
order, type and bytes), close requests reported, pongs sent, the close frame
sent (code and reason), the failure reported, whether the server ended the stream.

Where wsfleet deliberately differs, the reference's outcome goes through a
function that names the deviation (see ``shards/wire.py`` and
``docs/WIRE.md``); no example is skipped:

- `deviation_request_too_large`: a request head over ``max_request_bytes`` gets 431;
- `deviation_head_unfinished`: a request is judged once its head has ended;
- `deviation_utf8`: a text message that is not UTF-8 fails with 1007 (websockets'
  Sans-I/O layer does not check it; its asyncio layer does, on ``recv``);
- `deviation_close_inside_message` (Autobahn 7.1.5): a close frame inside a
  fragmented message is echoed and reported as a close request, not 1002;
- `deviation_header_refusal`: a frame refused by its header alone fails at the
  header, before its payload (websockets waits for the payload).

The 101 response's bytes differ too (Godot's headers, no ``Date``): only its
status and ``Sec-WebSocket-Protocol`` are compared, and its
``Sec-WebSocket-Accept`` is checked against RFC 6455's formula.

Most examples come from a seeded generator (hypothesis draws only the seed: its
own cost per example is ~0.5 ms, the check's ~0.5 ms): 20,000 of them, and
`test_structured_frames` draws 1,500 structured frame lists with hypothesis'
own strategies (which shrink).  ``derandomize``: the same examples every run.
``WSFLEET_MUTATION_RUN`` (set by ``tests/mutate_wire.py``) turns shrinking off.
"""

from __future__ import annotations

import base64
import hashlib
import os
import random
import re
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from http import HTTPStatus

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import Phase as Stage
from hypothesis import strategies as st
from websockets.exceptions import NegotiationError
from websockets.frames import Frame, Opcode, apply_mask
from websockets.http11 import Request
from websockets.protocol import State
from websockets.server import ServerProtocol

from wsfleet.shards.wire import EventKind, Phase, ServerWire

pytestmark = pytest.mark.timeout(120)

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
TEXT, BINARY, CONT, CLOSE, PING, PONG = 1, 2, 0, 8, 9, 10
BAD_ORIGIN = "http://evil.example"
SETTINGS = dict(
    deadline=None,
    derandomize=True,  # the same examples on every run: CI is deterministic
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    # tests/mutate_wire.py wants a verdict, not a shrunk example.
    phases=[Stage.explicit, Stage.generate]
    if os.environ.get("WSFLEET_MUTATION_RUN")
    else [Stage.explicit, Stage.generate, Stage.shrink],
)


@dataclass(frozen=True)
class Config:
    """One server configuration, given alike to the wire and to the reference."""

    max_message: int
    max_request_bytes: int
    protocols: tuple[str, ...]

    def select(self, offered: Sequence[str]) -> str | None:
        """The shard's rule (Godot's): the first of the client's protocols the server lists."""
        if not self.protocols:
            if offered:
                raise NegotiationError("this server speaks no subprotocol")
            return None
        for protocol in offered:
            if protocol in self.protocols:
                return protocol
        raise NegotiationError("no common subprotocol")


CONFIGS = [
    Config(max_message=64, max_request_bytes=600, protocols=()),
    Config(max_message=300, max_request_bytes=2048, protocols=("chat", "godot")),
]


def admit(origins: Sequence[str]) -> tuple[HTTPStatus, str] | None:
    """The admission policy both get: one Origin is refused (403), as ``allowed_origins``."""
    if BAD_ORIGIN in origins:
        return HTTPStatus.FORBIDDEN, "Origin not allowed.\n"
    return None


@dataclass
class Outcome:
    """What a client sees of a connection, and what the server reported of it."""

    status: int | None = None  # the HTTP status answered; None: none (yet)
    subprotocol: str | None = None
    messages: list[tuple[int, bytes]] = field(default_factory=list)
    close_requests: list[tuple[int, str]] = field(default_factory=list)
    pongs: list[bytes] = field(default_factory=list)
    close_sent: tuple[int, str] | None = None  # the server's close frame (1005: empty)
    failed: int | None = None  # the close code of a failure (1006: none sent)
    eof: bool = False  # the server ended the stream


# -- reading what a server wrote --------------------------------------------------------------


def split_response(out: bytes) -> tuple[int | None, dict[bytes, bytes], bytes]:
    """(status, headers, the bytes after the head) of a server's output."""
    if not out.startswith(b"HTTP/1.1 "):
        assert out == b"", f"output without an HTTP response: {out[:80]!r}"
        return None, {}, b""
    end = out.index(b"\r\n\r\n")
    lines = out[:end].split(b"\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers[name.strip().lower()] = value.strip()
    rest = out[end + 4 :]
    status = int(lines[0][9:12])
    if status != 101:
        length = int(headers.get(b"content-length", b"0"))
        assert len(rest) == length, "an HTTP error is its head and body, nothing after"
        rest = b""
    return status, headers, rest


def server_frames(data: bytes) -> list[tuple[int, bytes]]:
    """The server's frames: well-formed, unmasked, whole."""
    frames = []
    while data:
        first, second = data[0], data[1]
        assert first & 0xF0 == 0x80 and second & 0x80 == 0, f"server frame {data[:2]!r}"
        length, start = second & 0x7F, 2
        if length == 126:
            length, start = struct.unpack_from("!H", data, 2)[0], 4
        elif length == 127:
            length, start = struct.unpack_from("!Q", data, 2)[0], 10
        assert len(data) >= start + length, "a server frame cut short"
        frames.append((first & 0x0F, data[start : start + length]))
        data = data[start + length :]
    return frames


def close_of(payload: bytes) -> tuple[int, str]:
    """(code, reason) of a close frame's payload; (1005, "") when it is empty."""
    if not payload:
        return 1005, ""
    return struct.unpack("!H", payload[:2])[0], payload[2:].decode()


def read_output(chunks: list[bytes], outcome: Outcome, request: bytes) -> None:
    """Fill ``outcome`` from what the server wrote (``b""``: its end of stream)."""
    assert b"" not in chunks[:-1] or chunks.index(b"") == len(chunks) - 1, "bytes after EOF"
    outcome.eof = b"" in chunks
    status, headers, rest = split_response(b"".join(chunks))
    outcome.status = status
    if status == 101:
        key = next(
            line.partition(b":")[2].strip()
            for line in request.split(b"\r\n")
            if line.lower().startswith(b"sec-websocket-key:")
        )
        accept = base64.b64encode(hashlib.sha1(key + GUID).digest())
        assert headers[b"sec-websocket-accept"] == accept
        outcome.subprotocol = headers.get(b"sec-websocket-protocol", b"").decode()
    for opcode, payload in server_frames(rest):
        if opcode == PONG:
            outcome.pongs.append(payload)
        elif opcode == CLOSE and outcome.close_sent is None:
            outcome.close_sent = close_of(payload)
        else:
            assert opcode == CLOSE, "the server sends no data frame of its own here"


# -- the two servers ---------------------------------------------------------------------------


def run_wire(config: Config, chunks: list[bytes]) -> tuple[Outcome, ServerWire]:
    wire = ServerWire(
        max_message=config.max_message,
        max_request_bytes=config.max_request_bytes,
        select_subprotocol=config.select,
        admit=admit,
    )
    outcome, out, opened, refused = Outcome(), [], None, None
    for chunk in chunks:
        for kind, value in wire.receive_data(chunk):
            assert outcome.failed is None, f"an event after the failure: {kind}"
            if kind is EventKind.TEXT:
                outcome.messages.append((TEXT, value))
            elif kind is EventKind.BINARY:
                outcome.messages.append((BINARY, value))
            elif kind is EventKind.CLOSE_REQUEST:
                outcome.close_requests.append((value.code, value.reason))
            elif kind is EventKind.FAILED:
                outcome.failed = value.code
            elif kind is EventKind.OPENED:
                opened = value
            elif kind is EventKind.REFUSED:
                refused = value
        out += wire.data_to_send()
        assert not wire.wants_write
    read_output(out, outcome, b"".join(chunks))
    # The events tell the caller what the bytes tell the client.
    if outcome.status == 101:
        assert opened == outcome.subprotocol and refused is None
        assert wire.phase is not Phase.HANDSHAKE and wire.phase is not Phase.REFUSED
    elif outcome.eof and opened is None:
        assert refused == outcome.status and wire.phase is Phase.REFUSED
    else:
        assert opened is refused is None and wire.phase is Phase.HANDSHAKE
    if wire.phase is Phase.CLOSED:
        assert outcome.eof
    return outcome, wire


def head_end(stream: bytes) -> int:
    end = stream.find(b"\r\n\r\n")
    return -1 if end < 0 else end + 4


def reference_upgrade(
    ws: ServerProtocol, stream: bytes, admit: Callable[[Sequence[str]], object]
) -> tuple[int, list[bytes]]:
    """websockets' side of the upgrade in ``stream`` (the server's ``admit`` rule applied
    to a request it accepts): (where the head ends, or -1; what it sent so far)."""
    end = head_end(stream)
    ws.receive_data(stream if end < 0 else stream[:end])
    out = ws.data_to_send()
    parsed = ws.events_received()
    if parsed:
        request = parsed[0]
        assert isinstance(request, Request)
        response = ws.accept(request)
        if response.status_code == 101:
            refusal = admit(request.headers.get_all("Origin"))
            if refusal is not None:
                response = ws.reject(*refusal)
        ws.send_response(response)
        out += ws.data_to_send()
    return end, out


def run_websockets(config: Config, stream: bytes) -> Outcome:
    """The reference: websockets' ServerProtocol reads the head, is asked to accept it (with
    the same policy), then reads the frames; then the named deviations apply."""
    if deviation_request_too_large(config, stream):
        return Outcome(status=431, eof=True)
    if deviation_head_unfinished(config, stream):
        return Outcome()
    ws = ServerProtocol(
        select_subprotocol=lambda _protocol, offered: config.select(offered),
        max_size=config.max_message,
    )
    end, out = reference_upgrade(ws, stream, admit)
    outcome = Outcome()
    if ws.state is not State.OPEN:
        read_output(out, outcome, stream)
        return outcome
    frames_bytes = stream[end:]
    ws.receive_data(frames_bytes)
    out += ws.data_to_send()
    done, parts = reference_frames(ws, out, outcome, stream)
    if done is not None:
        return done
    if ws.parser_exc is not None:
        outcome.failed = ws.close_sent.code if ws.close_sent else 1006
        if str(ws.parser_exc) == "incomplete fragmented message":
            return deviation_close_inside_message(outcome, ws)
    elif ws.state is State.OPEN:
        return deviation_header_refusal(outcome, config, frames_bytes, parts)
    return outcome


def reference_frames(
    ws: ServerProtocol, out: list[bytes], outcome: Outcome, stream: bytes
) -> tuple[Outcome | None, list[bytes] | None]:
    """What websockets sent (``out``) and the frames it parsed, into ``outcome``: pongs,
    the close it sent, close requests, whole messages.  Returns (the outcome at once if a
    deviation ends it there, else None; the fragments of a message left open)."""
    read_output(out, outcome, stream)
    frames = [frame for frame in ws.events_received() if isinstance(frame, Frame)]
    outcome.pongs = []  # derived from the pings below, so a deviation can cut them short
    outcome.close_sent = None
    close_frames = [close_of(p) for op, p in server_frames(split_response(b"".join(out))[2])
                    if op == CLOSE]  # fmt: skip
    if close_frames:
        outcome.close_sent = close_frames[0]
    parts: list[bytes] | None = None
    kind = TEXT
    for frame in frames:
        if frame.opcode is Opcode.PING:
            outcome.pongs.append(frame.data)
        elif frame.opcode is Opcode.CLOSE:
            if ws.close_rcvd_then_sent:
                assert ws.close_rcvd is not None
                outcome.close_requests.append((ws.close_rcvd.code, ws.close_rcvd.reason))
        elif frame.opcode is Opcode.CONT:
            assert parts is not None
            parts.append(frame.data)
        elif frame.opcode is Opcode.TEXT or frame.opcode is Opcode.BINARY:
            parts, kind = [frame.data], frame.opcode.value
        if frame.opcode.value in (TEXT, BINARY, CONT) and frame.fin:
            assert parts is not None
            message, parts = b"".join(parts), None
            if kind == TEXT and not is_utf8(message):
                return deviation_utf8(outcome), parts
            outcome.messages.append((kind, message))
    return None, parts


def is_utf8(data: bytes) -> bool:
    try:
        data.decode()
        return True
    except UnicodeDecodeError:
        return False


# -- the deviations: websockets' outcome -> wsfleet's ----------------------------------------


def deviation_request_too_large(config: Config, stream: bytes) -> bool:
    """wsfleet answers 431 to a request whose head passes ``max_request_bytes`` (or that
    reaches it without ending), before any parser reads it; websockets' only limits are
    its line length and header count.  A line ending in a bare LF within the limit is
    websockets' to refuse (at once: no valid head has one)."""
    limit = config.max_request_bytes
    end = stream.find(b"\r\n\r\n")
    if 0 <= first_bare_lf(stream) < limit:
        return False
    if end >= 0:
        return end + 4 > limit
    return len(stream) >= limit


def first_bare_lf(stream: bytes) -> int:
    """Where the first line ending in a bare LF ends, in the request head (-1: none)."""
    end = stream.find(b"\r\n\r\n")
    bare_lf = re.compile(rb"(?<!\r)\n").search(stream, 0, end if end >= 0 else len(stream))
    return -1 if bare_lf is None else bare_lf.start()


def deviation_head_unfinished(config: Config, stream: bytes) -> bool:
    """wsfleet judges a request once its head has ended (or passed the limit, or has a
    bare LF); websockets reads it line by line, so it may refuse a broken line before
    the head ends.  A head that never ends gets no answer from wsfleet: the shard's
    handshake timeout ends the connection."""
    bare_lf = first_bare_lf(stream)
    return head_end(stream) < 0 and not 0 <= bare_lf < config.max_request_bytes


def deviation_utf8(outcome: Outcome) -> Outcome:
    """At the first text message that is not UTF-8, wsfleet fails the connection with 1007
    (RFC 6455 8.1) and reads no further; websockets' Sans-I/O layer delivers it."""
    reason = "invalid UTF-8 in a text message"
    return replace(outcome, close_sent=(1007, reason), failed=1007, eof=True)


def deviation_close_inside_message(outcome: Outcome, ws: ServerProtocol) -> Outcome:
    """Autobahn 7.1.5: a close frame (valid) inside a fragmented message.  websockets fails
    with 1002 ("incomplete fragmented message"); RFC 6455 lets control frames interleave
    with fragments, so wsfleet drops the unfinished message, echoes the close and reports
    the client's close request, as for any close."""
    close = ws.close_rcvd
    assert close is not None
    return replace(
        outcome,
        close_sent=(close.code, close.reason),
        failed=None,
        close_requests=[*outcome.close_requests, (close.code, close.reason)],
        eof=True,
    )


def deviation_header_refusal(
    outcome: Outcome, config: Config, stream: bytes, parts: list[bytes] | None
) -> Outcome:
    """A frame whose header alone breaks RFC 6455 (reserved bits, a control frame over 125
    bytes or without FIN) fails the connection with 1002 as soon as its header is in;
    websockets reads the payload first (up to ``max_message`` bytes), so a stream cut
    inside such a frame leaves it open."""
    pos = 0
    while pos + 2 <= len(stream):  # to the frame the stream ends in
        second = stream[pos + 1]
        length, start = second & 0x7F, pos + 2
        if length >= 126:
            size = 2 if length == 126 else 8
            if len(stream) < start + size:
                return outcome  # its header is not complete
            length = int.from_bytes(stream[start : start + size])
            start += size
        end = start + 4 + length  # websockets is open here: every frame was masked
        if end <= len(stream):
            pos = end
            continue
        first = stream[pos]
        fast = first in (0x81, 0x82) and parts is None
        within = length <= config.max_message - sum(map(len, parts or []))
        if first & 0x70:
            reason = "reserved bits must be 0"
        elif first & 0x08 and length > 125:
            reason = "control frame too long"
        elif first & 0x08 and not first & 0x80:
            reason = "fragmented control frame"
        else:
            return outcome
        if not fast and within:
            return replace(outcome, close_sent=(1002, reason), failed=1002, eof=True)
        return outcome
    return outcome


# -- a seeded generator of streams ---------------------------------------------------------------

UTF8_PIECES = ["€".encode()[:2], "€".encode()[2:], "😀".encode()[:3], b"\xff", b"\xc0\x80",
               b"\xed\xa0\x80", "ok ✓".encode(), b"plain"]  # fmt: skip
CLOSE_CODES = [1000, 1001, 1002, 1003, 1004, 1005, 1006, 1007, 1011, 1012, 1015, 1016, 2999,
               3000, 4999, 5000, 0, 999, 65535]  # fmt: skip
PROTOCOL_OFFERS = ["chat", "godot", "chat, godot", "godot, chat", "x", "", "chat,", ", chat",
                   "a b", "chat, x y", "x, godot", "chat;q=1", "CHAT"]  # fmt: skip


def encode(first: int, payload: bytes, mask: bytes | None, form: str = "minimal") -> bytes:
    """A client frame: ``first`` byte as given, the length in ``form``, masked unless None."""
    n, bit = len(payload), 0 if mask is None else 0x80
    if form == "64-bit":
        head = struct.pack("!BBQ", first, bit | 127, n)
    elif form == "16-bit" or n > 125:
        head = struct.pack("!BBH", first, bit | 126, n)
    else:
        head = bytes((first, bit | n))
    return head + payload if mask is None else head + mask + apply_mask(payload, mask)


def payload_of(rng: random.Random, config: Config) -> bytes:
    roll = rng.random()
    if roll < 0.35:
        return "".join(rng.choice("aé✓😀 z") for _ in range(rng.randrange(12))).encode()
    if roll < 0.6:
        return rng.randbytes(rng.randrange(20))
    if roll < 0.8:
        return b"".join(rng.choice(UTF8_PIECES) for _ in range(rng.randrange(4)))
    if roll < 0.95:
        return b"x" * (config.max_message + rng.randrange(-3, 3))  # the size limit
    return b"y" * rng.randrange(126, 140)  # a 16-bit length


def mask_of(rng: random.Random) -> bytes | None:
    return None if rng.random() < 0.04 else rng.randbytes(4)


def message(rng: random.Random, config: Config) -> bytes:
    """A message as a client may send it: whole, or in fragments with control frames
    between them (RFC 6455 5.4), sometimes a close among them (Autobahn 7.1.5)."""
    opcode = rng.choice([TEXT, BINARY])
    payload = payload_of(rng, config)
    cuts = sorted(rng.randrange(len(payload) + 1) for _ in range(rng.choice([0, 0, 1, 2, 3])))
    pieces = [payload[a:b] for a, b in zip([0, *cuts], [*cuts, len(payload)], strict=True)]
    out = b""
    for i, piece in enumerate(pieces):
        if i:
            roll = rng.random()
            if roll < 0.3:
                out += encode(0x80 | rng.choice([PING, PONG]), rng.randbytes(rng.randrange(9)),
                              rng.randbytes(4))  # fmt: skip
            elif roll < 0.36:
                out += close_frame(rng)
        first = (0x80 if i == len(pieces) - 1 else 0) | (CONT if i else opcode)
        out += encode(first, piece, rng.randbytes(4), rng.choice(["minimal"] * 8 + ["16-bit"]))
    return out


def close_frame(rng: random.Random) -> bytes:
    code = rng.choice(CLOSE_CODES)
    reason = rng.choice([b"", b"bye", b"\xff", "✓".encode(), b"x" * 124])
    payload = rng.choice([struct.pack("!H", code) + reason] * 4 + [b"", b"\x03"])
    return encode(0x88, payload[:125] if rng.random() < 0.9 else payload, mask_of(rng))


def odd_frame(rng: random.Random, config: Config) -> bytes:
    """Any one frame: every opcode, FIN or not, reserved bits, unmasked, any length form."""
    kind = rng.choice(["data", "data", "ping", "pong", "close", "opcode", "garbage"])
    if kind == "close":
        return close_frame(rng)
    if kind == "garbage":
        return rng.randbytes(rng.randrange(1, 12))
    payload = (
        rng.randbytes(rng.randrange(130)) if kind in ("ping", "pong") else payload_of(rng, config)
    )
    opcode = {"ping": PING, "pong": PONG}.get(kind)
    if opcode is None:
        opcode = rng.choice([TEXT, BINARY, CONT]) if kind == "data" else rng.randrange(16)
    fin = rng.random() < (0.5 if kind == "data" else 0.85)
    rsv = rng.choice([0] * 6 + [0x10, 0x20, 0x40])
    form = rng.choice(["minimal"] * 6 + ["16-bit", "64-bit"])
    return encode((0x80 if fin else 0) | rsv | opcode, payload, mask_of(rng), form)


def frames(rng: random.Random, config: Config) -> bytes:
    parts = [
        message(rng, config) if rng.random() < 0.8 else odd_frame(rng, config)
        for _ in range(rng.randrange(1, 7))
    ]
    if rng.random() < 0.3:
        parts.append(close_frame(rng))
        if rng.random() < 0.5:
            parts.append(message(rng, config))  # after the close: discarded
    return b"".join(parts)


def request(rng: random.Random, config: Config) -> bytes:
    """An upgrade request: mostly valid, often varied, sometimes broken."""
    key = base64.b64encode(rng.randbytes(16))
    if rng.random() < 0.05:
        key = rng.choice([key[:-2], key + b"A", base64.b64encode(rng.randbytes(15)), b""])
    headers = [
        [b"Host", b"127.0.0.1"],
        [b"Upgrade", b"websocket"],
        [b"Connection", b"Upgrade"],
        [b"Sec-WebSocket-Key", key],
        [b"Sec-WebSocket-Version", b"13"],
    ]
    if config.protocols or rng.random() < 0.1:
        offers = PROTOCOL_OFFERS[:4] if rng.random() < 0.7 else PROTOCOL_OFFERS
        headers.append([b"Sec-WebSocket-Protocol", rng.choice(offers).encode()])
    variations = [
        lambda: headers.append([b"Origin", rng.choice([b"http://ok", BAD_ORIGIN.encode()])]),
        lambda: headers.append([b"Origin", b"http://ok"]) or headers.append([b"Origin", b"x"]),
        lambda: headers[2].__setitem__(
            1,
            rng.choice(
                [
                    b"keep-alive, Upgrade",
                    b"upgrade",
                    b"Upgrade, ,",
                    b"close",
                    b"Upgrade, a b",
                    b"",
                    b"Upgrade,keep-alive",
                ]
            ),
        ),  # fmt: skip
        lambda: headers[1].__setitem__(
            1, rng.choice([b"WebSocket", b"websocket, h2c", b"websocket/13", b"", b"h2c"])
        ),  # fmt: skip
        lambda: headers[4].__setitem__(1, rng.choice([b"8", b"13, 8", b" 13", b"13 "])),
        lambda: headers.append(
            [
                rng.choice(
                    [
                        b"X-Foo",
                        b"Bad Name",
                        b"X@",
                        b"",
                        b" X-Lead",
                        b"X-Trail ",
                        b"Content-Length",
                        b"Transfer-Encoding",
                        b"Sec-WebSocket-Extensions",
                    ]
                ),
                rng.choice(
                    [
                        b"bar",
                        b"0",
                        b"5",
                        b"chunked",
                        b"permessage-deflate",
                        b"a\tb",
                        b"caf\xe9",
                        b"x  ",
                    ]
                ),
            ]
        ),  # fmt: skip
        lambda: headers.append(list(rng.choice(headers))),  # a header twice
        lambda: rng.shuffle(headers),
        lambda: headers.append([b"X-Big", b"b" * rng.randrange(config.max_request_bytes)]),
        lambda: headers.__setitem__(
            rng.randrange(len(headers)),
            [headers[0][0].lower() if rng.random() < 0.5 else headers[0][0].upper(), headers[0][1]],
        ),  # fmt: skip
    ]
    for _ in range(rng.choice([0, 0, 0, 1, 1, 2, 3])):
        rng.choice(variations)()
    line = b"GET /chat HTTP/1.1"
    if rng.random() < 0.05:
        line = rng.choice([b"POST /chat HTTP/1.1", b"GET /chat HTTP/1.0", b"GET /chat",
                           b"GET /caf\xc3\xa9 HTTP/1.1", b"GET  /chat HTTP/1.1",
                           b"get / HTTP/1.1"])  # fmt: skip
    eol = b"\r\n" if rng.random() < 0.97 else b"\n"
    return eol.join([line, *(name + b": " + value for name, value in headers)]) + eol + eol


def mutate(rng: random.Random, data: bytes, start: int = 0) -> bytes:
    """Flip, insert or delete a byte at or after ``start``, or cut the stream short."""
    for _ in range(rng.choice([1, 1, 1, 2, 3])):
        if len(data) <= start:
            break
        i = rng.randrange(start, len(data))
        how = rng.choice(["flip", "flip", "insert", "delete", "truncate"])
        if how == "flip":
            data = data[:i] + bytes((data[i] ^ (1 << rng.randrange(8)),)) + data[i + 1 :]
        elif how == "insert":
            data = data[:i] + bytes((rng.randrange(256),)) + data[i:]
        elif how == "delete":
            data = data[:i] + data[i + 1 :]
        else:
            data = data[:i]
    return data


def stream_of(rng: random.Random, config: Config) -> bytes:
    head = request(rng, config)
    body = frames(rng, config)
    roll = rng.random()
    if roll < 0.25:
        return head + mutate(rng, body)  # mutated frames after a good handshake
    if roll < 0.32:
        return mutate(rng, head + body)  # anywhere, the request too
    return head + body


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    """``data`` in reads cut at ``cuts`` (taken modulo its length)."""
    points = sorted({c % len(data) for c in cuts if data} - {0})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)] or [b""]


def check(config: Config, stream: bytes, cuts: list[int]) -> None:
    chunks = split(stream, cuts)
    got, _wire = run_wire(config, chunks)
    expected = run_websockets(config, stream)
    assert got == expected, f"\nstream={stream!r}\nchunks={[len(c) for c in chunks]}"


def random_cuts(rng: random.Random, most: int) -> list[int]:
    return [rng.randrange(1 << 16) for _ in range(rng.randrange(most + 1))]


@pytest.mark.parametrize("config", CONFIGS, ids=["no-subprotocol", "chat-godot"])
@settings(max_examples=9_000, **SETTINGS)
@given(seed=st.integers(0, 2**64))
def test_seeded_streams(config: Config, seed: int) -> None:
    """Random and mutated streams, split at random points: 2 x 9,000 examples."""
    rng = random.Random(seed)
    check(config, stream_of(rng, config), random_cuts(rng, 6))


@settings(max_examples=2_000, **SETTINGS)
@given(seed=st.integers(0, 2**64))
def test_seeded_streams_in_small_reads(seed: int) -> None:
    """The same, split into many reads (frames and headers cut anywhere)."""
    config = CONFIGS[1]
    rng = random.Random(seed)
    check(config, request(rng, config) + frames(rng, config), random_cuts(rng, 40))


# -- structured frames, drawn (and shrunk) by hypothesis ------------------------------------------

FIRST_BYTES = st.sampled_from([0x81, 0x82, 0x01, 0x02, 0x80, 0x00, 0x88, 0x89, 0x8A, 0x09,
                               0xC1, 0xA2, 0x91, 0x83, 0x8B, 0x8F])  # fmt: skip
FRAME = st.tuples(
    FIRST_BYTES,
    st.one_of(st.binary(max_size=8), st.sampled_from([b"\xff", "✓".encode()[:2], b"\x03\xe8",
              b"\x03\xe8bye", b"\x03\xf3"]), st.integers(120, 130).map(lambda n: b"z" * n)),
    st.booleans(),  # masked (mostly)
    st.sampled_from(["minimal", "minimal", "16-bit", "64-bit"]),
)  # fmt: skip


@settings(max_examples=1_500, **SETTINGS)
@given(
    frames=st.lists(FRAME, min_size=1, max_size=6),
    cuts=st.lists(st.integers(0, 1 << 16), max_size=6),
    truncate=st.integers(0, 8),
)
def test_structured_frames(
    frames: list[tuple[int, bytes, bool, str]], cuts: list[int], truncate: int
) -> None:
    config = CONFIGS[1]
    key = base64.b64encode(bytes(16))
    head = (
        b"GET / HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: " + key + b"\r\nSec-WebSocket-Version: 13\r\n"
        b"Sec-WebSocket-Protocol: godot\r\n\r\n"
    )
    body = b"".join(
        encode(first, payload, b"\x01\x02\x03\x04" if masked else None, form)
        for first, payload, masked, form in frames
    )
    check(config, head + body[: len(body) - truncate], cuts)


# -- named cases -------------------------------------------------------------------------------

KEY = base64.b64encode(b"0123456789abcdef")
PLAIN = (
    b"GET / HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: " + KEY + b"\r\nSec-WebSocket-Version: 13\r\n\r\n"
)
M = b"\x00\x00\x00\x00"  # a zero mask: the payload as is


def test_autobahn_7_1_5_close_inside_a_fragmented_message_is_a_clean_close() -> None:
    stream = PLAIN + encode(0x01, b"fragment1", M) + encode(0x88, b"\x03\xe8", M)
    stream += encode(0x80, b"fragment2", M)
    got, wire = run_wire(CONFIGS[0], split(stream, []))
    assert got == Outcome(status=101, subprotocol="", close_requests=[(1000, "")],
                          close_sent=(1000, ""), eof=True)  # fmt: skip
    assert wire.phase is Phase.CLOSED and wire.peer_closed_first
    # websockets itself answers 1002; the deviation maps that to the outcome above.
    assert run_websockets(CONFIGS[0], stream) == got


def test_a_close_frame_refused_by_its_code_inside_a_message_is_still_1002() -> None:
    stream = PLAIN + encode(0x01, b"part", M) + encode(0x88, b"\x03\xe7", M)  # code 999
    got, _ = run_wire(CONFIGS[0], split(stream, []))
    assert (got.close_sent, got.failed, got.close_requests) == (
        (1002, "invalid status code"),
        1002,
        [],
    )


def test_header_refusal_comes_before_the_payload() -> None:
    stream = PLAIN + encode(0xC2, b"abcdefgh", M)[:6]  # RSV1 set, payload not yet sent
    got, _ = run_wire(CONFIGS[0], split(stream, []))
    assert (got.close_sent, got.failed, got.eof) == ((1002, "reserved bits must be 0"), 1002, True)
    assert run_websockets(CONFIGS[0], stream) == got


def test_invalid_utf8_fails_with_1007_and_nothing_after_it_is_read() -> None:
    stream = PLAIN + encode(0x81, b"\xff", M) + encode(0x82, b"later", M)
    got, _ = run_wire(CONFIGS[0], split(stream, [len(PLAIN) + 3]))
    assert (got.messages, got.close_sent[0], got.failed) == ([], 1007, 1007)  # type: ignore[index]


def test_a_request_over_max_request_bytes_gets_431() -> None:
    config = CONFIGS[0]
    big = PLAIN[:-2] + b"X-Big: " + b"b" * config.max_request_bytes + b"\r\n\r\n"
    got, wire = run_wire(config, split(big, [100, 300]))
    assert (got.status, got.eof, wire.phase) == (431, True, Phase.REFUSED)


def test_the_fast_101_is_godots() -> None:
    wire = ServerWire(select_subprotocol=lambda offered: "godot" if "godot" in offered else None)
    events = wire.receive_data(PLAIN[:-2] + b"Sec-WebSocket-Protocol: x, godot\r\n\r\n")
    assert events == [(EventKind.OPENED, "godot")]
    accept = base64.b64encode(hashlib.sha1(KEY + GUID).digest())
    assert wire.data_to_send() == [
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: " + accept + b"\r\nSec-WebSocket-Protocol: godot\r\n\r\n"
    ]
