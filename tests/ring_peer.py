"""The other side of the cross-process ring tests, started as a fresh interpreter.

    ring_peer.py produce-stream FDS LIFELINE SEED COUNT CPU
    ring_peer.py produce-forever FDS LIFELINE
    ring_peer.py consume-forever FDS LIFELINE

FDS is a `RingFds.encode()` string of inherited descriptors, LIFELINE the
watch end of the test process's lifeline (the peer exits when the test does).
"""

from __future__ import annotations

import os
import random
import struct
import sys
import time
import zlib

from wsfleet.ipc import Consumer, PeerGone, Producer, RingFds, SharedRing

STAMP = struct.Struct("<QI")  # sequence number, crc32 of the rest
TIME_LIMIT = 60.0


def stress_record(seq: int, size: int, pool: bytes, offset: int) -> tuple[int, int, int, bytes]:
    body = pool[offset : offset + size]
    payload = STAMP.pack(seq, zlib.crc32(body)) + body
    return (seq % 65535 + 1, seq & 0x7FFFFFFF, seq & 0x7FFF, payload)


def random_size(rng: random.Random) -> int:
    roll = rng.random()
    if roll < 0.90:
        return rng.randrange(0, 200)
    if roll < 0.995:
        return rng.randrange(200, 3000)
    return rng.randrange(3000, 40000)  # far larger than the test's ring: chunked


def produce_stream(ring: SharedRing, lifeline: int, seed: int, count: int) -> None:
    rng = random.Random(seed)
    pool = rng.randbytes(1 << 17)
    producer = Producer(ring)
    seq = 0
    while seq < count:
        batch = []
        for _ in range(min(rng.randrange(1, 64), count - seq)):
            size = random_size(rng)
            batch.append(stress_record(seq, size, pool, rng.randrange(0, len(pool) - size)))
            seq += 1
        taken = producer.push_many(batch)
        while taken < len(batch):
            if not producer.wait_for_space(5.0, lifeline):
                raise SystemExit("consumer freed no space for 5 s")
            taken = producer.push_many(batch, taken)
        producer.flush()
        if rng.random() < 0.002:
            # Go quiet now and then, so the consumer drains and sleeps on the doorbell.
            time.sleep(rng.uniform(0, 0.003))
    print(f"{producer.space_sleeps} {producer.doorbells}", flush=True)


def produce_forever(ring: SharedRing, lifeline: int) -> None:
    producer = Producer(ring)
    deadline = time.monotonic() + TIME_LIMIT
    seq = 0
    while time.monotonic() < deadline:
        batch = [(1, seq + i, 0, STAMP.pack(seq + i, 0)) for i in range(32)]
        producer.push_all(batch, timeout=5.0, lifeline=lifeline)
        seq += len(batch)


def consume_forever(ring: SharedRing, lifeline: int) -> None:
    consumer = Consumer(ring)
    deadline = time.monotonic() + TIME_LIMIT
    while time.monotonic() < deadline:
        consumer.pop_wait(1.0, lifeline)


def main(argv: list[str]) -> None:
    role, fds, lifeline = argv[0], RingFds.decode(argv[1]), int(argv[2])
    ring = SharedRing.attach(fds)
    try:
        if role == "produce-stream":
            seed, count, cpu = int(argv[3]), int(argv[4]), int(argv[5])
            if cpu >= 0:
                os.sched_setaffinity(0, {cpu})
            produce_stream(ring, lifeline, seed, count)
        elif role == "produce-forever":
            produce_forever(ring, lifeline)
        elif role == "consume-forever":
            consume_forever(ring, lifeline)
        else:
            raise SystemExit(f"unknown role {role!r}")
    except PeerGone:
        raise SystemExit("the test process is gone") from None
    finally:
        ring.close()


if __name__ == "__main__":
    main(sys.argv[1:])
