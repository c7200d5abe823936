"""Micro-benchmark of a shard's handshake path: upgrade + close cycles, in-process.

Not a test.  Runs ``--cycles`` connections through `PeerConnection` of a real
`Shard` (its rings and shared state; a stand-in transport, no sockets): accept,
upgrade request, 101, a close frame, connection lost.  Prints the best and the
median time per cycle over ``--rounds``.  To compare two versions, run it
under each (e.g. ``PYTHONPATH=`` an install of the other), interleaved::

    python -m wsfleet.loadtest.handshake_bench [--cycles 5000] [--rounds 7] [--label new]

It measures what the log options cost a handshake when they are off;
``--max-peers-per-address N`` measures what that limit costs when it is on
(every cycle's connection comes from one address: N above ``--cycles``).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import statistics
import time

import uvloop

from wsfleet.ipc import Consumer, Producer, ShardState, SharedRing
from wsfleet.ipc.config import FleetConfig, Limits
from wsfleet.shards.connection import PeerConnection
from wsfleet.shards.worker import Shard

REQUEST = (
    b"GET / HTTP/1.1\r\nHost: 127.0.0.1:9080\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)
#: A masked close frame with code 1000.
CLOSE = bytes([0x88, 0x82, 1, 2, 3, 4, 0x03 ^ 1, 0xE8 ^ 2])


class StandInTransport(asyncio.Transport):
    """What PeerConnection asks of a transport, doing nothing."""

    def __init__(self) -> None:
        super().__init__()
        self.closing = False

    def get_extra_info(self, name: str, default: object = None) -> object:
        return ("127.0.0.1", 5555) if name == "peername" else default

    def write(self, data: bytes) -> None:
        pass

    def writelines(self, data: object) -> None:
        pass

    def close(self) -> None:
        self.closing = True

    def abort(self) -> None:
        self.closing = True

    def is_closing(self) -> bool:
        return self.closing

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m wsfleet.loadtest.handshake_bench")
    parser.add_argument("--cycles", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--label", default="this version")
    parser.add_argument("--max-peers-per-address", type=int, default=0, metavar="N")
    parser.add_argument("--shards", type=int, default=1, help="shards the shared state has")
    args = parser.parse_args(argv)
    limits = Limits(5.0, 0, 65536, 8192, None, False, None, None)
    if args.max_peers_per_address:  # a keyword only newer versions know
        limits = dataclasses.replace(limits, max_peers_per_address=args.max_peers_per_address)
    config = FleetConfig((), limits, None, False, 1 << 20).for_shard(0, args.shards)
    loop = uvloop.new_event_loop()
    events_ring, commands_ring = SharedRing.create(1 << 20), SharedRing.create(1 << 20)
    shard = Shard(
        loop, config, Producer(events_ring), Consumer(commands_ring), ShardState(args.shards)
    )
    events = Consumer(events_ring)

    def cycles(count: int) -> None:
        for _ in range(count):
            conn = PeerConnection(shard)
            conn.connection_made(StandInTransport())
            conn.data_received(REQUEST)
            conn.data_received(CLOSE)
            conn.connection_lost(None)
        loop.call_soon(loop.stop)
        loop.run_forever()  # the shard's flush of this batch's events
        events.pop_all()

    cycles(args.cycles)  # warm-up
    times = []
    for _ in range(args.rounds):
        started = time.perf_counter()
        cycles(args.cycles)
        times.append((time.perf_counter() - started) / args.cycles * 1e6)
    print(
        f"{args.label}: handshake + close {min(times):.2f} us best, "
        f"{statistics.median(times):.2f} us median ({args.rounds} x {args.cycles})"
    )


if __name__ == "__main__":
    main()
