"""The wire's phases: every transition in `TRANSITIONS`, taken by the bytes that cause it."""

from __future__ import annotations

import base64
import struct
from http import HTTPStatus

import pytest
from websockets.frames import Close, apply_mask

from wsfleet.shards.wire import (
    PING_FRAME,
    TRANSITIONS,
    EventKind,
    Phase,
    ServerWire,
    Trigger,
    frame_header,
)

pytestmark = pytest.mark.timeout(30)

KEY = base64.b64encode(b"0123456789abcdef")
REQUEST = (
    b"GET / HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: " + KEY + b"\r\nSec-WebSocket-Version: 13\r\n\r\n"
)
MASK = b"\x11\x22\x33\x44"


def frame(first: int, payload: bytes) -> bytes:
    assert len(payload) < 126
    return bytes((first, 0x80 | len(payload))) + MASK + apply_mask(payload, MASK)


def close_frame(code: int, reason: bytes = b"") -> bytes:
    return frame(0x88, struct.pack("!H", code) + reason)


def opened(**limits: object) -> ServerWire:
    wire = ServerWire(**limits)  # type: ignore[arg-type]
    assert wire.receive_data(REQUEST) == [(EventKind.OPENED, "")]
    assert wire.phase is Phase.OPEN
    assert wire.data_to_send()[0].startswith(b"HTTP/1.1 101 ")
    return wire


def test_the_table_holds_the_life_of_a_connection_and_nothing_else() -> None:
    assert dict(TRANSITIONS) == {
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
    # CLOSED and REFUSED are final: no trigger leaves them.
    assert not [key for key in TRANSITIONS if key[0] in (Phase.CLOSED, Phase.REFUSED)]


def test_handshake_waits_for_the_end_of_the_request() -> None:
    wire = ServerWire()
    assert wire.receive_data(REQUEST[:30]) == []
    assert wire.phase is Phase.HANDSHAKE and not wire.wants_write
    assert wire.receive_data(REQUEST[30:]) == [(EventKind.OPENED, "")]
    assert wire.phase is Phase.OPEN and wire.wants_write


def test_handshake_to_open_through_websockets_keeps_frames_that_came_with_it() -> None:
    # A header twice is no fast-path request: websockets accepts it (its 101 has a Date).
    request = REQUEST[:-2] + b"Host: again\r\n\r\n"
    wire = ServerWire()
    events = wire.receive_data(request + frame(0x81, b"hi"))
    assert events == [(EventKind.OPENED, ""), (EventKind.TEXT, b"hi")]
    assert wire.phase is Phase.OPEN
    assert b"\r\nDate: " in wire.data_to_send()[0]


def test_frames_that_came_with_a_fast_request_are_delivered() -> None:
    wire = ServerWire()
    events = wire.receive_data(REQUEST + frame(0x82, b"\x00\x01") + frame(0x81, b"x")[:3])
    assert events == [(EventKind.OPENED, ""), (EventKind.BINARY, b"\x00\x01")]
    assert wire.receive_data(frame(0x81, b"x")[3:]) == [(EventKind.TEXT, b"x")]


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (REQUEST.replace(b"13", b"8"), 400),  # websockets' refusal
        (REQUEST.replace(b"GET", b"PUT"), 405),
        (REQUEST[:-2] + b"X: " + b"x" * 9000 + b"\r\n\r\n", 431),  # ours: max_request_bytes
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n", None),  # TLS: no answer
    ],
)
def test_handshake_to_refused(request_bytes: bytes, status: int | None) -> None:
    wire = ServerWire()
    assert wire.receive_data(request_bytes) == [(EventKind.REFUSED, status)]
    assert wire.phase is Phase.REFUSED
    out = wire.data_to_send()
    assert out[-1] == b""  # the end of the stream
    if status is not None:
        assert out[0].startswith(b"HTTP/1.1 %d " % status)
    # Refused is final: what comes is discarded.
    assert wire.receive_data(frame(0x81, b"late")) == [] and not wire.wants_write


def test_the_admission_policy_refuses_a_valid_request() -> None:
    origins: list[list[str]] = []

    def admit(seen: list[str]) -> tuple[HTTPStatus, str] | None:
        origins.append(list(seen))
        return HTTPStatus.SERVICE_UNAVAILABLE, "full\n"

    wire = ServerWire(admit=admit)
    events = wire.receive_data(REQUEST[:-2] + b"Origin: http://o\r\n\r\n")
    assert events == [(EventKind.REFUSED, 503)] and origins == [["http://o"]]
    assert wire.phase is Phase.REFUSED


def test_open_to_closed_on_the_peers_close() -> None:
    wire = opened()
    events = wire.receive_data(frame(0x81, b"a") + close_frame(1000, b"bye\0") + frame(0x81, b"z"))
    assert events == [(EventKind.TEXT, b"a"), (EventKind.CLOSE_REQUEST, Close(1000, "bye\0"))]
    assert wire.phase is Phase.CLOSED and wire.peer_closed_first
    assert wire.data_to_send() == [b"\x88\x06\x03\xe8bye\x00", b""]  # echoed, then EOF
    assert wire.receive_data(frame(0x81, b"late")) == []


def test_open_to_closing_to_closed_when_the_server_closes() -> None:
    wire = opened()
    wire.send_close(1001, "going away")
    assert wire.phase is Phase.CLOSING
    assert wire.data_to_send() == [b"\x88\x0c\x03\xe9going away"]
    wire.send_close(1000, "")  # once only
    assert not wire.wants_write
    # Data still delivered while closing; the peer's answer ends the stream.
    events = wire.receive_data(frame(0x82, b"d") + close_frame(1001))
    assert events == [(EventKind.BINARY, b"d")]  # the answer to our close is no request
    assert wire.phase is Phase.CLOSED and not wire.peer_closed_first
    assert wire.data_to_send() == [b""]


