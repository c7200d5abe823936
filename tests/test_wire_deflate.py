"""`DeflateWire` in-process: permessage-deflate negotiated through websockets, RSV1 allowed
only where RFC 7692 puts it, ``max_message`` after inflation, the close inside a
compressed message, and a connection moved with its parameters (``resume``).

Client frames are deflated here with zlib directly (raw deflate, the trailing
``00 00 ff ff`` removed, RFC 7692 7.2.1), so the wire is checked against the RFC
rather than against websockets' own encoder.
"""

from __future__ import annotations

import base64
import struct
import zlib

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from websockets.extensions.permessage_deflate import (
    PerMessageDeflate,
    ServerPerMessageDeflateFactory,
)
from websockets.frames import Close, Frame, Opcode, apply_mask

from wsfleet.shards.wire import DeflateWire, EventKind, Phase, ServerWire

pytestmark = pytest.mark.timeout(30)

KEY = base64.b64encode(b"0123456789abcdef")
MASK = b"\x11\x22\x33\x44"


def request(*extra: bytes) -> bytes:
    return (
        b"GET / HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: " + KEY + b"\r\nSec-WebSocket-Version: 13\r\n" + b"".join(extra)
        + b"\r\n"
    )  # fmt: skip


OFFER = b"Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n"


def frame(first: int, payload: bytes) -> bytes:
    size = len(payload)
    if size < 126:
        header = bytes((first, 0x80 | size))
    elif size < 65536:
        header = struct.pack("!BBH", first, 0x80 | 126, size)
    else:
        header = struct.pack("!BBQ", first, 0x80 | 127, size)
    return header + MASK + apply_mask(payload, MASK)


def deflated(data: bytes, deflater: zlib._Compress | None = None) -> bytes:
    deflater = deflater or zlib.compressobj(wbits=-15)
    body = deflater.compress(data) + deflater.flush(zlib.Z_SYNC_FLUSH)
    assert body.endswith(b"\x00\x00\xff\xff")
    return body[:-4]


def factory(takeover: bool = True) -> ServerPerMessageDeflateFactory:
    return ServerPerMessageDeflateFactory(
        server_no_context_takeover=not takeover,
        client_no_context_takeover=not takeover,
        server_max_window_bits=12,
        client_max_window_bits=12,
        compress_settings={"memLevel": 5},
    )


def negotiated(takeover: bool = True, **limits: object) -> tuple[DeflateWire, bytes]:
    wire = DeflateWire(extensions=[factory(takeover)], **limits)  # type: ignore[arg-type]
    assert wire.receive_data(request(OFFER)) == [(EventKind.OPENED, "")]
    response = b"".join(wire.data_to_send())
    assert response.startswith(b"HTTP/1.1 101 ")
    assert wire.deflate is not None
    return wire, response


def body_of(server_frame: bytes) -> bytes:
    """The payload of an unmasked server frame."""
    length = server_frame[1] & 0x7F
    return server_frame[2 + {126: 2, 127: 8}.get(length, 0) :]


def close_sent(wire: ServerWire) -> int:
    out = b"".join(wire.data_to_send())
    assert out[0] == 0x88, out[:4]
    return struct.unpack("!H", out[2:4])[0]


def test_an_offer_is_negotiated_and_no_offer_takes_the_fast_upgrade() -> None:
    wire, response = negotiated()
    assert b"Sec-WebSocket-Extensions: permessage-deflate" in response
    assert b"server_max_window_bits=12" in response and b"client_max_window_bits=12" in response
    plain = DeflateWire(extensions=[factory()])
    assert plain.receive_data(request()) == [(EventKind.OPENED, "")]
    response = b"".join(plain.data_to_send())
    assert b"Sec-WebSocket-Extensions" not in response and b"Date:" not in response
    assert plain.deflate is None
    # A plain ServerWire accepts the offer on its fast path, without the extension.
    off = ServerWire()
    assert off.receive_data(request(OFFER)) == [(EventKind.OPENED, "")]
    assert b"Sec-WebSocket-Extensions" not in b"".join(off.data_to_send())


def test_without_context_takeover_the_server_asks_for_none() -> None:
    wire, response = negotiated(takeover=False)
    assert b"server_no_context_takeover" in response
    assert b"client_no_context_takeover" in response
    assert wire.deflate_parameters() == (12, 12)
    takeover, _ = negotiated()
    with pytest.raises(ValueError):
        takeover.deflate_parameters()


