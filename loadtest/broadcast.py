"""The broadcast scenario: fan-out, deliveries/s and delivery latency.

``connections`` clients; the first ``senders`` of them each keep ``inflight``
broadcasts outstanding. A broadcast is one binary message of ``size`` bytes
(sender index, sequence number and ``time.monotonic_ns()`` at send, then padding)
that the server must forward to every *other* client: ``connections - 1``
deliveries. When the last of them arrives, its sender sends the next one, so no
more than ``senders x inflight`` broadcasts are in flight (and no more messages
than that queue towards one client). Deliveries are counted over ``seconds`` after
``warmup``; one in ``LATENCY_STRIDE`` of them gives a latency (receive time - the
send time in the payload). Every delivery is checked: opcode, length, padding, a
sender that is not the receiver, and per (sender, receiver) the next sequence
number (a lost, duplicated or reordered delivery is an error). After the window
the senders stop and the outstanding deliveries drain (bounded); those that never
came are ``missing``. One load process: a broadcast completes only when all its
receivers have it.

`run_broadcast` is the load itself as a plain function call (the scenario tests
call it); `BroadcastScenario` is how the front ends run it.

May import `counters`, `loadclient`, `loadprocs`, `report`, `scenario` and `wsclient`.
"""

from __future__ import annotations

import argparse
import asyncio
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from wsfleet.loadtest import loadclient
from wsfleet.loadtest.counters import MAX_LATENCY_SAMPLES, Counters, LoadState, cpu_figures
from wsfleet.loadtest.loadclient import close_connections, on_uvloop, run_window
from wsfleet.loadtest.loadprocs import Load
from wsfleet.loadtest.report import Column, Table
from wsfleet.loadtest.scenario import ProcessScenario
from wsfleet.loadtest.wsclient import OP_BINARY, WSConnection, build_frame

# Broadcast payload head: sender index, sequence number (from 1), send time (monotonic ns).
BROADCAST_HEAD = struct.Struct("<IIq")
MIN_BROADCAST_SIZE = BROADCAST_HEAD.size
# Keep one latency in this many deliveries.
LATENCY_STRIDE = 4


@dataclass(kw_only=True)
class BroadcastCounts(Counters):
    """Client-side accounting of one broadcast run (`counters.Counters`: sent counts
    broadcasts, received valid deliveries, latencies send to delivery).
    ``expected = sent x (connections - 1)``, and after the drain ``received + missing ==
    expected`` unless something unexpected arrived."""

    connections: int
    senders: int
    size: int
    inflight: int  # per sender
    completed: int = 0  # broadcasts every other client received
    window_completed: int = 0
    expected: int = 0
    missing: int = 0  # deliveries still outstanding after the drain
    sequence_errors: int = 0

    @property
    def delivered(self) -> int:
        return self.received

    @property
    def broadcasts_per_s(self) -> float:
        return self.window_completed / self.window_s if self.window_s > 0 else 0.0


class _BroadcastLoad(LoadState):
    """The counts and the broadcasts in flight, shared by the connections of one run."""

    def __init__(self, connections: int, senders: int, size: int) -> None:
        super().__init__()
        self.senders = senders
        self.size = size
        self.fanout = connections - 1
        self.pad = b"." * (size - BROADCAST_HEAD.size)
        self.conns: list[BroadcastConnection] = []
        self.next_seq = [0] * senders
        self.outstanding: dict[int, int] = {}  # (sender << 32 | seq) -> deliveries to come
        self.completed = 0
        self.window_completed = 0
        self.sequence_errors = 0

    def send_next(self, sender: int) -> None:
        conn = self.conns[sender]
        if not conn.is_open:
            return
        seq = self.next_seq[sender] + 1
        self.next_seq[sender] = seq
        self.outstanding[(sender << 32) | seq] = self.fanout
        self.sent += 1
        payload = BROADCAST_HEAD.pack(sender, seq, time.monotonic_ns()) + self.pad
        conn.send_raw(build_frame(OP_BINARY, payload))

    def completed_one(self, sender: int) -> None:
        self.completed += 1
        if self.measuring:
            self.window_completed += 1
        if self.sending:
            self.send_next(sender)


