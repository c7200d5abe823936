"""A single-producer single-consumer record ring in shared memory.

Layout
======
The ring lives in an anonymous ``memfd`` (no name in ``/dev/shm``, so nothing
can leak when a process is SIGKILLed) that a freshly started process attaches
to from inherited file descriptors::

    0    magic, capacity, max_message      written once by the creator
    64   head     bytes ever written        written by the producer only
    128  tail     bytes ever consumed       written by the consumer only
    192  consumer_sleeping flag             written by the consumer only
    256  producer_waiting flag              written by the producer only
    512  data: ``capacity`` bytes (a power of two)

Each shared word sits on its own cache line so that the two sides do not
bounce one line between cores.  ``head`` and ``tail`` only grow (64-bit byte
counters); ``index & (capacity - 1)`` is the position in the data area.

A record is a 16-byte header (``length u32, peer i32, kind u16, flags u16,
total u32``) and ``length`` payload bytes, padded to a multiple of 8.  A
record never straddles the end of the data area: if it does not fit before
the end, the producer fills the rest with a pad record (``kind`` 0), or skips
it silently when fewer than 16 bytes remain (both sides know that rule).

A message too large to fit at once (more than a quarter of the ring, or more
than the space left) is carried in *chunks*: consecutive records with the
``_MORE`` flag bit on all but the last, the full length in ``total``; the
consumer joins them.  So every message up to ``max_message`` passes through a
ring of any size; smaller ones are never split.

Memory ordering
===============
The payload bytes are written and read with ordinary (non-atomic) copies;
correctness rests on acquire/release pairs on the two indexes, done through
`AtomicWord` (C11 atomics via the ``atomics`` library):

* The producer copies a batch of records into the data area, *then* stores
  ``head`` with release semantics.  The consumer loads ``head`` with acquire
  semantics *before* it reads any record below it.  Release/acquire make
  every byte written before the store visible to the loads after the load,
  on any architecture (on aarch64 this is ``stlr``/``ldar``; x86-64's stronger
  order is not relied on).
* Symmetrically the consumer copies the records out, *then* stores ``tail``
  (release); the producer loads ``tail`` (acquire) before it reuses that
  space, so it never overwrites bytes still being read.
* Between Python statements there are always opaque C calls, so the compiler
  cannot move the copies across the atomic operations either.

Doorbells
=========
Each direction has an ``eventfd``: ``data_bell`` (producer -> consumer) and
``space_bell`` (consumer -> producer).  The producer rings ``data_bell`` only
when the consumer has announced it is about to sleep, so a busy stream costs
no system call per record or per batch.  The announcement is Dekker's
pattern, which needs *sequential consistency* (a release store followed by an
acquire load may be reordered, even on x86-64, by the store buffer):

* consumer: ``sleeping = 1`` (seq_cst); re-check ``head`` (seq_cst); sleep on
  the bell only if still empty.
* producer: ``head = h`` (seq_cst); read ``sleeping`` (seq_cst); ring if set.

At least one side sees the other's store, so a record published while the
consumer goes to sleep always either is seen by its re-check or rings the
bell.  ``space_bell`` uses the same pattern with ``producer_waiting`` and
``tail``.  Spurious wake-ups are harmless: every wait re-checks.

Speed
=====
The per-record loops of `Producer.push_many` and `Consumer.pop_all` run in C
(``_fastring.c``) for the common records - whole, unchunked, fitting before
the end - and hand back to the Python code here at anything else (a wrap, a
chunk, a full ring, a bad value), which stays the reference implementation.
The C code touches no shared index: the atomics above happen here, before
and after it.

Liveness is not the ring's business: see `wsfleet.ipc.lifeline`.  `wait`
methods accept the watch end of a lifeline and raise `PeerGone` once the other
process is gone and nothing is left to read.
"""

from __future__ import annotations

import mmap
import os
import select
import struct
import time
from collections.abc import Callable, Sequence
from typing import NamedTuple

from . import _fastring
from .atomic import AtomicWord

__all__ = [
    "HEADER_SIZE",
    "KIND_MAX",
    "FLAGS_MAX",
    "Record",
    "RingFds",
    "SharedRing",
    "Producer",
    "Consumer",
    "RingError",
    "RingCorrupted",
    "MessageTooLarge",
    "PeerGone",
]