def test_a_frame_held_by_the_fast_path_is_websockets_once_closing() -> None:
    wire = opened()
    whole = frame(0x81, b"held")
    assert wire.receive_data(whole[:4]) == []
    wire.send_close(1000, "")
    assert wire.receive_data(whole[4:]) == [(EventKind.TEXT, b"held")]


def test_open_to_closed_when_the_server_fails_the_connection() -> None:
    wire = opened()
    wire.fail(1011, "keepalive ping timeout")
    assert wire.phase is Phase.CLOSED
    assert wire.data_to_send() == [b"\x88\x18\x03\xf3keepalive ping timeout", b""]
    wire.fail(1011, "again")
    wire.send_close(1000, "")
    wire.send_ping()
    assert not wire.wants_write


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (frame(0x81, b"\xff"), 1007),  # fast path: not UTF-8
        (frame(0x01, b"\xc3") + frame(0x80, b"("), 1007),  # fragmented: not UTF-8
        (bytes((0x81, 0x05)) + b"hello", 1002),  # unmasked
        (bytes((0xC1, 0x85)), 1002),  # RSV1: refused on the header alone
        (bytes((0x83, 0x80)), 1002),  # opcode 3
        (bytes((0x82, 0xFE, 0x04, 0x00)), 1009),  # 1024 > max_message
        (frame(0x80, b"x"), 1002),  # a continuation of nothing
    ],
)
def test_open_to_closed_when_the_peer_breaks_the_protocol(data: bytes, code: int) -> None:
    wire = opened(max_message=1000)
    events = wire.receive_data(data + frame(0x81, b"after"))
    assert [kind for kind, _ in events] == [EventKind.FAILED]
    assert events[0][1].code == code
    assert wire.phase is Phase.CLOSED
    out = wire.data_to_send()
    assert out[0][:4] == b"\x88" + bytes((out[0][1],)) + struct.pack("!H", code)
    assert out[-1] == b""


def test_autobahn_7_1_5_the_close_inside_a_message_is_answered_1000() -> None:
    wire = opened()
    events = wire.receive_data(frame(0x01, b"fragment1"))
    assert events == []
    events = wire.receive_data(close_frame(1000) + frame(0x80, b"fragment2"))
    assert events == [(EventKind.CLOSE_REQUEST, Close(1000, ""))]
    assert wire.phase is Phase.CLOSED and wire.peer_closed_first
    assert wire.data_to_send() == [b"\x88\x02\x03\xe8", b""]


def test_7_1_5_holds_up_to_the_size_limit_of_the_message() -> None:
    """A close frame exactly as long as what is left of ``max_message`` is still the
    peer's close; one byte more and websockets refuses its length (1009)."""
    wire = opened(max_message=64)
    events = wire.receive_data(frame(0x01, b"f" * 60) + close_frame(1000, b"ab"))
    assert events == [(EventKind.CLOSE_REQUEST, Close(1000, "ab"))]
    wire = opened(max_message=64)
    events = wire.receive_data(frame(0x01, b"f" * 60) + close_frame(1000, b"abc"))
    assert [(kind, value.code) for kind, value in events] == [(EventKind.FAILED, 1009)]


def test_a_ping_at_the_size_limit_with_a_reserved_bit_fails_on_its_header() -> None:
    wire = opened(max_message=64)
    assert wire.receive_data(frame(0x01, b"f" * 60)) == []
    events = wire.receive_data(frame(0xC9, b"pppp")[:4])  # RSV1: the payload never comes
    assert [(kind, value.code) for kind, value in events] == [(EventKind.FAILED, 1002)]


@pytest.mark.parametrize("second", [0xFE, 0xFF])
def test_an_invalid_opcode_fails_on_two_bytes_as_websockets(second: int) -> None:
    wire = opened()
    events = wire.receive_data(bytes((0x8B, second)))  # the length bytes never come
    assert events == [(EventKind.FAILED, Close(1002, "invalid opcode"))]


def test_pings_are_answered_and_pongs_reported() -> None:
    wire = opened()
    assert wire.receive_data(frame(0x89, b"p") + frame(0x8A, b"q")) == [(EventKind.PONG, b"q")]
    assert wire.data_to_send() == [b"\x8a\x01p"]
    wire.send_ping()
    assert wire.data_to_send() == [PING_FRAME]


def test_frame_header_lengths() -> None:
    assert frame_header(0x82, 125) == b"\x82\x7d"
    assert frame_header(0x81, 126) == b"\x81\x7e\x00\x7e"
    assert frame_header(0x82, 65535) == b"\x82\x7e\xff\xff"
    assert frame_header(0x82, 65536) == b"\x82\x7f" + struct.pack("!Q", 65536)


def test_a_large_frame_in_many_reads_is_delivered_once_whole() -> None:
    wire = opened()
    payload = bytes(range(256)) * 300  # 76,800 bytes: a 64-bit length
    data = struct.pack("!BBQ", 0x82, 0xFF, len(payload)) + MASK + apply_mask(payload, MASK)
    events = []
    for i in range(0, len(data), 1000):
        events += wire.receive_data(data[i : i + 1000])
    assert events == [(EventKind.BINARY, payload)]
