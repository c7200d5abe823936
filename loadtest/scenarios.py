"""Load scenarios beyond echo: broadcast fan-out, handshake rate, memory per idle connection.

    python -m wsfleet.loadtest.scenarios broadcast [--connections 100] [--senders 10]
        [--size 64] [--inflight 2] [--seconds 3] [--warmup 1]
    python -m wsfleet.loadtest.scenarios connect [--concurrency 32] [--client-procs 1]
        [--seconds 3] [--warmup 1]
    python -m wsfleet.loadtest.scenarios idle [--connections 2000] [--rate 1000] [--hold 1]
  and for all three:
        [--runs 1] [--server-cpus 0] [--client-cpus 1] [--server NAME=COMMAND ...]
        [--only NAMES] [--godot BIN] [--godot-sleep-usec 0] [--node BIN] [--node-path DIR]
        [--json FILE]

    python -m wsfleet.loadtest.scenarios serve-websockets --mode echo|broadcast --port P
        [--host 127.0.0.1] [--report-count]

The client side of each scenario is a plain function that runs on a fresh uvloop
loop in the calling thread (`run_broadcast`, `run_connect`, `run_idle`), built on
`wsclient.WSConnection`, and returns a dataclass; each takes ``path=`` for the
URL's path. Latency percentiles come from an HdrHistogram (`harness`'s helpers,
PyPI package ``hdrhistogram``; the results carry it encoded so that load
processes' histograms add up).

* **broadcast**: ``connections`` clients; the first ``senders`` of them each
  keep ``inflight`` broadcasts outstanding. A broadcast is one binary message
  of ``size`` bytes (sender index, sequence number and ``time.monotonic_ns()``
  at send, then padding) that the server must forward to every *other* client:
  ``connections - 1`` deliveries. When the last of them arrives, its sender
  sends the next one, so no more than ``senders x inflight`` broadcasts are in
  flight (and no more messages than that queue towards one client). Deliveries
  are counted over ``seconds`` after ``warmup``; one in ``LATENCY_STRIDE`` of
  them gives a latency (receive time - the send time in the payload). Every
  delivery is checked: opcode, length, padding, a sender that is not the
  receiver, and per (sender, receiver) the next sequence number (a lost,
  duplicated or reordered delivery is an error). After the window the senders
  stop and the outstanding deliveries drain (bounded); those that never came
  are ``missing``. One load process: a broadcast completes only when all its
  receivers have it.
* **connect**: ``concurrency`` loops, each repeating TCP connect + WebSocket
  handshake, then the close handshake (client sends 1000, waits for the
  server's close frame and the end of TCP). Cycles that end in the window give
  handshakes/s; handshake latency (connect to 101) goes to the histogram;
  failed or timed-out handshakes are ``failures`` (errors); a server that ends
  TCP without a close frame counts as ``unclean_closes`` (not an error).
* **idle**: raises this process's ``RLIMIT_NOFILE`` soft limit as far as the
  hard limit (`ResourceLimitError` with the numbers if ``connections`` cannot
  fit), measures the server's process tree memory (RSS and USS summed over the
  root and every descendant, psutil; without a server pid the memory figures
  are NaN and only whether the connections stayed open is reported), opens
  ``connections`` connections at ``rate`` per second (at most
  ``CONNECT_CONCURRENCY`` handshakes at once) that then stay idle, waits
  ``hold`` seconds, measures again and reports bytes per connection; then
  checks that every one is still open and closes them all.

The command line runs one scenario against a set of servers in one invocation,
on the same CPUs, with `harness` (`harness.run_benchmark`: each server started
fresh for each run under ``taskset -c --server-cpus``, ready once a WebSocket
handshake succeeds, the load processes pinned to ``--client-cpus``, the server
tree's CPU time over the window, SIGTERM then SIGKILL; the medians over
``--runs``, the table with the ratio to the first server, the JSON file). The
idle scenario runs its connections in this process (it reads the server's
memory), pinned to ``--client-cpus`` for the run. The servers are
`harness.server_catalog`'s (``echo`` set for connect and idle, ``broadcast`` set
for broadcast), first the baseline the ratio compares with:

* ``websockets``: websockets on uvloop, one process (``ws_echo_server`` for echo,
  ``serve-websockets --mode broadcast`` of this module for broadcast, which uses
  ``websockets.asyncio.server.broadcast``);
* ``wsfleet-1``, ``wsfleet-2``: ``wsfleet serve --bind 127.0.0.1 --shards K --quiet``
  (echo), or ``python -m wsfleet.loadtest.wsfleet_apps broadcast --shards K``;
* ``godot``: ``godot3-server`` running ``loadtest/godot_server.gd`` (Godot 3.2.3's
  ``WebSocketServer``, plain mode, main loop without sleep with the default
  ``--godot-sleep-usec 0``: it burns its core even when idle, so its CPU figure
  is 100 %) in a temporary working directory;
* ``node``: ``node loadtest/node_ws_server.js --mode {mode}`` (npm package ``ws``).

A server whose program (``godot3-server``, ``node``) or, for Node, whose ``ws``
module is missing is reported as "not installed" and skipped; that does not
change the exit status (``--node-path DIR`` or ``NODE_PATH`` names the
``node_modules`` folder that holds ``ws``). ``--server NAME=COMMAND`` (with
``{port}``, and ``{mode}`` if wanted) replaces the default set, ``--only``
picks from it (or names ``wsfleet-K`` for K shards). The exit status is 1 if a
server failed or any run counted errors (or, for broadcast, missing deliveries).

`BROADCAST`, `CONNECT` and `IDLE` (`harness.Scenario`) are how these command
lines, ``wsfleet loadtest`` (any URL) and ``compare`` run the scenarios.

``serve-websockets`` is the websockets baseline for broadcast and the
instrumented server of the scenario tests: once listening it prints
``listening HOST:PORT``; SIGTERM or SIGINT close every connection (1001); with
``--report-count`` it then prints ``connected C closed X received R deliveries
D peak P`` (D: messages it sent, P: most connections open at once).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import signal
import struct
import sys
import time
from array import array
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import psutil
import uvloop

from wsfleet.loadtest import harness
from wsfleet.loadtest.harness import (
    HOST,
    MAX_ERROR_SAMPLES,
    Column,
    histogram_of,
    percentiles_us,
)
from wsfleet.loadtest.harness import merge_histograms as merge_histograms  # for the tests
from wsfleet.loadtest.harness import node_status as node_status
from wsfleet.loadtest.wsclient import OP_BINARY, WSConnection, build_frame, connect

# Broadcast payload head: sender index, sequence number (from 1), send time (monotonic ns).
BROADCAST_HEAD = struct.Struct("<IIq")
MIN_BROADCAST_SIZE = BROADCAST_HEAD.size
# Keep one latency in this many deliveries. Recording one costs ~2 us in hdrh, so samples go
# to an array during the window and into the histogram afterwards.
LATENCY_STRIDE = 4
MAX_LATENCY_SAMPLES = 2_000_000
# File descriptors this process needs besides the connections (stdio, event loop, pipes...).
FD_MARGIN = 64


# -- shared pieces -----------------------------------------------------------------------------


def _fill_latency(result: Any, samples_us: array) -> None:
    hist = histogram_of(samples_us)
    result.latency_samples = len(samples_us)
    result.p50_us, result.p99_us, result.max_us = percentiles_us(hist)
    result.latency_hist = harness.encode_histogram(hist)


class _Errors:
    """An error count with the first few descriptions."""

    def __init__(self) -> None:
        self.count = 0
        self.samples: list[str] = []

    def __call__(self, why: str) -> None:
        self.count += 1
        if len(self.samples) < MAX_ERROR_SAMPLES:
            self.samples.append(why)


# -- broadcast -----------------------------------------------------------------------------------


@dataclass
class BroadcastResult:
    """Client-side accounting of one broadcast run; counts cover the whole run unless
    they say ``window``. ``expected = sent x (connections - 1)``, and after the drain
    ``delivered + missing == expected`` unless something unexpected arrived."""

    connections: int
    senders: int
    size: int
    inflight: int  # per sender
    sent: int = 0  # broadcasts sent
    completed: int = 0  # broadcasts every other client received
    delivered: int = 0  # valid deliveries received
    expected: int = 0
    missing: int = 0  # deliveries still outstanding after the drain
    window_s: float = 0.0
    window_delivered: int = 0
    window_completed: int = 0
    cpu_s: float = 0.0  # this process's CPU time in the window
    p50_us: float = float("nan")  # delivery latency: send to receive
    p99_us: float = float("nan")
    max_us: float = float("nan")
    latency_samples: int = 0
    latency_hist: str = ""  # HdrHistogram.encode(), ASCII
    errors: int = 0  # bad or unexpected deliveries, sequence errors, closes, missing (once)
    sequence_errors: int = 0
    error_samples: list[str] = field(default_factory=list)

    @property
    def deliveries_per_s(self) -> float:
        return self.window_delivered / self.window_s if self.window_s > 0 else 0.0

    @property
    def broadcasts_per_s(self) -> float:
        return self.window_completed / self.window_s if self.window_s > 0 else 0.0


class _BroadcastRun:
    """State shared by the connections of one run (one event loop, no locking)."""

    def __init__(self, connections: int, senders: int, size: int) -> None:
        self.senders = senders
        self.size = size
        self.fanout = connections - 1
        self.pad = b"." * (size - BROADCAST_HEAD.size)
        self.conns: list[BroadcastConnection] = []
        self.next_seq = [0] * senders
        self.outstanding: dict[int, int] = {}  # (sender << 32 | seq) -> deliveries to come
        self.sending = False
        self.measuring = False
        self.sent = 0
        self.completed = 0
        self.delivered = 0
        self.window_completed = 0
        self.sequence_errors = 0
        self.latencies = array("q")  # microseconds
        self.error = _Errors()

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
        self, host: str, port: int, *, run: _BroadcastRun, index: int, path: str = "/"
    ) -> None:
        super().__init__(host, port, path)
        self.run = run
        self.index = index
        self.last_seq = [0] * run.senders  # the last sequence number from each sender
        self.now_ns = 0

    def data_received(self, data: bytes) -> None:
        # One clock read per socket read: deliveries that arrive together share it.
        self.now_ns = time.monotonic_ns()
        super().data_received(data)

    def on_message(self, opcode: int, payload: bytes) -> None:
        run = self.run
        if opcode != OP_BINARY or len(payload) != run.size:
            run.error(
                f"client {self.index}: opcode {opcode} with {len(payload)} bytes "
                f"(expected {OP_BINARY} with {run.size})"
            )
            return
        sender, seq, sent_ns = BROADCAST_HEAD.unpack_from(payload)
        if sender >= run.senders or sender == self.index:
            run.error(f"client {self.index}: a delivery from sender {sender}")
            return
        if payload[BROADCAST_HEAD.size :] != run.pad:
            run.error(f"client {self.index}: padding differs in {sender}/{seq}")
            return
        last = self.last_seq[sender]
        if seq != last + 1:
            run.sequence_errors += 1
            run.error(f"client {self.index}: from sender {sender} seq {seq} after {last}")
        if seq > last:
            self.last_seq[sender] = seq
        key = (sender << 32) | seq
        remaining = run.outstanding.get(key)
        if remaining is None:
            run.error(f"client {self.index}: {sender}/{seq} was not outstanding (duplicate?)")
            return
        run.delivered += 1
        if run.measuring and not run.delivered % LATENCY_STRIDE:
            if len(run.latencies) < MAX_LATENCY_SAMPLES:
                run.latencies.append((self.now_ns - sent_ns) // 1000)
        if remaining == 1:
            del run.outstanding[key]
            run.completed_one(sender)
        else:
            run.outstanding[key] = remaining - 1

    def on_close(self, code: int | None, reason: str) -> None:
        if self.run.sending:
            self.run.error(f"server closed client {self.index} during the run ({code} {reason!r})")


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
) -> BroadcastResult:
    run = _BroadcastRun(connections, senders, size)
    result = BroadcastResult(connections, senders, size, inflight)
    run.conns = await harness.open_connections(
        host,
        port,
        BroadcastConnection,
        connections,
        lambda i: {"run": run, "index": i},
        timeout=connect_timeout,
        path=path,
    )
    try:
        # Let the server register every client: a broadcast that reaches a server which does
        # not know a client yet would miss that client.
        await asyncio.sleep(settle)
        # Blocking is fine here: nothing is in flight until the start time.
        t_go = start_at() if start_at is not None else time.monotonic()
        await harness.sleep_until(t_go)
        run.sending = True
        for _ in range(inflight):
            for sender in range(senders):
                run.send_next(sender)

        await harness.sleep_until(t_go + warmup)
        delivered0 = run.delivered
        cpu0 = time.process_time()
        wall0 = time.perf_counter()
        run.measuring = True
        await harness.sleep_until(t_go + warmup + seconds)
        run.measuring = False
        result.window_s = time.perf_counter() - wall0
        result.cpu_s = time.process_time() - cpu0
        result.window_delivered = run.delivered - delivered0
        result.window_completed = run.window_completed
        run.sending = False

        # Drain (bounded): every outstanding broadcast should reach its last client.
        deadline = time.monotonic() + drain_timeout
        while run.outstanding and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
        result.missing = sum(run.outstanding.values())
        if result.missing:
            run.error(
                f"{result.missing} deliveries still missing {drain_timeout:g} s after the load"
            )
        await harness.close_connections(run.conns, drain_timeout)
    finally:
        run.sending = False
        for conn in run.conns:
            conn.abort()
    for conn in run.conns:
        if conn.error is not None:
            run.error(f"protocol: client {conn.index}: {conn.error}")
    result.sent = run.sent
    result.completed = run.completed
    result.delivered = run.delivered
    result.expected = run.sent * run.fanout
    result.sequence_errors = run.sequence_errors
    result.errors = run.error.count
    result.error_samples = run.error.samples
    _fill_latency(result, run.latencies)
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
) -> BroadcastResult:
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
    return uvloop.run(
        _broadcast(
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
    )


# -- connect -------------------------------------------------------------------------------------


@dataclass
class ConnectResult:
    """Client-side accounting of one connect run: whole-run counts unless ``window``."""

    concurrency: int
    attempts: int = 0  # connections started
    handshakes: int = 0  # 101 received
    cycles: int = 0  # handshake and close done
    failures: int = 0  # handshakes that failed or timed out
    unclean_closes: int = 0  # TCP ended without the server's close frame
    window_s: float = 0.0
    window_cycles: int = 0
    cpu_s: float = 0.0
    p50_us: float = float("nan")  # TCP connect to 101 received
    p99_us: float = float("nan")
    max_us: float = float("nan")
    latency_samples: int = 0
    latency_hist: str = ""
    errors: int = 0  # failures + protocol errors + closes that did not end
    error_samples: list[str] = field(default_factory=list)

    @property
    def handshakes_per_s(self) -> float:
        return self.window_cycles / self.window_s if self.window_s > 0 else 0.0


async def _connect_loops(
    host: str,
    port: int,
    *,
    concurrency: int,
    seconds: float,
    warmup: float,
    start_at: Callable[[], float] | None,
    connect_timeout: float,
    close_timeout: float,
    path: str,
) -> ConnectResult:
    result = ConnectResult(concurrency)
    error = _Errors()
    latencies = array("q")
    t_go = start_at() if start_at is not None else time.monotonic()
    w0 = t_go + warmup
    w1 = w0 + seconds

    async def loop() -> None:
        await harness.sleep_until(t_go)
        while time.monotonic() < w1:
            result.attempts += 1
            t0 = time.perf_counter_ns()
            try:
                conn = await connect(
                    host, port, timeout=connect_timeout, close_timeout=close_timeout, path=path
                )
            except (OSError, TimeoutError) as e:  # HandshakeError is an OSError
                result.failures += 1
                error(f"handshake: {type(e).__name__}: {e}")
                await asyncio.sleep(0.01)  # do not spin on a refusing server
                continue
            t1 = time.perf_counter_ns()
            result.handshakes += 1
            try:
                conn.close()
                # close() aborts TCP after close_timeout: this wait is bounded anyway.
                code, _ = await asyncio.wait_for(asyncio.shield(conn.closed), close_timeout + 1)
            except TimeoutError:
                code = None
                error("close: the connection did not end")
            finally:
                conn.abort()
            if conn.error is not None:
                error(f"protocol: {conn.error}")
            if code is None:
                result.unclean_closes += 1
            result.cycles += 1
            if w0 <= time.monotonic() <= w1:
                result.window_cycles += 1
                if len(latencies) < MAX_LATENCY_SAMPLES:
                    latencies.append((t1 - t0) // 1000)

    tasks = [asyncio.ensure_future(loop()) for _ in range(concurrency)]
    try:
        await harness.sleep_until(w0)
        cpu0 = time.process_time()
        wall0 = time.perf_counter()
        await harness.sleep_until(w1)
        result.window_s = time.perf_counter() - wall0
        result.cpu_s = time.process_time() - cpu0
        # Each loop ends after its current cycle, which the timeouts bound.
        await asyncio.wait_for(asyncio.gather(*tasks), connect_timeout + close_timeout + 5)
    finally:
        for task in tasks:
            task.cancel()
    result.errors = error.count
    result.error_samples = error.samples
    _fill_latency(result, latencies)
    return result


def run_connect(
    host: str,
    port: int,
    *,
    concurrency: int = 32,
    seconds: float = 3.0,
    warmup: float = 1.0,
    start_at: Callable[[], float] | None = None,
    connect_timeout: float = 5.0,
    close_timeout: float = 2.0,
    path: str = "/",
) -> ConnectResult:
    """Run ``concurrency`` handshake + close loops against ``ws://host:port/path`` on a fresh
    uvloop loop.

    Starts at ``start_at()`` (if given; it may block) and stops starting cycles at
    ``start + warmup + seconds``; cycles that end inside ``[start + warmup, start +
    warmup + seconds]`` count for the rate. The counts are final when it returns.
    """
    if concurrency < 1 or seconds <= 0 or warmup < 0:
        raise ValueError("need concurrency >= 1, seconds > 0, warmup >= 0")
    return uvloop.run(
        _connect_loops(
            host,
            port,
            concurrency=concurrency,
            seconds=seconds,
            warmup=warmup,
            start_at=start_at,
            connect_timeout=connect_timeout,
            close_timeout=close_timeout,
            path=path,
        )
    )


# -- idle --------------------------------------------------------------------------------------


class ResourceLimitError(RuntimeError):
    """The file descriptor limit cannot hold the connections asked for."""


def raise_nofile(needed: int) -> int:
    """Raise RLIMIT_NOFILE's soft limit to ``needed`` (never above the hard limit).

    Returns the soft limit now in force; raises `ResourceLimitError` when the hard
    limit is below ``needed``. Processes started afterwards inherit the limit.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return soft
    if hard != resource.RLIM_INFINITY and hard < needed:
        raise ResourceLimitError(
            f"{needed} file descriptors are needed but RLIMIT_NOFILE's hard limit is {hard} "
            f"(soft {soft}); raise the hard limit (ulimit -Hn, systemd LimitNOFILE=) or open "
            f"at most {hard - FD_MARGIN} connections"
        )
    resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))
    return needed