#: ``(kind, peer, flags, payload)``: a plain tuple, because the per-record
#: cost of anything richer shows in the throughput.
Record = tuple[int, int, int, bytes]

_MAGIC = 0x3147_4E49_5253_4657  # b"WSFRING1" little-endian
_HEAD_OFF, _TAIL_OFF, _SLEEPING_OFF, _WAITING_OFF = 64, 128, 192, 256
_DATA_OFF = 512
_META = struct.Struct("<QQQ")  # magic, capacity, max_message

_HEADER = struct.Struct("<IiHHI")  # length, peer, kind, flags, total
HEADER_SIZE = _HEADER.size  # 16
_PAD_KIND = 0
_MORE = 0x8000  # flags bit: another chunk of this message follows
KIND_MAX = 0xFFFF
FLAGS_MAX = _MORE - 1  # the top flag bit belongs to the ring
MIN_CAPACITY = 64
DEFAULT_MAX_MESSAGE = 16 * 1024 * 1024
_MIN_CHUNK_PAYLOAD = 8
#: How long a blocking wait watches the other side's index before it sleeps.
SPIN_SECONDS = 50e-6


class RingError(Exception):
    """Base of the ring's errors."""


class RingCorrupted(RingError):
    """The shared memory does not hold what the ring wrote (a bug, not a peer's input)."""


class MessageTooLarge(RingError, ValueError):
    """A payload exceeds the ring's ``max_message``."""


class PeerGone(RingError):
    """The process on the other side exited and nothing more will arrive (or be read)."""


class RingFds(NamedTuple):
    """The descriptors another process needs to attach to a ring."""

    memfd: int
    data_bell: int
    space_bell: int

    def encode(self) -> str:
        """A compact text form for a command line (``"7,8,9"``)."""
        return ",".join(map(str, self))

    @classmethod
    def decode(cls, text: str) -> RingFds:
        return cls(*map(int, text.split(",")))


def _aligned(n: int) -> int:
    return (n + 7) & ~7


class SharedRing:
    """The shared memory and doorbells of one ring, as either side maps them.

    Create it with `create` in one process and `attach` to it in the other,
    then wrap it in exactly one `Producer` on one side and one `Consumer` on
    the other.
    """

    def __init__(self, fds: RingFds, *, owns_fds: bool = True) -> None:
        self.fds = fds
        self._owns_fds = owns_fds
        size = os.fstat(fds.memfd).st_size
        if size < _DATA_OFF + MIN_CAPACITY:
            raise RingCorrupted(f"ring memory is {size} bytes: too small to be a ring")
        self.mm = mmap.mmap(fds.memfd, size)
        magic, capacity, max_message = _META.unpack_from(self.mm, 0)
        if magic != _MAGIC or _DATA_OFF + capacity != size:
            self.mm.close()
            raise RingCorrupted("the shared memory is not a wsfleet ring (bad magic or size)")
        self.capacity: int = capacity
        self.max_message: int = max_message
        self._view = memoryview(self.mm)
        self.head = AtomicWord(self._view[_HEAD_OFF : _HEAD_OFF + 8])
        self.tail = AtomicWord(self._view[_TAIL_OFF : _TAIL_OFF + 8])
        self.consumer_sleeping = AtomicWord(self._view[_SLEEPING_OFF : _SLEEPING_OFF + 8])
        self.producer_waiting = AtomicWord(self._view[_WAITING_OFF : _WAITING_OFF + 8])
        self._closed = False

    @classmethod
    def create(
        cls, capacity: int = 1 << 20, *, max_message: int = DEFAULT_MAX_MESSAGE
    ) -> SharedRing:
        """A new, empty ring of ``capacity`` data bytes (a power of two, at least 64)."""
        if capacity < MIN_CAPACITY or capacity & (capacity - 1):
            raise ValueError(f"ring capacity must be a power of two >= {MIN_CAPACITY}: {capacity}")
        if not 0 <= max_message <= 0xFFFF_FFFF:
            raise ValueError(f"max_message must fit in 32 bits: {max_message}")
        memfd = os.memfd_create("wsfleet-ring", os.MFD_CLOEXEC)
        try:
            os.ftruncate(memfd, _DATA_OFF + capacity)
            with mmap.mmap(memfd, _DATA_OFF) as mm:
                _META.pack_into(mm, 0, _MAGIC, capacity, max_message)
            data_bell = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            space_bell = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        except BaseException:
            os.close(memfd)
            raise
        return cls(RingFds(memfd, data_bell, space_bell))

    @classmethod
    def attach(cls, fds: RingFds) -> SharedRing:
        """Map a ring whose descriptors this process inherited (e.g. via ``pass_fds``)."""
        return cls(fds)

    def used(self) -> int:
        """Bytes published and not yet consumed (a snapshot, for stats)."""
        return self.head.load_acquire() - self.tail.load_acquire()

    def close(self) -> None:
        """Unmap the memory and close this process's descriptors of the ring."""
        if self._closed:
            return
        self._closed = True
        for word in (self.head, self.tail, self.consumer_sleeping, self.producer_waiting):
            word.close()
        self._view.release()
        self.mm.close()
        if self._owns_fds:
            for fd in self.fds:
                os.close(fd)

    def __del__(self) -> None:
        # Like a file object: an unreferenced ring frees its mapping and fds.
        if hasattr(self, "_closed"):
            self.close()

    def __enter__(self) -> SharedRing:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _spin_until(condition: Callable[[], bool], seconds: float) -> bool:
    """Poll ``condition`` for up to ``seconds`` of busy waiting."""
    if condition():
        return True
    if seconds <= 0:
        return False
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        if condition():
            return True
    return False


