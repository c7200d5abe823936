"""`DeflateWire` against websockets with the same permessage-deflate factory: the same bytes,
the same outcome (``tests/test_wire_differential.py``'s method and helpers).

Each example: an upgrade request offering permessage-deflate (with parameters
websockets accepts, declines or refuses) or not, then messages compressed (a fresh
zlib stream each, RSV1 on the first frame; sometimes with a 32 KiB window the
server did not allow, or RSV1 where it must not be), plain ones, fragments,
control frames between them, texts that inflate to bad UTF-8 and messages that
inflate past ``max_message`` (zeros: a small zip bomb), sometimes mutated and split
at random points.  The reference is a bare ``ServerProtocol`` with the same
extension factory; the named deviations are wsfleet's (`deviation_utf8`,
`deviation_close_inside_message`, and the header refusal, where RSV1 on a data
message's first frame is no violation once the extension is negotiated).
"""

from __future__ import annotations

import random
import struct
import zlib
from dataclasses import dataclass, replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from websockets.exceptions import NegotiationError
from websockets.extensions.permessage_deflate import ServerPerMessageDeflateFactory
from websockets.protocol import State
from websockets.server import ServerProtocol

from wsfleet.shards.wire import DeflateWire, EventKind, Phase

from .test_wire_differential import (
    BINARY,
    PING,
    SETTINGS,
    TEXT,
    Outcome,
    admit,
    deviation_close_inside_message,
    deviation_head_unfinished,
    deviation_request_too_large,
    encode,
    head_end,
    mutate,
    random_cuts,
    read_output,
    reference_frames,
    reference_upgrade,
    split,
    split_response,
)

pytestmark = pytest.mark.timeout(120)


@dataclass(frozen=True)
class Config:
    max_message: int
    takeover: bool
    max_request_bytes: int = 2048

    def factory(self) -> ServerPerMessageDeflateFactory:
        return ServerPerMessageDeflateFactory(
            server_no_context_takeover=not self.takeover,
            client_no_context_takeover=not self.takeover,
            server_max_window_bits=12,
            client_max_window_bits=12,
            compress_settings={"memLevel": 5},
        )

    @staticmethod
    def select(offered: object) -> str | None:
        if offered:
            raise NegotiationError("this server speaks no subprotocol")
        return None


CONFIGS = [Config(max_message=300, takeover=True), Config(max_message=5000, takeover=False)]


def run_wire(config: Config, chunks: list[bytes]) -> Outcome:
    wire = DeflateWire(
        extensions=[config.factory()],
        max_message=config.max_message,
        max_request_bytes=config.max_request_bytes,
        select_subprotocol=config.select,
        admit=admit,
    )
    outcome, out = Outcome(), []
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
        out += wire.data_to_send()
    read_output(out, outcome, b"".join(chunks))
    if wire.phase is Phase.CLOSED:
        assert outcome.eof
    negotiated = b"permessage-deflate" in split_response(b"".join(out))[1].get(
        b"sec-websocket-extensions", b""
    )
    assert (wire.deflate is not None) == negotiated
    return outcome


def run_websockets(config: Config, stream: bytes) -> Outcome:
    """As tests/test_wire_differential.py's reference, with the extension factory."""
    if deviation_request_too_large(config, stream):  # type: ignore[arg-type]
        return Outcome(status=431, eof=True)
    if deviation_head_unfinished(config, stream):  # type: ignore[arg-type]
        return Outcome()
    ws = ServerProtocol(
        extensions=[config.factory()],
        select_subprotocol=lambda _protocol, offered: config.select(offered),
        max_size=config.max_message,
    )
    end, out = reference_upgrade(ws, stream, admit)
    outcome = Outcome()
    if ws.state is not State.OPEN:
        read_output(out, outcome, stream)
        return outcome
    negotiated = bool(ws.extensions)
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
        inflating = negotiated and ws.extensions[0].decode_cont_data  # type: ignore[attr-defined]
        return deviation_header_refusal(outcome, config, frames_bytes, parts, negotiated, inflating)
    return outcome


def deviation_header_refusal(
    outcome: Outcome,
    config: Config,
    stream: bytes,
    parts: list[bytes] | None,
    negotiated: bool,
    inflating: bool,
) -> Outcome:
    """tests/test_wire_differential.py's deviation, where RSV1 on a text or binary frame is
    no violation once permessage-deflate is negotiated (RFC 7692 6: websockets inflates
    it, then judges its other bits, as for a whole frame), and RSV1 on a continuation
    frame of a compressed message is refused with the inflater's reason."""
    pos = 0
    while pos + 2 <= len(stream):
        second = stream[pos + 1]
        length, start = second & 0x7F, pos + 2
        if length >= 126:
            size = 2 if length == 126 else 8
            if len(stream) < start + size:
                return outcome
            length = int.from_bytes(stream[start : start + size])
            start += size
        end = start + 4 + length
        if end <= len(stream):
            pos = end
            continue
        first = stream[pos]
        fast = first in (0x81, 0x82) and parts is None
        within = length <= config.max_message - sum(map(len, parts or []))
        reserved = first & 0x70
        if negotiated and first & 0x40 and 0 < first & 0x0F < 3:
            return outcome  # websockets' verdict, after the payload
        if inflating and first & 0x40 and first & 0x0F == 0:
            reason = "RSV1 bit set in continuation frame"
        elif reserved:
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


# -- a seeded generator ------------------------------------------------------------------------