@dataclass
class TreeMemory:
    rss: int  # bytes, summed over the processes
    uss: int | None  # unique set size, summed; None when it cannot be read
    processes: int


def tree_memory(pid: int) -> TreeMemory:
    """Memory of process ``pid`` and all its descendants (psutil)."""
    root = psutil.Process(pid)
    procs = [root]
    try:
        procs += root.children(recursive=True)
    except psutil.NoSuchProcess:
        pass
    rss = 0
    uss: int | None = 0
    counted = 0
    for p in procs:
        try:
            rss += p.memory_info().rss
            counted += 1
        except psutil.NoSuchProcess:
            continue
        if uss is not None:
            try:
                uss += p.memory_full_info().uss
            except (psutil.AccessDenied, psutil.NoSuchProcess, AttributeError):
                uss = None
    return TreeMemory(rss, uss, counted)


@dataclass
class IdleResult:
    requested: int
    rate: float  # connections per second asked for
    opened: int = 0
    failures: int = 0
    still_open: int = 0  # at the end of the hold
    closed_early: int = 0  # closed by the server or lost before the hold ended
    open_s: float = 0.0  # from the first connect to the last handshake
    cpu_s: float = 0.0  # this process's CPU time while opening
    nofile_soft: int = 0
    rss_before: int = 0
    rss_after: int = 0
    uss_before: int | None = None
    uss_after: int | None = None
    memory_measured: bool = False  # False without a server pid: the figures are NaN
    server_processes: int = 0
    errors: int = 0  # failures + closed early + protocol errors
    error_samples: list[str] = field(default_factory=list)

    @property
    def rss_per_connection(self) -> float:
        if not self.opened or not self.memory_measured:
            return float("nan")
        return (self.rss_after - self.rss_before) / self.opened

    @property
    def uss_per_connection(self) -> float | None:
        if self.uss_before is None or self.uss_after is None or not self.opened:
            return None
        if not self.memory_measured:
            return None
        return (self.uss_after - self.uss_before) / self.opened

    @property
    def achieved_rate(self) -> float:
        return self.opened / self.open_s if self.open_s > 0 else 0.0