def _drain_eventfd(fd: int) -> None:
    try:
        os.eventfd_read(fd)
    except BlockingIOError:
        pass


def _wait_fds(bell: int, lifeline: int | None, timeout: float | None) -> bool:
    """Sleep until ``bell`` rings or ``lifeline`` ends; True if the lifeline ended."""
    poller = select.poll()
    poller.register(bell, select.POLLIN)
    if lifeline is not None:
        poller.register(lifeline, select.POLLIN)
    timeout_ms = None if timeout is None else max(0, int(timeout * 1000 + 0.999))
    gone = False
    for fd, _event in poller.poll(timeout_ms):
        if fd == bell:
            _drain_eventfd(bell)
        else:
            gone = True
    return gone


class Producer:
    """The writing side of a ring. One per ring, used from one thread.

    Writing and publishing are separate: `push` / `push_many` copy records in
    and advance a private head; `flush` makes them visible to the consumer
    (one atomic store) and rings its doorbell if it sleeps.  Call `flush` once
    per batch, e.g. once per event-loop iteration.  When the ring runs out of
    space, the pushes flush by themselves, so what they wrote can drain.
    """

    def __init__(self, ring: SharedRing) -> None:
        self.ring = ring
        self._mm = ring.mm
        self._capacity = ring.capacity
        self._mask = ring.capacity - 1
        self._max_message = ring.max_message
        # Larger messages are chunked rather than waiting for a hole this big.
        self._chunk_above = ring.capacity // 4
        self._head = ring.head.load_acquire()
        self._published = self._head
        self._tail = ring.tail.load_acquire()
        # A message of which some chunks are already in the ring.
        self._partial_payload: object = None
        self._partial_offset = 0
        #: Times this side rang the consumer's doorbell / slept waiting for space.
        self.doorbells = 0
        self.space_sleeps = 0

    # -- writing ---------------------------------------------------------

    def push(self, kind: int, peer: int, payload: bytes, flags: int = 0) -> bool:
        """Write one record; False if the ring has no room for (the rest of) it now."""
        return self.push_many(((kind, peer, flags, payload),)) == 1

    def push_many(self, records: Sequence[Record], start: int = 0) -> int:
        """Write ``records[start:]`` as far as they fit; return the index of the first not taken.

        A record that did not fit may have been taken in part (the first
        chunks of a large message): the next call must start with that same
        record, which it then completes.  Nothing is ever dropped or
        overwritten.
        """
        mm = self._mm
        capacity = self._capacity
        max_message = self._max_message
        head = self._head
        tail = self._tail
        count = len(records)
        i = start
        if self._partial_payload is not None and i < count:
            # Finish the message whose first chunks the last call wrote.
            kind, peer, flags, payload = records[i]
            if not self._push_slow(kind, peer, flags, payload):
                return i
            head = self._head
            tail = self._tail
            i += 1
        push_records = _fastring.push_records
        while i < count:
            i, head = push_records(mm, capacity, head, tail, records, i, max_message)
            if i == count:
                break
            # The C loop stopped at a record it does not take: check it, then wrap,
            # chunk or wait here.
            kind, peer, flags, payload = records[i]
            size = len(payload)
            if not (0 < kind <= KIND_MAX and 0 <= flags <= FLAGS_MAX and size <= max_message):
                self._head = head
                self._reject(kind, flags, size)
            self._head = head
            if not self._push_slow(kind, peer, flags, payload):
                return i
            head = self._head
            tail = self._tail
            i += 1
        self._head = head
        return i

    def _reject(self, kind: int, flags: int, size: int) -> None:
        if size > self._max_message:
            raise MessageTooLarge(f"{size}-byte message exceeds the ring's max_message")
        if not 0 < kind <= KIND_MAX:
            raise ValueError(f"record kind must be 1..{KIND_MAX} (0 is the ring's pad): {kind}")
        raise ValueError(f"record flags must be 0..{FLAGS_MAX} (top bit reserved): {flags}")

    def _push_slow(self, kind: int, peer: int, flags: int, payload: bytes) -> bool:
        """Wrap, chunk or wait for the consumer; True once the record is completely in."""
        if self._partial_payload is not None and self._partial_payload is not payload:
            raise RuntimeError(
                "push after a partial push must start with the record that was not taken"
            )
        size = len(payload)
        offset = self._partial_offset
        capacity = self._capacity
        chunked = offset > 0 or _aligned(HEADER_SIZE + size) > self._chunk_above
        while True:
            remaining = size - offset
            need = _aligned(HEADER_SIZE + remaining)
            pos = self._head & self._mask
            contiguous = capacity - pos
            free = capacity - (self._head - self._tail)
            if need <= contiguous and need <= free:
                self._write(pos, kind, peer, flags, payload, offset, remaining, size)
                self._head += need
                self._partial_payload = None
                self._partial_offset = 0
                return True
            room = min(contiguous, free)  # a multiple of 8, and < need
            if chunked and room >= HEADER_SIZE + _MIN_CHUNK_PAYLOAD:
                # Stream a large message: fill the room with its next chunk.
                piece = room - HEADER_SIZE
                self._write(pos, kind, peer, flags | _MORE, payload, offset, piece, size)
                self._head += room
                offset += piece
                self._partial_payload = payload
                self._partial_offset = offset
                continue
            if need > contiguous and contiguous <= free:
                # The record does not fit before the end: pad to the end, go on at 0.
                if contiguous >= HEADER_SIZE:
                    _HEADER.pack_into(self._mm, _DATA_OFF + pos, 0, 0, _PAD_KIND, 0, 0)
                self._head += contiguous
                continue
            tail = self.ring.tail.load_acquire()
            if tail == self._tail:
                # Full: publish what is written so the consumer can drain it.
                self.flush()
                return False
            self._tail = tail

    def _write(
        self,
        pos: int,
        kind: int,
        peer: int,
        flags: int,
        payload: bytes,
        offset: int,
        length: int,
        total: int,
    ) -> None:
        start = _DATA_OFF + pos
        _HEADER.pack_into(self._mm, start, length, peer, kind, flags, total)
        start += HEADER_SIZE
        if offset == 0 and length == len(payload):
            self._mm[start : start + length] = payload
        else:
            self._mm[start : start + length] = memoryview(payload)[offset : offset + length]

    # -- publishing ------------------------------------------------------

    def flush(self) -> None:
        """Publish everything written so far and wake the consumer if it sleeps."""
        if self._head == self._published:
            return
        ring = self.ring
        # seq_cst, not just release: this store must not pass the load below (Dekker).
        ring.head.store(self._head)
        self._published = self._head
        if ring.consumer_sleeping.load():
            os.eventfd_write(ring.fds.data_bell, 1)
            self.doorbells += 1

    # -- waiting for space -------------------------------------------------

    def space_fileno(self) -> int:
        """The eventfd that becomes readable when the consumer freed space after `arm_space`."""
        return self.ring.fds.space_bell

    def arm_space(self) -> bool:
        """Ask to be woken (``space_fileno``) when space frees; True if some already did."""
        self.flush()
        ring = self.ring
        ring.producer_waiting.store(1)
        tail = ring.tail.load()
        if tail != self._tail:
            self._tail = tail
            ring.producer_waiting.store(0)
            return True
        return False

    def disarm_space(self) -> None:
        """Call when woken through `space_fileno`: reset the bell and the request."""
        _drain_eventfd(self.ring.fds.space_bell)
        self.ring.producer_waiting.store(0)

    def wait_for_space(
        self, timeout: float | None = None, lifeline: int | None = None, spin: float = SPIN_SECONDS
    ) -> bool:
        """Block until the consumer frees space; False on timeout.

        Spins for ``spin`` seconds before it sleeps, as `Consumer.wait` does.
        Raises `PeerGone` if ``lifeline`` (the watch end of the consumer's
        lifeline) ends while waiting.
        """
        self.flush()
        if _spin_until(self._tail_moved, spin):
            return True
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if self.arm_space():
                return True
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            self.space_sleeps += 1
            try:
                gone = _wait_fds(self.ring.fds.space_bell, lifeline, left)
            finally:
                self.ring.producer_waiting.store(0)
            tail = self.ring.tail.load_acquire()
            if tail != self._tail:
                self._tail = tail
                return True
            if gone:
                raise PeerGone("the consumer of this ring has exited")
            if left == 0.0:
                return False
            # A stale ring from an earlier wake-up: sleep again for the rest.

    def _tail_moved(self) -> bool:
        tail = self.ring.tail.load_acquire()
        if tail == self._tail:
            return False
        self._tail = tail
        return True

    def push_all(
        self,
        records: Sequence[Record],
        timeout: float | None = None,
        lifeline: int | None = None,
    ) -> None:
        """Write and publish all ``records``, waiting for space as needed (blocking).

        Raises `TimeoutError` if the consumer frees no space for ``timeout``
        seconds, `PeerGone` if it exits.
        """
        i = self.push_many(records)
        while i < len(records):
            if not self.wait_for_space(timeout, lifeline):
                raise TimeoutError(f"no space in the ring for {timeout} s")
            i = self.push_many(records, i)
        self.flush()


