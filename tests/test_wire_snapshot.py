"""A wire's `snapshot` and `resume` (``wsfleet reload``): a connection cut at any byte,
moved to a fresh wire, gives the same events as one wire that read the whole stream."""

from __future__ import annotations

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wsfleet.shards.wire import EventKind, Phase, ServerWire

from .rawclient import OP_BINARY, OP_PING, OP_TEXT, client_frame
from .wsframes import handshake_request

REQUEST = handshake_request(80)
#: Fast-path frames, a fragmented message with a ping inside, one large frame (slow path
#: spanning reads), a text frame: every kind of state a cut can fall into.
STREAM = b"".join(
    [
        client_frame(b"a" * 10, OP_BINARY),
        client_frame(b"frag1 ", OP_TEXT, fin=False),
        client_frame(b"x" * 3000, 0, fin=False),
        client_frame(os.urandom(20), OP_PING),
        client_frame(b" end", 0),
        client_frame(os.urandom(70000), OP_BINARY),
        client_frame("é".encode(), OP_TEXT),
    ]
)


def events_of(wire: ServerWire, data: bytes) -> list:
    events = wire.receive_data(data)
    wire.data_to_send()
    return [event for event in events if event[0] is not EventKind.OPENED]


def opened() -> ServerWire:
    wire = ServerWire(max_message=1 << 20)
    events_of(wire, REQUEST)
    assert wire.phase is Phase.OPEN
    return wire


WHOLE = events_of(opened(), STREAM)


@settings(max_examples=400, deadline=None)
@given(st.integers(0, len(STREAM)), st.integers(0, len(STREAM)))
def test_a_connection_moved_at_any_byte_gives_the_same_events(first: int, second: int) -> None:
    first, second = sorted((first, second))
    old = opened()
    got = events_of(old, STREAM[:first]) + events_of(old, STREAM[first:second])
    unparsed, fragments, fragments_text = old.snapshot()
    new = ServerWire(max_message=1 << 20)
    new.resume("", fragments, fragments_text)
    assert new.phase is Phase.OPEN
    got += events_of(new, unparsed + STREAM[second:])
    assert got == WHOLE


def test_a_connection_in_its_upgrade_moves_as_the_start_of_its_request() -> None:
    old = ServerWire()
    assert old.receive_data(REQUEST[:30]) == []
    unparsed, fragments, _ = old.snapshot()
    assert (unparsed, fragments) == (REQUEST[:30], None)
    new = ServerWire()
    assert new.receive_data(unparsed + REQUEST[30:]) == [(EventKind.OPENED, "")]


def test_a_connection_with_output_queued_or_closing_cannot_move() -> None:
    wire = opened()
    wire.send_ping()
    with pytest.raises(ValueError, match="cannot move"):
        wire.snapshot()
    wire.data_to_send()
    wire.send_close(1000, "")
    with pytest.raises(ValueError, match="phase closing cannot move"):
        wire.snapshot()