async def _idle(
    host: str,
    port: int,
    *,
    result: IdleResult,
    hold: float,
    server_pid: int | None,
    connect_timeout: float,
    close_timeout: float,
    path: str,
) -> IdleResult:
    error = _Errors()
    if server_pid is not None:
        before = tree_memory(server_pid)
        result.rss_before, result.uss_before = before.rss, before.uss
    gate = asyncio.Semaphore(harness.CONNECT_CONCURRENCY)
    conns: list[WSConnection] = []
    t0 = time.monotonic()
    cpu0 = time.process_time()
    last_open = t0

    async def open_one(i: int) -> None:
        nonlocal last_open
        await harness.sleep_until(t0 + i / result.rate)
        async with gate:
            try:
                conn = await connect(
                    host, port, timeout=connect_timeout, close_timeout=close_timeout, path=path
                )
            except (OSError, TimeoutError) as e:
                result.failures += 1
                error(f"connection {i}: {type(e).__name__}: {e}")
                return
        conns.append(conn)
        last_open = time.monotonic()

    try:
        # One task per connection, each waiting for its slot in the schedule.
        await asyncio.gather(*(open_one(i) for i in range(result.requested)))
        result.cpu_s = time.process_time() - cpu0
        result.opened = len(conns)
        result.open_s = last_open - t0
        await asyncio.sleep(hold)
        if server_pid is not None:
            after = tree_memory(server_pid)
            result.rss_after, result.uss_after = after.rss, after.uss
            result.server_processes = after.processes
            result.memory_measured = True
        result.still_open = sum(1 for c in conns if c.is_open)
        result.closed_early = result.opened - result.still_open
        if result.closed_early:
            error(f"{result.closed_early} connections were closed before the hold ended")
        await harness.close_connections(conns, close_timeout + 1)
    finally:
        for conn in conns:
            conn.abort()
    for conn in conns:
        if conn.error is not None:
            error(f"protocol: {conn.error}")
    result.errors = error.count
    result.error_samples = error.samples
    return result