class BroadcastConnection(WSConnection):
    """One client: checks every delivery and completes broadcasts for the run."""

    def __init__(
        self, host: str, port: int, *, load: _BroadcastLoad, index: int, path: str = "/"
    ) -> None:
        super().__init__(host, port, path)
        self.load = load
        self.index = index
        self.last_seq = [0] * load.senders  # the last sequence number from each sender
        self.now_ns = 0

    def start(self, inflight: int) -> None:
        """A sender's first ``inflight`` broadcasts (`loadclient.run_window`)."""
        for _ in range(inflight):
            self.load.send_next(self.index)

    def data_received(self, data: bytes) -> None:
        # One clock read per socket read: deliveries that arrive together share it.
        self.now_ns = time.monotonic_ns()
        super().data_received(data)

    def on_message(self, opcode: int, payload: bytes) -> None:
        load = self.load
        if opcode != OP_BINARY or len(payload) != load.size:
            load.error(
                f"client {self.index}: opcode {opcode} with {len(payload)} bytes "
                f"(expected {OP_BINARY} with {load.size})"
            )
            return
        sender, seq, sent_ns = BROADCAST_HEAD.unpack_from(payload)
        if sender >= load.senders or sender == self.index:
            load.error(f"client {self.index}: a delivery from sender {sender}")
            return
        if payload[BROADCAST_HEAD.size :] != load.pad:
            load.error(f"client {self.index}: padding differs in {sender}/{seq}")
            return
        last = self.last_seq[sender]
        if seq != last + 1:
            load.sequence_errors += 1
            load.error(f"client {self.index}: from sender {sender} seq {seq} after {last}")
        if seq > last:
            self.last_seq[sender] = seq
        key = (sender << 32) | seq
        remaining = load.outstanding.get(key)
        if remaining is None:
            load.error(f"client {self.index}: {sender}/{seq} was not outstanding (duplicate?)")
            return
        load.received += 1
        if load.measuring and not load.received % LATENCY_STRIDE:
            if len(load.latencies) < MAX_LATENCY_SAMPLES:
                load.latencies.append((self.now_ns - sent_ns) // 1000)
        if remaining == 1:
            del load.outstanding[key]
            load.completed_one(sender)
        else:
            load.outstanding[key] = remaining - 1

    def on_close(self, code: int | None, reason: str) -> None:
        if self.load.sending:
            self.load.error(f"server closed client {self.index} during the run ({code} {reason!r})")


@on_uvloop
async def _broadcast(
    host: str,
    port: int,
    *,
    connections: int,
    senders: int,
    size: int,
    inflight: int,
    seconds: float,
    warmup: float,
    settle: float,
    start_at: Callable[[], float] | None,
    connect_timeout: float,
    drain_timeout: float,
    path: str,
) -> BroadcastCounts:
    load = _BroadcastLoad(connections, senders, size)
    result = BroadcastCounts(connections=connections, senders=senders, size=size, inflight=inflight)
    async with loadclient.connections(
        load,
        result,
        host,
        port,
        BroadcastConnection,
        connections,
        lambda i: {"load": load, "index": i},
        timeout=connect_timeout,
        path=path,
    ) as conns:
        load.conns = conns
        # Let the server register every client: a broadcast that reaches a server which does
        # not know a client yet would miss that client.
        await asyncio.sleep(settle)
        # Blocking is fine here: nothing is in flight until the start time.
        t_go = start_at() if start_at is not None else time.monotonic()
        await run_window(load, conns[:senders], inflight, t_go, warmup, seconds, result)
        result.window_completed = load.window_completed

        # Drain (bounded): every outstanding broadcast should reach its last client.
        deadline = time.monotonic() + drain_timeout
        while load.outstanding and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
        result.missing = sum(load.outstanding.values())
        if result.missing:
            load.error(
                f"{result.missing} deliveries still missing {drain_timeout:g} s after the load"
            )
        await close_connections(conns, drain_timeout)
    result.completed = load.completed
    result.expected = load.sent * load.fanout
    result.sequence_errors = load.sequence_errors
    return result


def run_broadcast(
    host: str,
    port: int,
    *,
    connections: int = 100,
    senders: int = 10,
    size: int = 64,
    inflight: int = 2,
    seconds: float = 3.0,
    warmup: float = 1.0,
    settle: float = 0.2,
    start_at: Callable[[], float] | None = None,
    connect_timeout: float = 10.0,
    drain_timeout: float = 5.0,
    path: str = "/",
) -> BroadcastCounts:
    """Run the broadcast scenario against ``ws://host:port/path`` on a fresh uvloop loop.

    Opens the connections, waits ``settle``, then calls ``start_at()`` (if given; it
    may block) for the ``time.monotonic()`` at which to start; counts over ``[start +
    warmup, start + warmup + seconds]``; drains (bounded) and closes.
    """
    if connections < 2 or not 1 <= senders <= connections or inflight < 1:
        raise ValueError("need connections >= 2, 1 <= senders <= connections, inflight >= 1")
    if size < MIN_BROADCAST_SIZE:
        raise ValueError(f"size must be >= {MIN_BROADCAST_SIZE} (sender, sequence, time)")
    if seconds <= 0 or warmup < 0 or settle < 0:
        raise ValueError("seconds must be > 0, warmup and settle >= 0")
    return _broadcast(
        host,
        port,
        connections=connections,
        senders=senders,
        size=size,
        inflight=inflight,
        seconds=seconds,
        warmup=warmup,
        settle=settle,
        start_at=start_at,
        connect_timeout=connect_timeout,
        drain_timeout=drain_timeout,
        path=path,
    )


TABLE = Table(
    rate="deliveries_per_s",
    medians=(
        "deliveries_per_s",
        "broadcasts_per_s",
        "client_cpu_pct",
        "client_busy_pct",
        "server_cpu_pct",
        "server_us_per_delivery",
        "p50_us",
        "p99_us",
    ),
    sums=("errors", "missing"),
    columns=(
        Column("deliv/s", "deliveries_per_s", 10, ",.0f"),
        Column("", "", 14),
        Column("bcast/s", "broadcasts_per_s", 8, ",.0f"),
        Column("client CPU", "client_cpu_pct", 10, ".0f", "%"),
        Column("server CPU", "server_cpu_pct", 10, ".0f", "%"),
        Column("srv us/dlv", "server_us_per_delivery", 10, ".2f"),
        Column("p50 us", "p50_us", 8, ",.0f"),
        Column("p99 us", "p99_us", 8, ",.0f"),
        Column("errors", "errors", 6),
        Column("missing", "missing", 7),
        Column("runs", "runs_ok", 5),
    ),
    name_width=12,
)


class BroadcastScenario(ProcessScenario):
    """Every message to every other client: deliveries/s and delivery latency."""

    name = "broadcast"
    mode = "broadcast"
    table = TABLE
    seconds = 3.0
    one_process = True

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--connections", type=int, default=100)
        parser.add_argument("--senders", type=int, default=10)
        parser.add_argument("--size", type=int, default=64, help=f"bytes (>= {MIN_BROADCAST_SIZE})")
        parser.add_argument(
            "--inflight", type=int, default=2, help="broadcasts in flight per sender"
        )

    def check(self, parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
        if args.connections < 2 or not 1 <= args.senders <= args.connections:
            parser.error("need --connections >= 2 and 1 <= --senders <= --connections")
        if args.inflight < 1 or args.size < MIN_BROADCAST_SIZE:
            parser.error(f"need --inflight >= 1 and --size >= {MIN_BROADCAST_SIZE}")

    def config_text(self, args: argparse.Namespace) -> str:
        return (
            f"broadcast: {args.connections} connections, {args.senders} senders x "
            f"{args.inflight} in flight x {args.size} B, {args.warmup:g} s warm-up + "
            f"{args.seconds:g} s"
        )

    def describe(self, run: dict[str, Any]) -> str:
        return (
            f"{run['deliveries_per_s']:,.0f} deliveries/s ({run['broadcasts_per_s']:,.0f} "
            f"broadcasts/s), client CPU {run['client_cpu_pct']:.0f}%, server CPU "
            f"{run['server_cpu_pct']:.0f}% ({run['server_us_per_delivery']:.2f} us/delivery), "
            f"{run['server_processes']} server process(es), p50 {run['p50_us']:,.0f} us, "
            f"p99 {run['p99_us']:,.0f} us, delivered {run['delivered']:,}/{run['expected']:,}, "
            f"missing {run['missing']}, errors {run['errors']}"
        )

    def load(self, args: argparse.Namespace) -> Load:
        cfg = {
            "connections": args.connections,
            "senders": args.senders,
            "size": args.size,
            "inflight": args.inflight,
            "seconds": args.seconds,
            "warmup": args.warmup,
            "drain_timeout": args.drain_timeout,
        }
        return Load(run_broadcast, BroadcastCounts, [cfg], 2 * args.drain_timeout + 30)

    def figures(
        self, results: list[BroadcastCounts], server_cpu: float, window: float
    ) -> dict[str, Any]:
        (r,) = results
        rate = r.rate
        p50, p99, top = r.latency_us()
        return {
            "deliveries_per_s": rate,
            "broadcasts_per_s": r.broadcasts_per_s,
            **cpu_figures(results, server_cpu, window, rate, "delivery"),
            "p50_us": p50,
            "p99_us": p99,
            "max_us": top,
            "sent": r.sent,
            "delivered": r.received,
            "expected": r.expected,
            "missing": r.missing,
            "errors": r.errors,
            "sequence_errors": r.sequence_errors,
            "error_samples": r.error_samples,
        }


SCENARIO = BroadcastScenario()
