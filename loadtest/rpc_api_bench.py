"""The RPC layer alone, in-process: microseconds per ``ping`` call into
``wsfleet.MultiplayerAPI`` and its ``pong`` reply, by the number of connected peers.

    python -m wsfleet.loadtest.rpc_api_bench [--peers 1,50,1000,10000] [--calls 100000]
        [--runs 5]

The API sends through `NullPeer`, a ``PacketPeer`` that only counts packets, so the
figure is the API's own work for one call: the header checks, the path-cache lookup,
the mode and arity checks, decoding two INT Variants, running `rpc_bench.Bench.ping`,
which answers with ``rpc_id(sender, ...)``: encoding two Variants, choosing the
targets, and the put. ``rpc_bench`` measures the same call through a whole server;
this one shows where the API's share goes as the peers grow. Medians of ``--runs``.

May import `rpc_bench` and the public API of ``wsfleet``.
"""

from __future__ import annotations

import argparse
import statistics
import struct
import sys
import time

import wsfleet
from wsfleet.loadtest.rpc_bench import NODE, Bench

CALLER = 2


class NullPeer:
    """The peers the API sees; every packet is counted and dropped."""

    def __init__(self, peers: int) -> None:
        self.ids = list(range(CALLER, CALLER + peers))
        self.packets = 0

    def set_target_peer(self, peer_id: int) -> None:
        pass

    def put_packet(self, data: bytes) -> None:
        self.packets += 1

    def peer_ids(self) -> list[int]:
        return self.ids

    def peer_count(self) -> int:
        return len(self.ids)

    def has_peer(self, peer_id: int) -> bool:
        return CALLER <= peer_id < CALLER + len(self.ids)


def ping(seq: int) -> bytes:
    """``ping(seq, 0)`` by path id 1, as `rpc_bench` clients send it."""
    return b"\x00\x01\x00\x00\x00ping\x00\x02" + struct.pack("<IiIi", 2, seq, 2, 0)


def us_per_call(peers: int, calls: int) -> float:
    """One run: ``calls`` pings from one peer among ``peers``, every path confirmed."""
    null = NullPeer(peers)
    mp = wsfleet.MultiplayerAPI(null)
    mp.register_node("/root/" + NODE, Bench(mp))
    for peer_id in null.ids:
        mp.peer_connected(peer_id)
    mp.process(CALLER, b"\x02\x01\x00\x00\x00" + NODE.encode() + b"\0")  # SIMPLIFY_PATH
    mp.process(CALLER, ping(0))  # the reply's path goes out
    mp.process(CALLER, b"\x03" + NODE.encode() + b"\0")  # CONFIRM_PATH of it
    packet = ping(1)
    process = mp.process
    start = time.perf_counter()
    for _ in range(calls):
        process(CALLER, packet)
    elapsed = time.perf_counter() - start
    if null.packets != calls + 3 or any(mp.stats().values()):
        raise RuntimeError(f"{null.packets} packets, drops {mp.stats()}")
    return 1e6 * elapsed / calls


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--peers", default="1,50,1000,10000")
    parser.add_argument("--calls", type=int, default=100_000)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args(argv)
    counts = [int(p) for p in args.peers.split(",")]
    if args.calls < 1 or args.runs < 1 or min(counts) < 1:
        parser.error("--calls, --runs and every --peers count must be >= 1")
    print(f"{'peers':>7} {'us/call':>9} {'calls/s':>10}   (median of {args.runs} runs)")
    for peers in counts:
        calls = max(1000, args.calls * 50 // max(peers, 50))  # each run about as long
        us = statistics.median(us_per_call(peers, calls) for _ in range(args.runs))
        print(f"{peers:>7,} {us:>9.2f} {1e6 / us:>10,.0f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