def test_compressed_messages_are_inflated_and_plain_ones_still_delivered() -> None:
    wire, _ = negotiated()
    text = "héllo ".encode() * 200
    deflater = zlib.compressobj(wbits=-12)  # the client's context, taken over
    assert wire.receive_data(frame(0xC1, deflated(text, deflater))) == [(EventKind.TEXT, text)]
    again = deflated(text, deflater)
    assert len(again) < 20  # the second one refers back to the first
    assert wire.receive_data(frame(0xC1, again)) == [(EventKind.TEXT, text)]
    assert wire.receive_data(frame(0x82, b"plain")) == [(EventKind.BINARY, b"plain")]
    # A fragmented compressed message: RSV1 on its first frame only.
    body = deflated(b"x" * 5000 + b"y" * 5000)
    events = wire.receive_data(frame(0x42, body[:7]) + frame(0x00, body[7:20]))
    assert events == []
    assert wire.receive_data(frame(0x80, body[20:])) == [
        (EventKind.BINARY, b"x" * 5000 + b"y" * 5000)
    ]
    assert wire.phase is Phase.OPEN


@pytest.mark.parametrize(
    ("stream", "why"),
    [
        (frame(0x42, b"\x00") + frame(0xC0, b"\x00"), "RSV1 on a continuation frame"),
        (frame(0xC9, b""), "RSV1 on a ping"),
        (frame(0xA1, b"a"), "RSV2 on a data frame"),
        (frame(0x91, b"a"), "RSV3 on a data frame"),
    ],
)
def test_reserved_bits_elsewhere_still_fail_with_1002(stream: bytes, why: str) -> None:
    wire, _ = negotiated()
    events = wire.receive_data(stream)
    assert [kind for kind, _ in events] == [EventKind.FAILED], why
    assert close_sent(wire) == 1002


def test_rsv1_without_the_extension_fails_on_its_header() -> None:
    plain = DeflateWire(extensions=[factory()])
    plain.receive_data(request())
    plain.data_to_send()
    # Only the header and two bytes: refused before the payload (deviation 2).
    events = plain.receive_data(frame(0xC1, b"x" * 1000)[:8])
    assert events == [(EventKind.FAILED, Close(1002, "reserved bits must be 0"))]


@pytest.mark.parametrize("fragmented", [False, True])
def test_max_message_holds_after_inflation(fragmented: bool) -> None:
    wire, _ = negotiated(max_message=1000)
    ok = deflated(b"\x00" * 1000)
    assert wire.receive_data(frame(0xC2, ok)) == [(EventKind.BINARY, b"\x00" * 1000)]
    bomb = deflated(b"\x00" * (64 << 20))  # 64 MiB of zeros: about 64 KiB
    assert len(bomb) < 70_000
    if fragmented:
        stream = frame(0x42, bomb[:100]) + frame(0x80, bomb[100:])
    else:
        stream = frame(0xC2, deflated(b"\x00" * 1001))
    events = wire.receive_data(stream)
    assert [kind for kind, _ in events] == [EventKind.FAILED]
    assert close_sent(wire) == 1009
    assert wire.phase is Phase.CLOSED


def test_a_close_inside_a_compressed_message_is_answered_1000() -> None:
    wire, _ = negotiated()
    body = deflated(b"abc" * 100)
    events = wire.receive_data(frame(0x41, body[:5]) + frame(0x88, struct.pack("!H", 1000)))
    assert events == [(EventKind.CLOSE_REQUEST, Close(1000, ""))]
    assert close_sent(wire) == 1000


def test_compress_builds_frames_a_client_inflates() -> None:
    for takeover in (True, False):
        wire, _ = negotiated(takeover)
        client = PerMessageDeflate(not takeover, not takeover, 12, 12)
        for payload in (b"", b"tiny", b"repeat " * 3000, bytes(range(256)) * 40):
            built = wire.compress(payload, text=False)
            assert built[0] == 0xC2
            assert client.decode(Frame(Opcode.BINARY, body_of(built), rsv1=True)).data == payload
        assert wire.compress(b"t", text=True)[0] == 0xC1


