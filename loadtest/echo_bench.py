"""Echo throughput and latency: wsfleet against websockets, Godot 3.2.3, Node's ws and picows.

    python -m wsfleet.loadtest.echo_bench [--runs 5] [--connections 50] [--inflight 16]
        [--size 64] [--seconds 5] [--warmup 1] [--client-procs 1] [--server-cpus 0]
        [--client-cpus 1] [--only NAMES] [--server NAME=COMMAND ...] [--godot BIN]
        [--godot-sleep-usec 0] [--node BIN] [--node-path DIR] [--text] [--json FILE]

The servers are `catalog.server_catalog`'s echo set (``--only`` picks from it, and
also takes ``wsfleet-K`` for K shards), the first being the baseline of the ratios:

* ``websockets``: ``python -m wsfleet.loadtest.ws_server --mode echo`` (websockets on uvloop);
* ``wsfleet-1``, ``wsfleet-2``: ``wsfleet serve --bind 127.0.0.1 --shards K --quiet``
  (the echo runs in the front, as a user's ``data_received`` handler would);
* ``wsfleet-K-sh`` (with ``--only``): the same with ``--shard-handler
  wsfleet.loadtest.shard_echo:echo``, the echo answered inside the shards;
* ``godot``: ``godot3-server`` running ``loadtest/godot_server.gd --wsfleet-mode=echo``
  (Godot 3.2.3's ``WebSocketServer``; with the default ``--godot-sleep-usec 0`` its main
  loop never sleeps, so its CPU figure is 100 %);
* ``node``: ``node loadtest/node_ws_server.js --mode echo`` (npm package ``ws``);
* ``picows``: ``python -m wsfleet.loadtest.picows_server`` (picows' Cython server on
  uvloop, the ``bench`` extra).

A server whose program, (Node) ``ws`` module or (picows) package is missing is reported
as skipped.
``--server NAME=COMMAND`` (``{port}``, optionally ``{host}``) replaces the set; a
leading ``python``/``python3`` means this interpreter, and a program that is not on
PATH is looked up next to it (so the venv's ``wsfleet`` is found without activating
the venv).

One run of one server: start it under ``taskset -c SERVER_CPUS`` in its own
session on a free 127.0.0.1 port, wait (bounded) until a WebSocket handshake
succeeds, start ``--client-procs`` load processes pinned (round robin) to
``--client-cpus``, which open ``--connections`` connections between them. Each
connection keeps ``--inflight`` messages of ``--size`` bytes in flight: every
echo received is checked (opcode, length and content) and replaced by a new
message. Echoes are counted over ``--seconds`` after ``--warmup``; within that
window the load processes report their own CPU time and one round-trip time in
``LATENCY_STRIDE`` (an HdrHistogram), and this process reads the server's process
tree CPU time (psutil, children included: wsfleet runs a front, a supervisor and
shards). Then the load stops, in-flight echoes drain, connections close, and the
server gets SIGTERM (SIGKILL for the whole tree after ``--stop-timeout``).

``--runs`` rounds run every server once each, in the same order, so drift on a
shared machine hits all alike; the table gives medians over the runs, with the load
processes' own CPU ("client CPU") and how busy they were ("cli busy": CPU plus the time
they were runnable but another process had the CPU). A server whose run kept the load at
90 % or more of the CPUs it had is flagged, on its row and in one sentence under the
table: its figure is a floor (the load generator, not the server, was the limit). A server
that fails to start (command not found, early exit, no handshake in time) is
reported as failed and skipped in later rounds; the others still run.

Every echo is checked against the message its connection sends (a fixed,
per-connection payload, so an echo delivered to the wrong connection is caught;
a lost or duplicated echo shows when the in-flight messages drain at the end).
The exit status is 1 if a server failed or any run counted errors.

`run_echo_load` is the load generator itself, usable as a plain function call
(the accounting test calls it); `SCENARIO` is how ``wsfleet loadtest echo`` and
``compare`` run it.

May import `bench`, `counters`, `loadclient`, `loadprocs`, `report`, `scenario` and
`wsclient`.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from itertools import repeat
from typing import Any

from wsfleet.loadtest import bench, loadclient
from wsfleet.loadtest.counters import (
    Counters,
    LoadState,
    cpu_figures,
    error_samples,
    latency_figures,
    total,
)
from wsfleet.loadtest.loadclient import close_connections, on_uvloop, run_window
from wsfleet.loadtest.loadprocs import Load, split_evenly
from wsfleet.loadtest.report import Column, Table
from wsfleet.loadtest.scenario import ProcessScenario
from wsfleet.loadtest.wsclient import OP_BINARY, OP_TEXT, WSConnection, build_frame

# Keep one round-trip time in this many: enough for p99 and bounded memory on long runs.
LATENCY_STRIDE = 4
TABLE = Table(
    rate="msgs_per_s",
    medians=(
        "msgs_per_s",
        "client_cpu_pct",
        "client_busy_pct",
        "server_cpu_pct",
        "server_us_per_msg",
        "p50_us",
        "p99_us",
    ),
    sums=("errors",),
    columns=(
        Column("msg/s", "msgs_per_s", 10, ",.0f"),
        Column("", "", 14),  # the ratio to the first server
        Column("client CPU", "client_cpu_pct", 10, ".0f", "%"),
        Column("cli busy", "client_busy_pct", 8, ".0f", "%"),
        Column("server CPU", "server_cpu_pct", 10, ".0f", "%"),
        Column("srv us/msg", "server_us_per_msg", 10, ".1f"),
        Column("p50 us", "p50_us", 8, ",.0f"),
        Column("p99 us", "p99_us", 8, ",.0f"),
        Column("errors", "errors", 6),
        Column("runs", "runs_ok", 5),
    ),
    name_width=14,
)


# -- the load generator (runs in each load process) -----------------------------------------


@dataclass
class EchoCounts(Counters):
    """What one load process saw (`counters.Counters`: sent counts messages, received
    echoes, latencies round trips)."""

    connections: int
    in_flight: int = 0  # sent - received on open connections when they were closed
    mismatches: int = 0  # errors that were a wrong echo


class _Load(LoadState):
    def __init__(self) -> None:
        super().__init__()
        self.mismatches = 0


def payload_for(index: int, size: int) -> bytes:
    """A distinct ASCII payload per connection (valid as text; an echo sent to the wrong
    connection shows up as a mismatch)."""
    unit = f"<{index}:wsfleet-echo>".encode("ascii")
    return (unit * (size // len(unit) + 1))[:size]


def server_frame(opcode: int, payload: bytes) -> bytes:
    """The frame an echo server sends back for ``payload``: final, unmasked, the shortest
    length encoding (RFC 6455 section 5.2 asks for it)."""
    n = len(payload)
    if n < 126:
        head = bytes((0x80 | opcode, n))
    elif n < 0x10000:
        head = bytes((0x80 | opcode, 126)) + n.to_bytes(2, "big")
    else:
        head = bytes((0x80 | opcode, 127)) + n.to_bytes(8, "big")
    return head + payload


# Replacement writes of up to this many bytes are built once per count (frame * k).
FRAME_CACHE_BYTES = 64 * 1024
# The echoes in flight on one connection, end to end, are kept for the fast check up to this.
FAST_CHECK_BYTES = 1 << 20


class EchoConnection(WSConnection):
    """Keeps messages in flight: every echo received is checked and answered with a new one.

    The per-read cost is what limits the load against a server that writes one frame per
    TCP segment (Godot 3.2: one socket read per message), so a read that holds only whole
    echoes, byte for byte the frames the server owes (header and payload), is checked with
    one comparison against ``inflight`` expected frames end to end, and answered with one
    write; anything else (a split frame, a control frame, another length encoding, a wrong
    echo) goes through `WSConnection.data_received`, which parses frame by frame and counts
    mismatches as errors.
    """

    def __init__(
        self, host: str, port: int, *, load: _Load, payload: bytes, opcode: int, path: str = "/"
    ) -> None:
        super().__init__(host, port, path)
        self.load = load
        self.payload = payload
        self.opcode = opcode
        # Built once and written for every message: see build_frame on reusing a masked frame.
        self.frame = build_frame(opcode, payload)
        self.echo = server_frame(opcode, payload)
        self.expected = self.echo  # `start` makes it `inflight` echoes end to end
        self.replies: list[bytes] = [b"", self.frame]
        self.sent_at: deque[float] = deque()  # send times of the messages in flight, in order
        self.now = 0.0
        self.echoed = 0

    def start(self, inflight: int) -> None:
        # The fast check needs every echo in flight end to end; past FAST_CHECK_BYTES the
        # frame by frame path checks them.
        big = len(self.echo) * inflight > FAST_CHECK_BYTES
        self.expected = b"" if big else self.echo * inflight
        if len(self.frame) * inflight <= FRAME_CACHE_BYTES:
            self.replies = [self.frame * k for k in range(inflight + 1)]
        self.sent_at.extend(repeat(time.perf_counter(), inflight))
        self.load.sent += inflight
        self.send_raw(self.frame * inflight)

    def data_received(self, data: bytes) -> None:
        # One clock read per socket read: echoes that arrive together share a receive time,
        # and their replacements that send time.
        now = time.perf_counter()
        n = len(data)
        unit = len(self.echo)
        sent_at = self.sent_at
        load = self.load
        if (
            n % unit == 0
            and self.is_open
            and not self._buf
            and self._fragments is None
            and self.expected.startswith(data)
            and len(sent_at) * unit >= n
            and n
        ):
            k = n // unit
            r0 = load.received
            load.received = r0 + k
            if load.measuring:
                latencies = load.latencies
                for i in range(r0 + 1, r0 + k + 1):
                    sent = sent_at.popleft()
                    if not i % LATENCY_STRIDE:
                        latencies.append((now - sent) * 1e6)  # microseconds
            elif k == 1:
                sent_at.popleft()
            else:
                for _ in range(k):
                    sent_at.popleft()
        else:
            self.now = now
            self.echoed = 0
            super().data_received(data)
            k = self.echoed
        if k and load.sending and self.is_open and not self._close_sent:
            # One write for all the replacements: a system call per message would make the
            # client, not the server, the bottleneck.
            sent_at.extend(repeat(now, k))
            load.sent += k
            replies = self.replies
            self.transport.write(replies[k] if k < len(replies) else self.frame * k)  # type: ignore[union-attr]

    def on_message(self, opcode: int, payload: bytes) -> None:
        load = self.load
        if not self.sent_at:
            load.error("echo received with nothing in flight")
            return
        sent_at = self.sent_at.popleft()
        load.received += 1
        self.echoed += 1
        if payload != self.payload or opcode != self.opcode:
            load.mismatches += 1
            load.error(
                f"mismatch: opcode {opcode} (expected {self.opcode}), {len(payload)} bytes "
                f"(expected {len(self.payload)}), content differs"
            )
        if load.measuring and not load.received % LATENCY_STRIDE:
            load.latencies.append((self.now - sent_at) * 1e6)  # microseconds

    def on_close(self, code: int | None, reason: str) -> None:
        if self.load.sending:
            self.load.error(f"server closed a connection during the run (code {code} {reason!r})")


@on_uvloop
async def run_echo_load(
    host: str,
    port: int,
    *,
    connections: int = 50,
    inflight: int = 16,
    size: int = 64,
    seconds: float = 5.0,
    warmup: float = 1.0,
    text: bool = False,
    first_index: int = 0,
    start_at: Callable[[], float] | None = None,
    connect_timeout: float = 10.0,
    drain_timeout: float = 5.0,
    path: str = "/",
) -> EchoCounts:
    """Run the echo load against ``ws://host:port/path`` on a fresh uvloop loop in this thread.

    Opens ``connections`` connections, then calls ``start_at()`` (if given; it may
    block) for the ``time.monotonic()`` at which to start sending; counts over
    ``[start + warmup, start + warmup + seconds]``; drains and closes. Takes about
    ``warmup + seconds`` plus connection set-up.
    """
    load = _Load()
    opcode = OP_TEXT if text else OP_BINARY
    result = EchoCounts(connections=connections)

    def options(i: int) -> dict[str, Any]:
        return {"load": load, "payload": payload_for(first_index + i, size), "opcode": opcode}

    async with loadclient.connections(
        load,
        result,
        host,
        port,
        EchoConnection,
        connections,
        options,
        timeout=connect_timeout,
        path=path,
    ) as conns:
        # Blocking is fine here: nothing is in flight until the start time.
        t_go = start_at() if start_at is not None else time.monotonic()
        await run_window(load, conns, inflight, t_go, warmup, seconds, result)

        # Drain: wait (bounded) for the echoes still in flight so every count is final.
        deadline = time.monotonic() + drain_timeout
        while time.monotonic() < deadline:
            if not any(c.sent_at for c in conns if c.is_open):
                break
            await asyncio.sleep(0.005)
        result.in_flight = sum(len(c.sent_at) for c in conns if c.is_open)
        if result.in_flight:
            # An echo server owes every message back: after the drain time they are lost.
            load.error(
                f"{result.in_flight} echoes still missing {drain_timeout:g} s after the load"
            )
        await close_connections(conns, drain_timeout)
    result.mismatches = load.mismatches
    return result


# -- the scenario ---------------------------------------------------------------------------


class EchoScenario(ProcessScenario):
    """Messages in flight on every connection, each echo checked: msg/s and round trips."""

    name = "echo"
    mode = "echo"
    table = TABLE
    seconds = 5.0

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--connections", type=int, default=50)
        parser.add_argument("--inflight", type=int, default=16, help="messages in flight per conn")
        parser.add_argument("--size", type=int, default=64, help="message size in bytes")
        parser.add_argument("--text", action="store_true", help="text messages instead of binary")

    def check(self, parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
        if args.connections < 1 or args.inflight < 1 or args.size < 0:
            parser.error("--connections and --inflight must be >= 1, --size >= 0")

    def config_text(self, args: argparse.Namespace) -> str:
        return (
            f"echo: {args.connections} connections x {args.inflight} in flight x {args.size} B "
            f"{'text' if args.text else 'binary'}, {args.warmup:g} s warm-up + "
            f"{args.seconds:g} s"
        )

    def describe(self, run: dict[str, Any]) -> str:
        return (
            f"{run['msgs_per_s']:,.0f} msg/s, client CPU {run['client_cpu_pct']:.0f}% (busy "
            f"{run['client_busy_pct']:.0f}%, {run['client_us_per_msg']:.1f} us/msg), "
            f"server CPU {run['server_cpu_pct']:.0f}% ({run['server_us_per_msg']:.1f} us/msg),"
            f" {run['server_processes']} server process(es),"
            f" p50 {run['p50_us']:,.0f} us, p99 {run['p99_us']:,.0f} us, "
            f"errors {run['errors']}"
        )

    def load(self, args: argparse.Namespace) -> Load:
        """The connections split evenly over the load processes, numbered across them."""
        configs = []
        first = 0
        for n in split_evenly(args.connections, args.client_procs):
            if n > 0:
                configs.append(
                    {
                        "connections": n,
                        "inflight": args.inflight,
                        "size": args.size,
                        "seconds": args.seconds,
                        "warmup": args.warmup,
                        "text": args.text,
                        "first_index": first,
                        "drain_timeout": args.drain_timeout,
                    }
                )
                first += n
        return Load(run_echo_load, EchoCounts, configs, 2 * args.drain_timeout + 30)

    def figures(
        self, results: list[EchoCounts], server_cpu: float, window: float
    ) -> dict[str, Any]:
        rate = sum(r.rate for r in results)
        return {
            "msgs_per_s": rate,
            **cpu_figures(results, server_cpu, window, rate, "msg"),
            **latency_figures(results),
            "window_received": total(results, "window_received"),
            "sent": total(results, "sent"),
            "received": total(results, "received"),
            "in_flight_at_close": total(results, "in_flight"),
            "errors": total(results, "errors"),
            "mismatches": total(results, "mismatches"),
            "error_samples": error_samples(results),
        }


SCENARIO = EchoScenario()


def main(argv: list[str] | None = None) -> int:
    parser = bench.scenario_parser(SCENARIO, runs=5, description=__doc__.split("\n")[0])
    return bench.run_benchmark(parser, parser.parse_args(argv), SCENARIO)


if __name__ == "__main__":
    sys.exit(main())