def run_idle(
    host: str,
    port: int,
    *,
    server_pid: int | None,
    connections: int = 2000,
    rate: float = 1000.0,
    hold: float = 1.0,
    connect_timeout: float = 10.0,
    close_timeout: float = 2.0,
    path: str = "/",
) -> IdleResult:
    """Open ``connections`` idle connections to ``ws://host:port/path`` at ``rate``/s;
    measure ``server_pid``'s tree (without a pid, only whether they all stayed open).

    Raises `ResourceLimitError` before opening anything when the connections cannot
    fit in this process's file descriptor limit. Takes about ``connections / rate +
    hold`` seconds plus the close.
    """
    if connections < 1 or rate <= 0 or hold < 0:
        raise ValueError("need connections >= 1, rate > 0, hold >= 0")
    result = IdleResult(requested=connections, rate=rate)
    result.nofile_soft = raise_nofile(connections + FD_MARGIN)
    return uvloop.run(
        _idle(
            host,
            port,
            result=result,
            hold=hold,
            server_pid=server_pid,
            connect_timeout=connect_timeout,
            close_timeout=close_timeout,
            path=path,
        )
    )


# -- the websockets baseline and instrumented server ------------------------------------------


class ServerCounts:
    """What the websockets server saw (one event loop, no locking)."""

    def __init__(self) -> None:
        self.connected = 0
        self.closed = 0
        self.received = 0
        self.deliveries = 0
        self.open = 0
        self.peak = 0

    def line(self) -> str:
        return (
            f"connected {self.connected} closed {self.closed} received {self.received} "
            f"deliveries {self.deliveries} peak {self.peak}"
        )


