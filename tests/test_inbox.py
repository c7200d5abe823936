"""`wsfleet.ipc.inbox`: the C inbox against a deque model, and `deliver`'s contract."""

from __future__ import annotations

from collections import deque

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wsfleet.ipc import messages as m
from wsfleet.ipc.inbox import Inbox, append_commands, bytes_total, deliver

pytestmark = pytest.mark.timeout(60)

TEXT, BINARY = m.EV_TEXT, m.EV_BINARY

operations = st.lists(
    st.one_of(
        st.tuples(st.just("push"), st.binary(max_size=40), st.booleans()),
        st.tuples(st.just("pop")),
        st.tuples(st.just("take")),
        st.tuples(st.just("clear")),
        st.tuples(st.just("resume")),
    ),
    max_size=200,
)


@settings(max_examples=300, deadline=None)
@given(operations, st.integers(1, 8), st.integers(1, 120))
def test_the_inbox_is_a_fifo_that_counts_its_bytes_and_pauses_at_a_limit(
    ops, max_packets, max_bytes
) -> None:
    inbox = Inbox(max_packets, max_bytes)
    model: deque[tuple[bytes, bool]] = deque()
    paused = False
    for op in ops:
        if op[0] == "push":
            model.append((op[1], op[2]))
            reached = not paused and (
                len(model) >= max_packets or sum(len(p) for p, _ in model) >= max_bytes
            )
            paused = paused or reached
            assert inbox.push(op[1], op[2]) is reached
        elif op[0] == "pop":
            assert inbox.pop() == (model.popleft() if model else None)
        elif op[0] == "take":
            expected = ([p for p, _ in model], model[-1][1] if model else False)
            model.clear()
            assert inbox.take() == expected
        elif op[0] == "clear":
            model.clear()
            inbox.clear()
        else:
            paused = inbox.paused = False
        assert len(inbox) == len(model)
        assert inbox.bytes == sum(len(p) for p, _ in model)
        assert inbox.paused is paused


class Channel:
    def __init__(self) -> None:
        self.inbox = Inbox(1000, 1 << 20)


def test_deliver_files_messages_and_stops_at_anything_else() -> None:
    channels = {5: Channel(), 6: Channel()}
    calls: list[int] = []
    records = [
        (BINARY, 5, 0, b"a"),
        (TEXT, 6, 0, b"b"),
        (BINARY, 7, 0, b"gone"),  # not in channels: skipped
        (m.EV_CREDITS, 0, 0, b""),
        (TEXT, 5, 0, b"c"),
    ]
    index, failed, exc = deliver(records, 0, channels, TEXT, BINARY, [calls.append], [], print)
    assert (index, failed, exc) == (3, -1, None)
    assert calls == [5, 6]
    assert deliver(records, 4, channels, TEXT, BINARY, [calls.append], [], print) == (5, -1, None)
    assert calls == [5, 6, 5]
    assert channels[5].inbox.take() == ([b"a", b"c"], True)
    assert channels[6].inbox.pop() == (b"b", True)


def test_deliver_per_peer_lists_each_peer_once_and_pauses_before_the_handlers() -> None:
    channels = {5: Channel(), 6: Channel()}
    channels[6].inbox = Inbox(2, 1 << 20)
    ready: list[int] = []
    events: list[tuple[str, int]] = []
    records = [(BINARY, peer, 0, b"x") for peer in (5, 6, 5, 6, 5)]
    pause = lambda peer: events.append(("pause", peer))  # noqa: E731
    assert deliver(records, 0, channels, TEXT, BINARY, None, ready, pause) == (5, -1, None)
    assert ready == [5, 6]
    assert events == [("pause", 6)]
    assert channels[5].inbox.ready and len(channels[5].inbox) == 3

    def handler(peer: int) -> None:
        events.append(("handler", peer))

    channels = {6: Channel()}
    channels[6].inbox = Inbox(1, 1 << 20)
    events.clear()
    deliver([(TEXT, 6, 0, b"y")], 0, channels, TEXT, BINARY, [handler], [], pause)
    assert events == [("pause", 6), ("handler", 6)]


def test_deliver_stops_where_a_handler_raised_and_hands_back_its_exception() -> None:
    channels = {5: Channel()}
    seen: list[int] = []

    def bad(peer: int) -> None:
        raise ValueError("boom")

    records = [(BINARY, 5, 0, b"1"), (BINARY, 5, 0, b"2")]
    index, failed, exc = deliver(records, 0, channels, TEXT, BINARY, [seen.append, bad], [], print)
    assert (index, failed, type(exc), seen) == (0, 1, ValueError, [5])
    assert exc.__traceback__ is not None  # for the log line
    with pytest.raises(KeyboardInterrupt):

        def interrupt(peer: int) -> None:
            raise KeyboardInterrupt

        deliver(records, 1, channels, TEXT, BINARY, [interrupt], [], print)


def test_the_batch_helpers() -> None:
    assert bytes_total([b"ab", b"", b"cde"]) == 5
    assert bytes_total([b"ab", bytearray(b"x")]) == -1
    assert bytes_total((b"ab",)) == -1  # only a list
    backlog: list[tuple] = [(1, 2, 0, b"old")]
    append_commands(backlog, 9, 42, [b"a", b"b"])
    assert backlog == [(1, 2, 0, b"old"), (9, 42, 0, b"a"), (9, 42, 0, b"b")]
    with pytest.raises(ValueError):
        Inbox(0, 10)


def test_an_inbox_without_init_raises_instead_of_crashing() -> None:
    inbox = Inbox.__new__(Inbox)
    assert len(inbox) == 0
    for method in (inbox.pop, inbox.take, inbox.clear, lambda: inbox.push(b"x", False)):
        with pytest.raises(RuntimeError):
            method()
