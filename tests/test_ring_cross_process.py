"""The ring between this process and a freshly started one: stress, doorbells, deaths."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import time
import zlib

import pytest
import uvloop

from wsfleet.ipc import Consumer, Lifeline, PeerGone, Producer, SharedRing
from wsfleet.ipc.aio import RingReader

from .conftest import shm_entries
from .ring_peer import STAMP

STRESS_RECORDS = 2_000_000


def start_peer(spawn, role: str, ring: SharedRing, *args: str, **kwargs):
    """Start ring_peer.py in ``role``; return (process, watch fd of its lifeline, our lifeline)."""
    theirs = Lifeline()  # the peer holds it: we learn when it dies
    ours = Lifeline()  # we hold it: the peer learns when we die
    proc = spawn(
        "ring_peer.py",
        role,
        ring.fds.encode(),
        str(ours.watch_fd),
        *args,
        pass_fds=(*ring.fds, theirs.hold_fd, ours.watch_fd),
        **kwargs,
    )
    theirs.release_hold()
    os.close(ours.watch_fd)
    ours.watch_fd = -1
    return proc, theirs, ours


@pytest.mark.timeout(120)
def test_two_million_records_cross_cores_without_loss(spawn, pinned_cpus) -> None:
    peer_cpu = pinned_cpus[1] if pinned_cpus else -1
    seed = random.randrange(2**32)
    rng = random.Random(seed ^ 0x5EED)
    with SharedRing.create(4096, max_message=64 * 1024) as ring:
        proc, theirs, ours = start_peer(
            spawn,
            "produce-stream",
            ring,
            str(seed),
            str(STRESS_RECORDS),
            str(peer_cpu),
            stdout=subprocess.PIPE,
            text=True,
        )
        consumer = Consumer(ring)
        expected = 0
        chunked = 0
        started = time.monotonic()
        try:
            while expected < STRESS_RECORDS:
                records = consumer.pop_all()
                for kind, peer, flags, payload in records:
                    seq, crc = STAMP.unpack_from(payload)
                    assert seq == expected, f"seed {seed}: got record {seq}, expected {expected}"
                    assert zlib.crc32(payload[STAMP.size :]) == crc, f"seed {seed}: record {seq}"
                    assert (kind, peer, flags) == (seq % 65535 + 1, seq & 0x7FFFFFFF, seq & 0x7FFF)
                    chunked += len(payload) > 4096
                    expected += 1
                if not records:
                    assert consumer.wait(10.0, theirs.watch_fd), f"stalled at record {expected}"
                elif rng.random() < 0.001:
                    time.sleep(rng.uniform(0, 0.002))  # fall behind: the ring fills
            elapsed = time.monotonic() - started
            out, _ = proc.communicate(timeout=30)
            assert proc.returncode == 0
            assert consumer.pop_all() == []
        finally:
            theirs.close()
            ours.close()
    space_sleeps, doorbells = map(int, out.split())
    print(
        f"{STRESS_RECORDS} records in {elapsed:.1f} s; consumer slept {consumer.sleeps} times "
        f"({doorbells} doorbells), producer slept for space {space_sleeps} times, "
        f"{chunked} chunked messages"
    )
    # Every path was exercised: doorbell sleeps, full-ring sleeps, chunking.
    assert consumer.sleeps > 0 and doorbells > 0 and space_sleeps > 0 and chunked > 0
    assert elapsed < 60


@pytest.mark.timeout(60)
def test_sigkill_of_the_producer_is_reported_within_a_second(spawn) -> None:
    shm_before = shm_entries()
    with SharedRing.create(1 << 16) as ring:
        proc, theirs, ours = start_peer(spawn, "produce-forever", ring)
        consumer = Consumer(ring)
        received = 0
        try:
            while received < 20_000:
                received += len(consumer.pop_wait(10.0, theirs.watch_fd))
            os.kill(proc.pid, signal.SIGKILL)
            killed_at = time.monotonic()
            with pytest.raises(PeerGone):
                while time.monotonic() - killed_at < 5:
                    consumer.pop_all()
                    consumer.wait(0.25, theirs.watch_fd)
            reported_after = time.monotonic() - killed_at
        finally:
            theirs.close()
            ours.close()
        proc.wait(timeout=5)
    assert reported_after < 1.0
    assert shm_entries() == shm_before


@pytest.mark.timeout(60)
def test_sigkill_of_the_consumer_stops_a_waiting_producer(spawn) -> None:
    shm_before = shm_entries()
    with SharedRing.create(4096) as ring:
        proc, theirs, ours = start_peer(spawn, "consume-forever", ring)
        producer = Producer(ring)
        batch = [(1, i, 0, bytes(100)) for i in range(64)]
        try:
            for _ in range(200):
                producer.push_all(batch, timeout=10.0, lifeline=theirs.watch_fd)
            os.kill(proc.pid, signal.SIGKILL)
            killed_at = time.monotonic()
            with pytest.raises(PeerGone):
                for _ in range(1000):  # the ring fills; the wait then sees the lifeline end
                    producer.push_all(batch, timeout=5.0, lifeline=theirs.watch_fd)
            reported_after = time.monotonic() - killed_at
        finally:
            theirs.close()
            ours.close()
        proc.wait(timeout=5)
    assert reported_after < 1.0
    assert shm_entries() == shm_before


@pytest.mark.timeout(60)
def test_a_peer_exits_when_the_test_process_lifeline_ends(spawn) -> None:
    with SharedRing.create(4096) as ring:
        proc, theirs, ours = start_peer(spawn, "consume-forever", ring)
        ours.close()  # as if this process had died: the peer's wait raises PeerGone
        assert proc.wait(timeout=5) != 0
        theirs.close()


@pytest.mark.timeout(120)
def test_uvloop_reader_gets_every_record_then_learns_the_producer_is_gone(
    spawn, pinned_cpus
) -> None:
    count = 200_000
    peer_cpu = pinned_cpus[1] if pinned_cpus else -1
    with SharedRing.create(1 << 14, max_message=64 * 1024) as ring:
        proc, theirs, ours = start_peer(
            spawn, "produce-stream", ring, "7", str(count), str(peer_cpu), stdout=subprocess.PIPE
        )
        consumer = Consumer(ring)
        seen: list[int] = []
        loop = uvloop.new_event_loop()
        gone = loop.create_future()

        def on_records(records) -> None:
            seen.extend(STAMP.unpack_from(payload)[0] for _k, _p, _f, payload in records)

        reader = RingReader(
            loop,
            consumer,
            on_records,
            lifeline=theirs.watch_fd,
            on_gone=lambda: gone.set_result(len(seen)),
        )
        try:
            reader.start()
            delivered = loop.run_until_complete(asyncio.wait_for(gone, 60))
        finally:
            reader.stop()
            loop.close()
            theirs.close()
            ours.close()
        assert proc.wait(timeout=10) == 0
    assert delivered == count
    assert seen == list(range(count))