async def serve_websockets(host: str, port: int, mode: str, counts: ServerCounts) -> None:
    """websockets on the running loop, echo or broadcast, until SIGTERM or SIGINT."""
    from websockets.asyncio.server import ServerConnection, broadcast, serve
    from websockets.exceptions import ConnectionClosed
    from websockets.protocol import State

    servers: list[Any] = []

    async def handler(ws: ServerConnection) -> None:
        counts.connected += 1
        counts.open += 1
        counts.peak = max(counts.peak, counts.open)
        try:
            async for message in ws:
                counts.received += 1
                if mode == "echo":
                    await ws.send(message)
                    counts.deliveries += 1
                else:
                    targets = [
                        c for c in servers[0].connections if c is not ws and c.state is State.OPEN
                    ]
                    # Written at once, without waiting for any client's buffer to drain.
                    broadcast(targets, message)
                    counts.deliveries += len(targets)
        except ConnectionClosed:
            pass  # a peer that vanishes without a close frame is normal under load
        finally:
            counts.open -= 1
            counts.closed += 1

    loop = asyncio.get_running_loop()
    stop: asyncio.Future[None] = loop.create_future()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: stop.done() or stop.set_result(None))
    # Compression off, as for the other servers; otherwise websockets as shipped.
    async with serve(handler, host, port, compression=None, max_size=64 * 1024 * 1024) as server:
        servers.append(server)
        bound = server.sockets[0].getsockname()
        print(f"listening {bound[0]}:{bound[1]}", flush=True)
        await stop
    # Leaving the context closed every connection (1001) and waited for the handlers.