OFFERS = [
    b"permessage-deflate",
    b"permessage-deflate; client_max_window_bits",
    b"permessage-deflate; server_no_context_takeover; client_no_context_takeover",
    b"permessage-deflate; server_max_window_bits=10",
    b"permessage-deflate; client_max_window_bits=9",
    b"permessage-deflate; server_max_window_bits=8",  # websockets declines it
    b"permessage-deflate; bogus",  # declined: unknown parameter
    b"x-webkit-deflate-frame, permessage-deflate",
    b"permessage-deflate;;",  # malformed: 400
    b"PERMESSAGE-DEFLATE",
]


def request(rng: random.Random) -> bytes:
    lines = [b"GET /chat HTTP/1.1", b"Host: h", b"Upgrade: websocket", b"Connection: Upgrade",
             b"Sec-WebSocket-Key: " + b"dGhlIHNhbXBsZSBub25jZQ==",
             b"Sec-WebSocket-Version: 13"]  # fmt: skip
    roll = rng.random()
    if roll < 0.75:
        lines.append(b"Sec-WebSocket-Extensions: " + rng.choice(OFFERS[:5]))
    elif roll < 0.9:
        lines.append(b"Sec-WebSocket-Extensions: " + rng.choice(OFFERS))
    if rng.random() < 0.05:
        lines.append(b"sec-websocket-extensions: permessage-deflate")  # a second header
    return b"\r\n".join(lines) + b"\r\n\r\n"


def deflate(data: bytes, rng: random.Random) -> bytes:
    bits = 9 if rng.random() < 0.9 else 15  # 15: more than any server allows
    deflater = zlib.compressobj(wbits=-bits)
    body = deflater.compress(data) + deflater.flush(zlib.Z_SYNC_FLUSH)
    return body[:-4] if rng.random() < 0.95 else body  # RFC 7692 removes the tail


def payload(rng: random.Random, config: Config) -> bytes:
    roll = rng.random()
    if roll < 0.3:
        return bytes(rng.choice([0, config.max_message, config.max_message + 1, 20_000]))
    if roll < 0.4:
        return b"\xff\xfe" + rng.randbytes(rng.randrange(10))  # not UTF-8 as text
    text = f"word{rng.randrange(100)} ".encode() * rng.randrange(1, 200)
    return text[: rng.randrange(len(text) + 1)]


def message(rng: random.Random, config: Config) -> bytes:
    opcode = rng.choice((TEXT, BINARY))
    data = payload(rng, config)
    mask = rng.randbytes(4)
    compressed = rng.random() < 0.7
    body = deflate(data, rng) if compressed else data
    rsv = 0x40 if compressed else 0
    if rng.random() < 0.6 or len(body) < 2:
        return encode(0x80 | rsv | opcode, body, mask)
    cuts = sorted(rng.sample(range(1, len(body)), min(len(body) - 1, rng.randrange(1, 4))))
    pieces = split(body, cuts)
    out = encode(rsv | opcode, pieces[0], mask)
    for index, piece in enumerate(pieces[1:], 1):
        first = 0x80 if index == len(pieces) - 1 else 0
        if rng.random() < 0.05:
            first |= 0x40  # RSV1 on a continuation frame
        if rng.random() < 0.1:
            out += encode(0x89, b"between", mask)
        out += encode(first, piece, mask)
    return out


def control(rng: random.Random) -> bytes:
    mask = rng.randbytes(4)
    return rng.choice(
        [
            encode(0x89, b"ping", mask),
            encode(0xC9, b"ping", mask),  # RSV1 on a ping
            encode(0x8A, b"pong", mask),
            encode(0x88, struct.pack("!H", 1000) + b"bye", mask),
            encode(0xE2, b"rsv123", mask),
        ]
    )


def stream_of(rng: random.Random, config: Config) -> bytes:
    stream = request(rng)
    for _ in range(rng.randrange(1, 7)):
        stream += message(rng, config) if rng.random() < 0.85 else control(rng)
    if rng.random() < 0.2:
        stream = mutate(rng, stream, head_end(stream) if rng.random() < 0.8 else 0)
    return stream


def check(config: Config, stream: bytes, cuts: list[int]) -> None:
    expected = run_websockets(config, stream)
    assert run_wire(config, split(stream, cuts)) == expected


@pytest.mark.parametrize("config", CONFIGS, ids=["takeover-300", "no-takeover-5000"])
@settings(max_examples=3_000, **SETTINGS)
@given(seed=st.integers(0, 2**64))
def test_seeded_deflate_streams(config: Config, seed: int) -> None:
    rng = random.Random(seed)
    stream = stream_of(rng, config)
    check(config, stream, random_cuts(rng, 8))


def test_a_ping_is_read_between_compressed_fragments() -> None:
    config = CONFIGS[0]
    rng = random.Random(7)
    body = deflate(b"hello " * 40, random.Random(1))
    mask = b"\x01\x02\x03\x04"
    stream = (
        request(random.Random(2)).replace(b"Version: 13\r\n", b"Version: 13\r\n"
                                          b"Sec-WebSocket-Extensions: permessage-deflate\r\n", 1)
        + encode(0x41, body[:10], mask) + encode(PING | 0x80, b"p", mask)
        + encode(0x80, body[10:], mask)
    )  # fmt: skip
    for _ in range(20):
        check(config, stream, random_cuts(rng, 8))
    outcome = run_wire(config, [stream])
    assert outcome.messages == [(TEXT, b"hello " * 40)] and outcome.pongs == [b"p"]
