"""A shard's per-connection bookkeeping, in-process: the shared deadlines, and a closed
connection going by refcount (no cyclic garbage per handshake)."""

from __future__ import annotations

import asyncio
import gc

import uvloop

from wsfleet.ipc import Consumer, Producer, ShardState, SharedRing
from wsfleet.ipc.config import FleetConfig, Limits
from wsfleet.loadtest.handshake_bench import CLOSE, REQUEST, StandInTransport
from wsfleet.shards.connection import Deadlines, PeerConnection
from wsfleet.shards.worker import Shard


class Cut:
    def __init__(self, log: list[Cut]) -> None:
        self.log = log

    def _deadline_passed(self) -> None:
        self.log.append(self)


def test_deadlines_cut_those_due_in_order_and_never_a_cleared_one() -> None:
    loop = uvloop.new_event_loop()
    try:
        cut: list[Cut] = []
        deadlines = Deadlines(loop, 0.01)
        a, b, c = Cut(cut), Cut(cut), Cut(cut)
        for conn in (a, b, c):
            deadlines.add(conn)  # type: ignore[arg-type]
        deadlines.discard(b)  # type: ignore[arg-type]

        async def all_cut() -> None:
            while len(deadlines):
                await asyncio.sleep(0.005)

        loop.run_until_complete(asyncio.wait_for(all_cut(), 5))
        assert cut == [a, c]
        deadlines.add(b)  # type: ignore[arg-type]  # empty again: a fresh timer
        loop.run_until_complete(asyncio.wait_for(all_cut(), 5))
        assert cut == [a, c, b]
    finally:
        loop.close()


def test_a_closed_connection_leaves_no_cyclic_garbage() -> None:
    limits = Limits(5.0, 0, 65536, 8192, None, False, None, None)
    config = FleetConfig((), limits, None, False, 1 << 20).for_shard(0, 1)
    loop = uvloop.new_event_loop()
    events_ring, commands_ring = SharedRing.create(1 << 16), SharedRing.create(1 << 16)
    shard = Shard(loop, config, Producer(events_ring), Consumer(commands_ring), ShardState(1))
    events = Consumer(events_ring)
    gc.collect()
    gc.disable()
    try:
        for _ in range(20):
            conn = PeerConnection(shard)
            conn.connection_made(StandInTransport())
            conn.data_received(REQUEST)
            conn.data_received(CLOSE)
            conn.connection_lost(None)
        del conn
        loop.call_soon(loop.stop)
        loop.run_forever()
        assert len(events.pop_all()) == 60  # connected, close request, disconnected
        assert not shard.connections and not shard.peers
        assert gc.collect() == 0
    finally:
        gc.enable()
        shard.handshake_deadlines.cancel()
        shard.close_deadlines.cancel()
        loop.close()
