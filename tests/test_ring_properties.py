"""The ring in one process: whatever the interleaving, records come back exactly."""

from __future__ import annotations

import random
from collections import deque

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from wsfleet.ipc import (
    FLAGS_MAX,
    HEADER_SIZE,
    KIND_MAX,
    Consumer,
    MessageTooLarge,
    Producer,
    RingFds,
    SharedRing,
)

MAX_MESSAGE = 5000

record_sizes = st.one_of(
    st.integers(0, 40),
    st.sampled_from([0, 1, 7, 8, 9, 15, 16, 17, 47, 48, 49, 63, 64, 65, 127, 128, 4096]),
    st.integers(0, MAX_MESSAGE),
    st.just(MAX_MESSAGE),
)


def make_payload(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


class RingMachine(RuleBasedStateMachine):
    """A producer and a consumer on one ring, driven in any order.

    ``waiting`` models the caller's queue of records not yet taken by the ring
    (the first may be partly in it); ``in_ring`` the records the ring took.
    """

    @initialize(capacity=st.sampled_from([64, 128, 256, 1024, 8192]))
    def open_ring(self, capacity: int) -> None:
        self.ring = SharedRing.create(capacity, max_message=MAX_MESSAGE)
        self.producer = Producer(self.ring)
        self.consumer = Consumer(self.ring)
        self.waiting: list[tuple[int, int, int, bytes]] = []
        self.in_ring: deque[tuple[int, int, int, bytes]] = deque()
        self.received = 0

    @rule(
        sizes=st.lists(record_sizes, min_size=1, max_size=12),
        kind=st.integers(1, KIND_MAX),
        peer=st.integers(-(2**31), 2**31 - 1),
        flags=st.integers(0, FLAGS_MAX),
        seed=st.integers(0, 2**32),
    )
    def push(self, sizes: list[int], kind: int, peer: int, flags: int, seed: int) -> None:
        for i, size in enumerate(sizes):
            self.waiting.append((kind, peer + i & 0x7FFFFFFF, flags, make_payload(size, seed + i)))
        self._push_waiting()

    @precondition(lambda self: bool(self.waiting))
    @rule()
    def push_again(self) -> None:
        self._push_waiting()

    def _push_waiting(self) -> None:
        taken = self.producer.push_many(self.waiting)
        self.in_ring.extend(self.waiting[:taken])
        del self.waiting[:taken]

    @rule()
    def flush(self) -> None:
        self.producer.flush()

    @rule(max_records=st.one_of(st.none(), st.integers(1, 5)))
    def pop(self, max_records: int | None) -> None:
        for record in self.consumer.pop_all(max_records):
            assert self.in_ring, "popped a record that was never pushed"
            expected = self.in_ring.popleft()
            assert record == expected
            self.received += 1

    @invariant()
    def nothing_overwritten(self) -> None:
        assert 0 <= self.ring.used() <= self.ring.capacity

    def teardown(self) -> None:
        if not hasattr(self, "ring"):
            return
        # Drain to the end: everything pushed comes out, in order, byte for byte.
        for _ in range(100_000):
            if not self.waiting and not self.in_ring:
                break
            self._push_waiting()
            self.producer.flush()
            self.pop(None)
        assert not self.waiting and not self.in_ring
        assert self.consumer.pop_all() == []
        self.ring.close()


RingMachine.TestCase.settings = settings(
    max_examples=300,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestRingMachine = RingMachine.TestCase


@pytest.mark.parametrize("capacity", [64, 4096])
def test_every_size_up_to_max_passes_in_order(capacity: int) -> None:
    sizes = list(range(0, 200)) + list(range(MAX_MESSAGE - 50, MAX_MESSAGE + 1))
    records = [(1 + i % KIND_MAX, i, i % 3, make_payload(size, i)) for i, size in enumerate(sizes)]
    with SharedRing.create(capacity, max_message=MAX_MESSAGE) as ring:
        producer, consumer = Producer(ring), Consumer(ring)
        received: list = []
        i = 0
        while i < len(records) or len(received) < len(records):
            i = producer.push_many(records, i)
            producer.flush()
            received.extend(consumer.pop_all())
        assert received == records


def test_a_second_mapping_from_the_descriptors_sees_the_records() -> None:
    with SharedRing.create(256) as ring:
        fds = RingFds.decode(ring.fds.encode())
        assert fds == ring.fds
        other = SharedRing(fds, owns_fds=False)
        try:
            producer = Producer(ring)
            assert producer.push(7, 42, b"across mappings", 3)
            producer.flush()
            assert Consumer(other).pop_all() == [(7, 42, 3, b"across mappings")]
        finally:
            other.close()


def test_bad_records_are_refused_with_a_clear_error_and_nothing_written() -> None:
    with SharedRing.create(256, max_message=100) as ring:
        producer = Producer(ring)
        with pytest.raises(MessageTooLarge):
            producer.push(1, 1, bytes(101))
        with pytest.raises(ValueError, match="kind"):
            producer.push(0, 1, b"pad kind is reserved")
        with pytest.raises(ValueError, match="kind"):
            producer.push(KIND_MAX + 1, 1, b"")
        with pytest.raises(ValueError, match="flags"):
            producer.push(1, 1, b"", FLAGS_MAX + 1)
        producer.flush()
        assert ring.used() == 0
        assert producer.push(1, 1, bytes(100))


@pytest.mark.parametrize("capacity", [0, 32, 100, 1000])
def test_capacity_must_be_a_power_of_two_of_at_least_64(capacity: int) -> None:
    with pytest.raises(ValueError, match="power of two"):
        SharedRing.create(capacity)


def test_a_full_ring_reports_what_it_took_and_never_overwrites() -> None:
    with SharedRing.create(128, max_message=1000) as ring:
        producer, consumer = Producer(ring), Consumer(ring)
        records = [(1, i, 0, bytes([i]) * 8) for i in range(20)]  # 24 bytes each
        taken = producer.push_many(records)
        assert taken == 128 // 24
        assert producer.push_many(records, taken) == taken  # still full
        producer.flush()
        assert consumer.pop_all() == records[:taken]
        assert producer.push_many(records, taken) > taken


def test_header_is_sixteen_bytes() -> None:
    assert HEADER_SIZE == 16