class Consumer:
    """The reading side of a ring. One per ring, used from one thread."""

    def __init__(self, ring: SharedRing) -> None:
        self.ring = ring
        self._mm = ring.mm
        self._mask = ring.capacity - 1
        self._capacity = ring.capacity
        self._max_message = ring.max_message
        self._tail = ring.tail.load_acquire()
        # Chunks of a message still being reassembled.
        self._parts: list[bytes] = []
        self._part_header: tuple[int, int, int, int] | None = None
        #: Times `wait` slept on the doorbell.
        self.sleeps = 0

    def fileno(self) -> int:
        """The data doorbell (an eventfd), for ``select`` or ``loop.add_reader``."""
        return self.ring.fds.data_bell

    def pop_all(self, max_records: int | None = None) -> list[Record]:
        """Take every complete record published so far (at most ``max_records``)."""
        ring = self.ring
        head = ring.head.load_acquire()
        tail = self._tail
        if head == tail:
            return []
        limit = (1 << 62) if max_records is None else max_records
        mm = self._mm
        mask = self._mask
        capacity = self._capacity
        if self._part_header is None:
            # The common records in C; it stops at a chunk, which the loop below takes.
            out, tail, stop = _fastring.pop_records(mm, capacity, tail, head, limit)
            if stop == _fastring.STOP_CORRUPT:
                raise RingCorrupted(f"a record at {tail} runs past the data")
        else:
            out = []
        unpack_from = _HEADER.unpack_from
        append = out.append
        while tail < head and len(out) < limit:
            pos = tail & mask
            contiguous = capacity - pos
            if contiguous < HEADER_SIZE:
                tail += contiguous
                continue
            start = _DATA_OFF + pos
            size, peer, kind, flags, total = unpack_from(mm, start)
            if kind == _PAD_KIND:
                tail += contiguous
                continue
            need = (HEADER_SIZE + size + 7) & ~7
            if need > contiguous or tail + need > head:
                raise RingCorrupted(f"record of {size} bytes at {tail} runs past the data")
            start += HEADER_SIZE
            payload = mm[start : start + size]
            tail += need
            if flags & _MORE or self._part_header is not None:
                record = self._reassemble(kind, peer, flags, total, payload)
                if record is not None:
                    append(record)
            else:
                append((kind, peer, flags, payload))
        self._tail = tail
        # seq_cst: the store must not pass the load of producer_waiting (Dekker).
        ring.tail.store(tail)
        if ring.producer_waiting.load():
            os.eventfd_write(ring.fds.space_bell, 1)
        return out

    def _reassemble(
        self, kind: int, peer: int, flags: int, total: int, payload: bytes
    ) -> Record | None:
        if self._part_header is None:
            if total > self._max_message:
                raise RingCorrupted(f"chunked message of {total} bytes exceeds max_message")
            self._part_header = (kind, peer, flags & ~_MORE, total)
        elif self._part_header != (kind, peer, flags & ~_MORE, total):
            raise RingCorrupted("a chunk does not belong to the message being reassembled")
        self._parts.append(payload)
        if flags & _MORE:
            return None
        kind, peer, flags, total = self._part_header
        message = b"".join(self._parts)
        self._parts = []
        self._part_header = None
        if len(message) != total:
            raise RingCorrupted(f"reassembled {len(message)} bytes, expected {total}")
        return (kind, peer, flags, message)

    @property
    def in_message(self) -> bool:
        """True between the chunks of a message: some taken, the rest still to come.

        A consumer that hands the ring to another process must wait until this
        is False: the other one starts at a record, not inside a message.
        """
        return self._part_header is not None

    def has_records(self) -> bool:
        """True if something is published and not yet popped (maybe a part of a message)."""
        return self.ring.head.load_acquire() != self._tail

    # -- sleeping ------------------------------------------------------------

    def arm(self) -> bool:
        """Announce that this side is about to sleep on `fileno`.

        Returns True if records arrived meanwhile: then do not sleep, pop
        them.  For event loops: call after each drain; when the doorbell
        fires, call `disarm` and drain again.
        """
        ring = self.ring
        ring.consumer_sleeping.store(1)
        if ring.head.load() != self._tail:
            ring.consumer_sleeping.store(0)
            return True
        return False

    def disarm(self) -> None:
        """Reset the doorbell and the sleeping flag after waking up."""
        _drain_eventfd(self.ring.fds.data_bell)
        self.ring.consumer_sleeping.store(0)

    def wait(
        self, timeout: float | None = None, lifeline: int | None = None, spin: float = SPIN_SECONDS
    ) -> bool:
        """Block until records are published; False on timeout.

        Watches ``head`` for ``spin`` seconds first (a producer on another
        core usually publishes within microseconds, and sleeping costs two
        system calls and a wake-up), then sleeps on the doorbell.  Raises
        `PeerGone` if ``lifeline`` (the watch end of the producer's lifeline)
        has ended and every record it published was popped.
        """
        if _spin_until(self.has_records, spin):
            return True
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if self.has_records() or self.arm():
                return True
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            self.sleeps += 1
            try:
                gone = _wait_fds(self.ring.fds.data_bell, lifeline, left)
            finally:
                self.ring.consumer_sleeping.store(0)
            if self.has_records():
                return True
            if gone:
                raise PeerGone("the producer of this ring has exited")
            if left == 0.0:
                return False
            # A stale ring from an earlier wake-up: sleep again for the rest.

    def pop_wait(self, timeout: float | None = None, lifeline: int | None = None) -> list[Record]:
        """`pop_all`, blocking up to ``timeout`` seconds while nothing is there."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            records = self.pop_all()
            if records:
                return records
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return []
            self.wait(left, lifeline)