# -- the command line ------------------------------------------------------------------------


# Broadcast and connect: `harness.run_clients` hands these to the load processes.


def broadcast_load(args: argparse.Namespace) -> harness.Load:
    cfg = {
        "connections": args.connections,
        "senders": args.senders,
        "size": args.size,
        "inflight": args.inflight,
        "seconds": args.seconds,
        "warmup": args.warmup,
        "drain_timeout": args.drain_timeout,
    }
    return harness.Load(run_broadcast, BroadcastResult, [cfg], 2 * args.drain_timeout + 30)


def broadcast_figures(
    results: list[BroadcastResult], server_cpu: float, window: float
) -> dict[str, Any]:
    (r,) = results
    rate = r.deliveries_per_s
    p50, p99, top = percentiles_us(merge_histograms([r.latency_hist]))
    return {
        "deliveries_per_s": rate,
        "broadcasts_per_s": r.broadcasts_per_s,
        "client_cpu_pct": 100 * r.cpu_s / r.window_s if r.window_s else float("nan"),
        "server_cpu_pct": 100 * server_cpu / window,
        "server_us_per_delivery": 1e6 * server_cpu / (rate * window) if rate else float("nan"),
        "p50_us": p50,
        "p99_us": p99,
        "max_us": top,
        "sent": r.sent,
        "delivered": r.delivered,
        "expected": r.expected,
        "missing": r.missing,
        "errors": r.errors,
        "sequence_errors": r.sequence_errors,
        "error_samples": r.error_samples,
    }


def broadcast_describe(run: dict[str, Any]) -> str:
    return (
        f"{run['deliveries_per_s']:,.0f} deliveries/s ({run['broadcasts_per_s']:,.0f} "
        f"broadcasts/s), client CPU {run['client_cpu_pct']:.0f}%, server CPU "
        f"{run['server_cpu_pct']:.0f}% ({run['server_us_per_delivery']:.2f} us/delivery), "
        f"{run['server_processes']} server process(es), p50 {run['p50_us']:,.0f} us, "
        f"p99 {run['p99_us']:,.0f} us, delivered {run['delivered']:,}/{run['expected']:,}, "
        f"missing {run['missing']}, errors {run['errors']}"
    )