def test_a_moved_connection_inflates_and_deflates_with_its_parameters() -> None:
    wire, _ = negotiated(takeover=False)
    parameters = wire.deflate_parameters()
    assert parameters is not None
    wire.receive_data(frame(0x41, deflated(b"half")))  # a compressed message half received
    with pytest.raises(ValueError):
        wire.deflate_parameters()
    moved = ServerWire()
    moved.resume("", None, False, parameters, {"memLevel": 5})
    assert moved.deflate is not None and moved.deflate_parameters() == (12, 12)
    message = b"after the move " * 50
    assert moved.receive_data(frame(0xC2, deflated(message))) == [(EventKind.BINARY, message)]
    client = PerMessageDeflate(True, True, 12, 12)
    built = moved.compress(message, text=False)
    assert client.decode(Frame(Opcode.BINARY, body_of(built), rsv1=True)).data == message
    assert moved.receive_data(frame(0xC9, b"")) != []  # RSV1 on a ping: still refused
    assert close_sent(moved) == 1002


# -- moving at any byte (wsfleet reload), as tests/test_wire_snapshot.py ---------------------

MOVING = b"".join(
    [
        frame(0xC2, deflated(b"first " * 30)),
        frame(0x82, b"plain"),
        frame(0x41, deflated(b"compressed and fragmented")[:6]),
        frame(0x80, deflated(b"compressed and fragmented")[6:]),
        frame(0x89, b"ping"),
        frame(0xC1, deflated("é".encode() * 3000)),  # several reads' worth
        frame(0x01, b"plain "),
        frame(0x80, b"fragments"),
    ]
)
#: Where the compressed fragmented message is half received: from the end of its first
#: frame to the end of its last (a cut there cannot move).
_FIRST_END = len(frame(0xC2, deflated(b"first " * 30))) + len(frame(0x82, b"plain"))
HALF_INFLATED = range(
    _FIRST_END + len(frame(0x41, deflated(b"compressed and fragmented")[:6])),
    _FIRST_END
    + len(frame(0x41, deflated(b"compressed and fragmented")[:6]))
    + len(frame(0x80, deflated(b"compressed and fragmented")[6:])),
)


def _events(wire: ServerWire, data: bytes) -> list:
    events = wire.receive_data(data)
    wire.data_to_send()
    return [event for event in events if event[0] is not EventKind.OPENED]


@settings(max_examples=300, deadline=None)
@given(st.integers(0, len(MOVING)))
@example(HALF_INFLATED.start - 1)  # the first fragment's last byte still to come: moves
@example(HALF_INFLATED.start)
@example(HALF_INFLATED.stop - 1)
@example(HALF_INFLATED.stop)  # the message is whole: moves
def test_a_deflate_connection_moved_at_any_byte_gives_the_same_events(cut: int) -> None:
    whole, _ = negotiated(takeover=False)
    expected = _events(whole, MOVING)
    assert [kind for kind, _ in expected] == [EventKind.BINARY] * 2 + [EventKind.TEXT] * 3
    old, _ = negotiated(takeover=False)
    before = _events(old, MOVING[:cut])
    if cut in HALF_INFLATED:
        with pytest.raises(ValueError):
            old.deflate_parameters()
        return
    parameters = old.deflate_parameters()
    unparsed, fragments, fragments_text = old.snapshot()
    new = ServerWire()
    new.resume("", fragments, fragments_text, parameters, {"memLevel": 5})
    after = _events(new, unparsed + MOVING[cut:])
    assert before + after == expected


def test_moved_deflate_parameters_cross_the_handoff_socket() -> None:
    import socket

    from wsfleet.ipc import handoff

    left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    spare = socket.socket()
    try:
        states = [
            handoff.MovedConnection(7, "127.0.0.1", 1, "", False, False, b"", None, False),
            handoff.MovedConnection(
                8, "127.0.0.1", 2, "", False, False, b"x", None, False, deflate=(9, 12)
            ),  # fmt: skip
        ]
        handoff.send(left, states, [spare.fileno(), spare.fileno()])
        received, fds = handoff.receive(right)
        for fd in fds:
            socket.close(fd)
        assert [state.deflate for state in received] == [None, (9, 12)]
        assert received == states
    finally:
        for sock in (left, right, spare):
            sock.close()