BROADCAST_TABLE = harness.Table(
    rate="deliveries_per_s",
    medians=(
        "deliveries_per_s",
        "broadcasts_per_s",
        "client_cpu_pct",
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


def connect_load(args: argparse.Namespace) -> harness.Load:
    configs = [
        {"concurrency": n, "seconds": args.seconds, "warmup": args.warmup}
        for n in harness.split_evenly(args.concurrency, args.client_procs)
        if n > 0
    ]
    return harness.Load(run_connect, ConnectResult, configs, 30)


def connect_figures(
    results: list[ConnectResult], server_cpu: float, window: float
) -> dict[str, Any]:
    rate = sum(r.handshakes_per_s for r in results)
    p50, p99, top = percentiles_us(merge_histograms(r.latency_hist for r in results))
    return {
        "handshakes_per_s": rate,
        **harness.cpu_figures(results, server_cpu, window, rate, "handshake"),
        "p50_us": p50,
        "p99_us": p99,
        "max_us": top,
        "cycles": sum(r.cycles for r in results),
        "failures": sum(r.failures for r in results),
        "unclean_closes": sum(r.unclean_closes for r in results),
        "errors": sum(r.errors for r in results),
        "error_samples": harness.error_samples(results),
    }


def connect_describe(run: dict[str, Any]) -> str:
    return (
        f"{run['handshakes_per_s']:,.0f} handshakes/s (connect + close), client CPU "
        f"{run['client_cpu_pct']:.0f}%, server CPU {run['server_cpu_pct']:.0f}% "
        f"({run['server_us_per_handshake']:.0f} us/handshake), {run['server_processes']} server "
        f"process(es), handshake p50 {run['p50_us']:,.0f} us, p99 {run['p99_us']:,.0f} us, "
        f"cycles {run['cycles']:,}, failures {run['failures']}, unclean closes "
        f"{run['unclean_closes']}, errors {run['errors']}"
    )


CONNECT_TABLE = harness.Table(
    rate="handshakes_per_s",
    medians=(
        "handshakes_per_s",
        "client_cpu_pct",
        "server_cpu_pct",
        "server_us_per_handshake",
        "p50_us",
        "p99_us",
    ),
    sums=("errors",),
    columns=(
        Column("hs/s", "handshakes_per_s", 8, ",.0f"),
        Column("", "", 14),
        Column("client CPU", "client_cpu_pct", 10, ".0f", "%"),
        Column("server CPU", "server_cpu_pct", 10, ".0f", "%"),
        Column("srv us/hs", "server_us_per_handshake", 9, ".0f"),
        Column("p50 us", "p50_us", 8, ",.0f"),
        Column("p99 us", "p99_us", 8, ",.0f"),
        Column("errors", "errors", 6),
        Column("runs", "runs_ok", 5),
    ),
    name_width=12,
)


# Idle: the connections live in this process, which reads the server's memory.


def idle_measure(
    args: argparse.Namespace, target: harness.Target, progress: harness.Progress
) -> dict[str, Any]:
    """One idle run against a server that is up, from this process pinned to
    ``--client-cpus`` for the run; the server's memory needs its pid (``target.pid``)."""
    original = os.sched_getaffinity(0)
    cpus = set(harness.parse_cpus(args.client_cpus))
    try:
        if cpus:
            os.sched_setaffinity(0, cpus)
        progress(
            f"opening {args.connections:,} connections at {args.rate:g}/s, holding {args.hold:g} s",
            args.connections / args.rate + args.hold,
        )
        r = run_idle(
            target.host,
            target.port,
            path=target.path,
            server_pid=target.pid,
            connections=args.connections,
            rate=args.rate,
            hold=args.hold,
        )
    finally:
        os.sched_setaffinity(0, original)
    uss = r.uss_per_connection
    return {
        "kib_per_connection": r.rss_per_connection / 1024,
        "uss_kib_per_connection": uss / 1024 if uss is not None else float("nan"),
        "client_cpu_pct": 100 * r.cpu_s / r.open_s if r.open_s > 0 else float("nan"),
        "achieved_rate": r.achieved_rate,
        "opened": r.opened,
        "requested": r.requested,
        "still_open": r.still_open,
        "failures": r.failures,
        "closed_early": r.closed_early,
        "memory_measured": r.memory_measured,
        "rss_before": r.rss_before,
        "rss_after": r.rss_after,
        "uss_before": r.uss_before,
        "uss_after": r.uss_after,
        "server_processes": r.server_processes if r.memory_measured else None,
        "errors": r.errors,
        "error_samples": r.error_samples,
    }


def idle_describe(run: dict[str, Any]) -> str:
    return (
        f"{run['kib_per_connection']:,.1f} KiB RSS per connection (USS "
        f"{run['uss_kib_per_connection']:,.1f} KiB), {run['opened']:,}/{run['requested']:,} "
        f"opened at {run['achieved_rate']:,.0f}/s, server RSS {run['rss_before'] / 2**20:,.1f}"
        f" -> {run['rss_after'] / 2**20:,.1f} MiB in {run['server_processes']} process(es), "
        f"failures {run['failures']}, closed early {run['closed_early']}, errors {run['errors']}"
    )


IDLE_TABLE = harness.Table(
    rate="kib_per_connection",
    medians=("kib_per_connection", "uss_kib_per_connection", "client_cpu_pct", "achieved_rate"),
    sums=("errors",),
    columns=(
        Column("KiB/conn", "kib_per_connection", 9, ",.1f"),
        Column("", "", 14),
        Column("USS KiB", "uss_kib_per_connection", 8, ",.1f"),
        Column("opened/s", "achieved_rate", 9, ",.0f"),
        Column("client CPU", "client_cpu_pct", 10, ".0f", "%"),
        Column("errors", "errors", 6),
        Column("runs", "runs_ok", 5),
    ),
    name_width=12,
    lower_is_better=True,
)


# -- the command line ------------------------------------------------------------------------


def broadcast_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--connections", type=int, default=100)
    parser.add_argument("--senders", type=int, default=10)
    parser.add_argument("--size", type=int, default=64, help=f"bytes (>= {MIN_BROADCAST_SIZE})")
    parser.add_argument("--inflight", type=int, default=2, help="broadcasts in flight per sender")


def broadcast_check(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.connections < 2 or not 1 <= args.senders <= args.connections:
        parser.error("need --connections >= 2 and 1 <= --senders <= --connections")
    if args.inflight < 1 or args.size < MIN_BROADCAST_SIZE:
        parser.error(f"need --inflight >= 1 and --size >= {MIN_BROADCAST_SIZE}")


def broadcast_config(args: argparse.Namespace) -> str:
    return (
        f"broadcast: {args.connections} connections, {args.senders} senders x "
        f"{args.inflight} in flight x {args.size} B, {args.warmup:g} s warm-up + "
        f"{args.seconds:g} s"
    )


def connect_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--concurrency",
        "--connections",
        dest="concurrency",
        type=int,
        default=32,
        help="handshake + close loops at once",
    )


def connect_check(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.concurrency < args.client_procs:
        parser.error("--concurrency must be >= --client-procs")


def connect_config(args: argparse.Namespace) -> str:
    return (
        f"connect: {args.concurrency} handshake + close loops, {args.warmup:g} s warm-up + "
        f"{args.seconds:g} s"
    )


def idle_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--connections", type=int, default=2000)
    parser.add_argument("--rate", type=float, default=1000.0, help="connections opened per second")
    parser.add_argument("--hold", type=float, default=1.0, help="seconds before measuring again")


def idle_check(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.connections < 1 or args.rate <= 0 or args.hold < 0:
        parser.error("need --connections >= 1, --rate > 0, --hold >= 0")


def idle_config(args: argparse.Namespace) -> str:
    return f"idle: {args.connections} connections at {args.rate:g}/s, hold {args.hold:g} s"


def idle_prepare(args: argparse.Namespace) -> None:
    # Before any server starts, so that they inherit the limit too. ResourceLimitError if not.
    raise_nofile(args.connections + FD_MARGIN)


BROADCAST = harness.Scenario(
    name="broadcast",
    mode="broadcast",
    add_arguments=broadcast_arguments,
    check=broadcast_check,
    config_text=broadcast_config,
    describe=broadcast_describe,
    table=BROADCAST_TABLE,
    load=broadcast_load,
    figures=broadcast_figures,
    seconds=3.0,
    one_process=True,
)
CONNECT = harness.Scenario(
    name="connect",
    mode="echo",
    add_arguments=connect_arguments,
    check=connect_check,
    config_text=connect_config,
    describe=connect_describe,
    table=CONNECT_TABLE,
    load=connect_load,
    figures=connect_figures,
    seconds=3.0,
)
IDLE = harness.Scenario(
    name="idle",
    mode="echo",
    add_arguments=idle_arguments,
    check=idle_check,
    config_text=idle_config,
    describe=idle_describe,
    table=IDLE_TABLE,
    run_here=idle_measure,
    prepare=idle_prepare,
    seconds=None,
    one_process=True,
)
SCENARIOS = {s.name: s for s in (BROADCAST, CONNECT, IDLE)}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="scenario", required=True, metavar="SCENARIO")
    helps = {
        "broadcast": "fan-out: deliveries/s and delivery latency",
        "connect": "handshake + close cycles per second",
        "idle": "server memory per idle connection",
    }
    for name, scenario in SCENARIOS.items():
        harness.add_scenario_arguments(sub.add_parser(name, help=helps[name]), scenario, runs=1)
    s = sub.add_parser("serve-websockets", help="the websockets server (baseline, tests)")
    s.add_argument("--mode", choices=("echo", "broadcast"), required=True)
    s.add_argument("--port", type=int, required=True)
    s.add_argument("--host", default=HOST)
    s.add_argument("--report-count", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.scenario == "serve-websockets":
        counts = ServerCounts()
        uvloop.run(serve_websockets(args.host, args.port, args.mode, counts))
        if args.report_count:
            print(counts.line(), flush=True)
        return 0
    return harness.run_benchmark(parser, args, SCENARIOS[args.scenario])


if __name__ == "__main__":
    sys.exit(main())
