"""Echo throughput and latency: wsfleet against a plain websockets server, side by side.

    python -m wsfleet.loadtest.echo_bench [--runs 5] [--connections 50] [--inflight 16]
        [--size 64] [--seconds 5] [--warmup 1] [--client-procs 1] [--server-cpus 0]
        [--client-cpus 1] [--server NAME=COMMAND ...] [--text] [--json FILE]

Each server is a command line with ``{port}`` (and optionally ``{host}``) in it;
the default set is::

    websockets=python -m wsfleet.loadtest.ws_echo_server --port {port}
    wsfleet-1=wsfleet serve --port {port} --shards 1
    wsfleet-2=wsfleet serve --port {port} --shards 2

A leading ``python``/``python3`` means this interpreter, and a program that is
not on PATH is looked up next to it (so the venv's ``wsfleet`` is found without
activating the venv). Each ``--server`` replaces the default set.

One run of one server: start it under ``taskset -c SERVER_CPUS`` in its own
session on a free 127.0.0.1 port, wait (bounded) until a WebSocket handshake
succeeds, start ``--client-procs`` load processes pinned (round robin) to
``--client-cpus``, which open ``--connections`` connections between them. Each
connection keeps ``--inflight`` messages of ``--size`` bytes in flight: every
echo received is checked (opcode, length and content) and replaced by a new
message. Echoes are counted over ``--seconds`` after ``--warmup``; within that
window the load processes report their own CPU time and a sample of round-trip
times, and this process reads the server's process tree CPU time (psutil,
children included: wsfleet runs a front, a supervisor and shards). Then the load
stops, in-flight echoes drain, connections close, and the server gets SIGTERM
(SIGKILL for the whole tree after ``--stop-timeout``).

``--runs`` rounds run every server once each, in the same order, so drift on a
shared machine hits all alike; the table gives medians over the runs. A server
that fails to start (command not found, early exit, no handshake in time) is
reported as failed and skipped in later rounds; the others still run.

Every echo is checked against the message its connection sends (a fixed,
per-connection payload, so an echo delivered to the wrong connection is caught;
a lost or duplicated echo shows when the in-flight messages drain at the end).
The exit status is 1 if a server failed or any run counted errors.

`run_echo_load` is the load generator itself, usable as a plain function call
(the accounting test calls it).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from array import array
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from itertools import repeat
from multiprocessing.connection import Connection
from pathlib import Path
from typing import IO, Any

import psutil
import uvloop

from wsfleet.loadtest.wsclient import OP_BINARY, OP_TEXT, WSConnection, build_frame, connect

HOST = "127.0.0.1"
DEFAULT_SERVERS = (
    "websockets=python -m wsfleet.loadtest.ws_echo_server --port {port}",
    "wsfleet-1=wsfleet serve --port {port} --shards 1",
    "wsfleet-2=wsfleet serve --port {port} --shards 2",
)
# Keep one round-trip time in this many: enough for p99 and bounded memory on long runs.
LATENCY_STRIDE = 4
# Latency points one load process sends back (quantiles of its sorted sample).
LATENCY_POINTS = 20_000
MAX_ERROR_SAMPLES = 5
CONNECT_CONCURRENCY = 64


# -- the load generator (runs in each load process) -----------------------------------------


@dataclass
class LoadResult:
    """What one load process saw. Counts cover the whole run unless they say ``window``."""

    connections: int
    sent: int = 0  # messages written
    received: int = 0  # echoes received
    in_flight: int = 0  # sent - received on open connections when they were closed
    window_received: int = 0
    window_s: float = 0.0
    cpu_s: float = 0.0  # this process's CPU time (user + system) in the window
    errors: int = 0  # mismatches + unexpected closes + protocol errors
    mismatches: int = 0
    error_samples: list[str] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)  # sorted round-trip sample, seconds

    @property
    def rate(self) -> float:
        return self.window_received / self.window_s if self.window_s > 0 else 0.0


class _Load:
    """State shared by the connections of one load process (one event loop, no locking)."""

    def __init__(self) -> None:
        self.sending = False
        self.measuring = False
        self.sent = 0
        self.received = 0
        self.errors = 0
        self.mismatches = 0
        self.error_samples: list[str] = []
        self.latencies = array("d")

    def error(self, why: str) -> None:
        self.errors += 1
        if len(self.error_samples) < MAX_ERROR_SAMPLES:
            self.error_samples.append(why)


def payload_for(index: int, size: int) -> bytes:
    """A distinct ASCII payload per connection (valid as text; an echo sent to the wrong
    connection shows up as a mismatch)."""
    unit = f"<{index}:wsfleet-echo>".encode("ascii")
    return (unit * (size // len(unit) + 1))[:size]


class EchoConnection(WSConnection):
    """Keeps messages in flight: every echo received is checked and answered with a new one."""

    def __init__(self, host: str, port: int, *, load: _Load, payload: bytes, opcode: int) -> None:
        super().__init__(host, port)
        self.load = load
        self.payload = payload
        self.opcode = opcode
        # Built once and written for every message: see build_frame on reusing a masked frame.
        self.frame = build_frame(opcode, payload)
        self.sent_at: deque[float] = deque()  # send times of the messages in flight, in order
        self.now = 0.0
        self.echoed = 0

    def start(self, inflight: int) -> None:
        self.sent_at.extend(repeat(time.perf_counter(), inflight))
        self.load.sent += inflight
        self.send_raw(self.frame * inflight)

    def data_received(self, data: bytes) -> None:
        # One clock read per socket read: echoes that arrive together share a receive time.
        self.now = time.perf_counter()
        self.echoed = 0
        super().data_received(data)
        k = self.echoed
        load = self.load
        if k and load.sending and self.is_open:
            # One write for all the replacements: a system call per message would make the
            # client, not the server, the bottleneck.
            self.sent_at.extend(repeat(time.perf_counter(), k))
            load.sent += k
            self.send_raw(self.frame * k if k > 1 else self.frame)

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
            load.latencies.append(self.now - sent_at)

    def on_close(self, code: int | None, reason: str) -> None:
        if self.load.sending:
            self.load.error(f"server closed a connection during the run (code {code} {reason!r})")


def thin_sorted(values: Sequence[float], points: int) -> list[float]:
    """``points`` evenly spaced order statistics of sorted ``values`` (all of them if fewer)."""
    n = len(values)
    if n <= points:
        return list(values)
    return [values[(i * (n - 1)) // (points - 1)] for i in range(points)]


def percentile(sorted_values: Sequence[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


async def _sleep_until(deadline: float) -> None:
    delay = deadline - time.monotonic()
    if delay > 0:
        await asyncio.sleep(delay)


async def _echo_load(
    host: str,
    port: int,
    *,
    connections: int,
    inflight: int,
    size: int,
    seconds: float,
    warmup: float,
    text: bool,
    first_index: int,
    start_at: Callable[[], float] | None,
    connect_timeout: float,
    drain_timeout: float,
) -> LoadResult:
    load = _Load()
    opcode = OP_TEXT if text else OP_BINARY
    result = LoadResult(connections=connections)
    conns: list[EchoConnection] = []
    gate = asyncio.Semaphore(CONNECT_CONCURRENCY)  # a burst of SYNs could overflow the backlog

    async def open_one(index: int) -> EchoConnection:
        async with gate:
            return await connect(
                host,
                port,
                EchoConnection,
                timeout=connect_timeout,
                load=load,
                payload=payload_for(index, size),
                opcode=opcode,
            )

    try:
        opened = await asyncio.gather(
            *(open_one(first_index + i) for i in range(connections)), return_exceptions=True
        )
        conns = [c for c in opened if isinstance(c, EchoConnection)]
        failures = [c for c in opened if not isinstance(c, EchoConnection)]
        if failures:
            raise ConnectionError(
                f"{len(failures)} of {connections} connections failed: {failures[0]!r}"
            )

        # Blocking is fine here: nothing is in flight until the start time.
        t_go = start_at() if start_at is not None else time.monotonic()
        await _sleep_until(t_go)
        load.sending = True
        for conn in conns:
            conn.start(inflight)

        await _sleep_until(t_go + warmup)
        received0 = load.received
        cpu0 = time.process_time()
        wall0 = time.perf_counter()
        load.measuring = True
        await _sleep_until(t_go + warmup + seconds)
        load.measuring = False
        result.window_s = time.perf_counter() - wall0
        result.cpu_s = time.process_time() - cpu0
        result.window_received = load.received - received0
        load.sending = False

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
        for conn in conns:
            conn.close()
        if conns:
            await asyncio.wait([c.closed for c in conns], timeout=drain_timeout)
    finally:
        for conn in conns:
            conn.abort()
    for conn in conns:
        if conn.error is not None:
            load.error(f"protocol: {conn.error}")
    result.sent = load.sent
    result.received = load.received
    result.errors = load.errors
    result.mismatches = load.mismatches
    result.error_samples = load.error_samples
    result.latencies = thin_sorted(sorted(load.latencies), LATENCY_POINTS)
    return result


def run_echo_load(
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
) -> LoadResult:
    """Run the echo load against ``host:port`` on a fresh uvloop loop in this thread.

    Opens ``connections`` connections, then calls ``start_at()`` (if given; it may
    block) for the ``time.monotonic()`` at which to start sending; counts over
    ``[start + warmup, start + warmup + seconds]``; drains and closes. Takes about
    ``warmup + seconds`` plus connection set-up.
    """
    return uvloop.run(
        _echo_load(
            host,
            port,
            connections=connections,
            inflight=inflight,
            size=size,
            seconds=seconds,
            warmup=warmup,
            text=text,
            first_index=first_index,
            start_at=start_at,
            connect_timeout=connect_timeout,
            drain_timeout=drain_timeout,
        )
    )


def _client_main(pipe: Connection, cpu: int | None, host: str, port: int, cfg: dict) -> None:
    """Entry point of one load process: pin, connect, report ready, wait for go, run."""
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})

    def start_at() -> float:
        pipe.send(("ready", None))
        if not pipe.poll(120):
            raise TimeoutError("no start time from the benchmark process")
        return pipe.recv()

    try:
        result = run_echo_load(host, port, start_at=start_at, **cfg)
    except BaseException as e:  # reported to the parent, which decides
        pipe.send(("failed", f"{type(e).__name__}: {e}"))
    else:
        # A plain dict: the class pickles under a different module name in a spawned child.
        pipe.send(("done", asdict(result)))
    finally:
        pipe.close()


# -- the servers ----------------------------------------------------------------------------


class ServerFailed(Exception):
    pass


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def server_argv(template: str, port: int) -> list[str]:
    argv = shlex.split(template.format(port=port, host=HOST))
    if not argv:
        raise ServerFailed("empty command")
    exe = argv[0]
    if exe in ("python", "python3"):
        argv[0] = sys.executable
    elif "/" not in exe and shutil.which(exe) is None:
        beside = Path(sys.executable).parent / exe
        if os.access(beside, os.X_OK):
            argv[0] = str(beside)
        else:
            raise ServerFailed(f"command not found: {exe}")
    return argv


async def _probe(port: int, timeout: float) -> None:
    conn = await connect(HOST, port, timeout=timeout)
    conn.close()
    await asyncio.wait_for(asyncio.shield(conn.closed), timeout)


class ServerProcess:
    """One started server and every process under it (only ever signalled by pid)."""

    def __init__(self, name: str, template: str, cpus: str) -> None:
        self.name = name
        self.port = free_port()
        argv = server_argv(template, self.port)
        if cpus:
            argv = ["taskset", "-c", cpus, *argv]
        self.argv = argv
        self.log: IO[bytes] = tempfile.TemporaryFile()
        # Own session: a Ctrl-C on the terminal reaches the benchmark only, which then stops
        # the server itself (in a finally).
        try:
            self.proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=self.log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        except OSError as e:
            self.log.close()
            raise ServerFailed(f"cannot start {argv[0]}: {e}") from e
        self.root = psutil.Process(self.proc.pid)
        self.tree: dict[tuple[int, float], psutil.Process] = {}
        self._remember(self.root)

    def _remember(self, p: psutil.Process) -> None:
        try:
            self.tree[(p.pid, p.create_time())] = p
        except psutil.NoSuchProcess:
            pass

    def refresh_tree(self) -> None:
        try:
            children = self.root.children(recursive=True)
        except psutil.NoSuchProcess:
            return
        for child in children:
            self._remember(child)

    def log_tail(self, lines: int = 8) -> str:
        self.log.seek(0)
        text = self.log.read().decode("utf-8", "replace").strip().splitlines()
        return " | ".join(text[-lines:])

    def wait_ready(self, timeout: float, settle: float) -> None:
        deadline = time.monotonic() + timeout
        last_error = "no attempt"
        while time.monotonic() < deadline:
            code = self.proc.poll()
            if code is not None:
                raise ServerFailed(f"exited with status {code} at start: {self.log_tail()}")
            try:
                uvloop.run(_probe(self.port, timeout=min(2.0, timeout)))
            except (OSError, TimeoutError) as e:  # HandshakeError is an OSError too
                last_error = f"{type(e).__name__}: {e}"
                time.sleep(0.05)
                continue
            # Servers that start workers behind SO_REUSEPORT may accept before every worker
            # listens; give them a moment so the connections spread as they will in use.
            time.sleep(settle)
            if self.proc.poll() is not None:
                raise ServerFailed(f"exited with status {self.proc.returncode} after start")
            self.refresh_tree()
            return
        raise ServerFailed(f"no WebSocket handshake within {timeout:.0f} s ({last_error})")

    def cpu_seconds(self) -> float:
        """User + system CPU of the live tree, plus what reaped children left to their parents."""
        self.refresh_tree()
        total = 0.0
        for p in list(self.tree.values()):
            try:
                t = p.cpu_times()
            except psutil.NoSuchProcess:
                continue
            total += t.user + t.system + t.children_user + t.children_system
        return total

    def stop(self, timeout: float) -> dict[str, Any]:
        """SIGTERM to the server, then SIGKILL to whatever is left of its tree."""
        self.refresh_tree()
        t0 = time.monotonic()
        status: int | None = None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            status = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
        # The tree may still be shutting down after the root exits; wait the same bound.
        others = [p for p in self.tree.values() if p.pid != self.proc.pid]
        remaining = max(0.1, timeout - (time.monotonic() - t0))
        _, alive = psutil.wait_procs(others, timeout=remaining)
        killed = []
        if status is None:
            self.proc.kill()
            status = self.proc.wait(5)
            killed.append(self.proc.pid)
        for p in alive:
            try:
                p.kill()  # psutil checks the pid still names the same process
                killed.append(p.pid)
            except psutil.NoSuchProcess:
                pass
        _, still = psutil.wait_procs(alive, timeout=5)
        self.log.close()
        return {
            "exit_status": status,
            "stop_s": round(time.monotonic() - t0, 3),
            "killed": killed,
            "left_running": [p.pid for p in still],
        }


# -- one run --------------------------------------------------------------------------------


def parse_cpus(spec: str) -> list[int]:
    cpus: list[int] = []
    for part in filter(None, spec.split(",")):
        lo, _, hi = part.partition("-")
        cpus.extend(range(int(lo), int(hi or lo) + 1))
    return cpus


def split_evenly(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def run_clients(
    port: int, args: argparse.Namespace, server: ServerProcess
) -> tuple[list[LoadResult], float, float]:
    """Run the load processes; return their results, the server's CPU seconds in the window
    and the window length as this process measured it."""
    ctx = multiprocessing.get_context("spawn")  # a fresh interpreter: no inherited loop state
    cpus = parse_cpus(args.client_cpus)
    shares = [n for n in split_evenly(args.connections, args.client_procs) if n > 0]
    procs: list[tuple[multiprocessing.process.BaseProcess, Connection]] = []
    try:
        first = 0
        for i, n in enumerate(shares):
            cfg = {
                "connections": n,
                "inflight": args.inflight,
                "size": args.size,
                "seconds": args.seconds,
                "warmup": args.warmup,
                "text": args.text,
                "first_index": first,
                "drain_timeout": args.drain_timeout,
            }
            first += n
            mine, theirs = ctx.Pipe()
            cpu = cpus[i % len(cpus)] if cpus else None
            proc = ctx.Process(
                target=_client_main, args=(theirs, cpu, HOST, port, cfg), daemon=True
            )
            proc.start()
            theirs.close()
            procs.append((proc, mine))

        deadline = time.monotonic() + 60
        for _, pipe in procs:
            if not pipe.poll(max(0.0, deadline - time.monotonic())):
                raise RuntimeError("a load process did not connect within 60 s")
            kind, detail = pipe.recv()
            if kind != "ready":
                raise RuntimeError(f"load process: {detail}")
        t_go = time.monotonic() + 0.1
        for _, pipe in procs:
            pipe.send(t_go)

        _sleep_until_sync(t_go + args.warmup)
        cpu0 = server.cpu_seconds()
        w0 = time.monotonic()
        _sleep_until_sync(t_go + args.warmup + args.seconds)
        server_cpu = server.cpu_seconds() - cpu0
        window = time.monotonic() - w0

        results: list[LoadResult] = []
        deadline = time.monotonic() + 2 * args.drain_timeout + 30
        for _, pipe in procs:
            if not pipe.poll(max(0.0, deadline - time.monotonic())):
                raise RuntimeError("a load process did not finish in time")
            kind, detail = pipe.recv()
            if kind != "done":
                raise RuntimeError(f"load process: {detail}")
            results.append(LoadResult(**detail))
        return results, server_cpu, window
    finally:
        for proc, pipe in procs:
            pipe.close()
            proc.join(10)
            if proc.is_alive():
                proc.kill()  # SIGKILL to that pid only
                proc.join(5)


def _sleep_until_sync(deadline: float) -> None:
    delay = deadline - time.monotonic()
    if delay > 0:
        time.sleep(delay)


def one_run(name: str, template: str, args: argparse.Namespace) -> dict[str, Any]:
    """Start the server, load it, stop it. Raises ServerFailed if it never served."""
    server = ServerProcess(name, template, args.server_cpus)
    run: dict[str, Any] = {"port": server.port, "argv": server.argv}
    try:
        server.wait_ready(args.start_timeout, args.settle)
        try:
            results, server_cpu, window = run_clients(server.port, args, server)
        except (RuntimeError, OSError, EOFError) as e:
            run.update(ok=False, failure=f"{e!r}; server log: {server.log_tail(4)}")
            return run
        rate = sum(r.rate for r in results)
        client_cpu = sum(r.cpu_s / r.window_s for r in results if r.window_s > 0)
        latencies = sorted(x for r in results for x in r.latencies)
        run.update(
            ok=True,
            msgs_per_s=rate,
            client_cpu_pct=100 * client_cpu,
            server_cpu_pct=100 * server_cpu / window,
            server_us_per_msg=1e6 * server_cpu / (rate * window) if rate else float("nan"),
            p50_us=1e6 * percentile(latencies, 0.50),
            p99_us=1e6 * percentile(latencies, 0.99),
            window_received=sum(r.window_received for r in results),
            sent=sum(r.sent for r in results),
            received=sum(r.received for r in results),
            in_flight_at_close=sum(r.in_flight for r in results),
            errors=sum(r.errors for r in results),
            mismatches=sum(r.mismatches for r in results),
            error_samples=[s for r in results for s in r.error_samples][:MAX_ERROR_SAMPLES],
            server_processes=len(server.tree),
        )
        return run
    finally:
        run["stop"] = server.stop(args.stop_timeout)


# -- main -----------------------------------------------------------------------------------


def summarize(runs: list[dict[str, Any]]) -> dict[str, float] | None:
    good = [r for r in runs if r.get("ok")]
    if not good:
        return None
    keys = ("msgs_per_s", "client_cpu_pct", "server_cpu_pct", "server_us_per_msg", "p50_us")
    summary = {k: statistics.median(r[k] for r in good) for k in keys}
    summary["p99_us"] = statistics.median(r["p99_us"] for r in good)
    summary["errors"] = sum(r["errors"] for r in runs if r.get("ok"))
    summary["runs_ok"] = len(good)
    return summary


def print_table(servers: list[dict[str, Any]], client_capacity_pct: float) -> None:
    base = servers[0]["summary"]["msgs_per_s"] if servers[0]["summary"] else None
    vs = f"vs {servers[0]['name']}"
    head = (
        f"{'server':<14} {'msg/s':>10} {vs:>14} {'client CPU':>10} {'server CPU':>10} "
        f"{'srv us/msg':>10} {'p50 us':>8} {'p99 us':>8} {'errors':>6} {'runs':>5}"
    )
    print(head)
    print("-" * len(head))
    for s in servers:
        m = s["summary"]
        if m is None:
            print(f"{s['name']:<14} failed: {s['failure']}")
            continue
        ratio = f"{m['msgs_per_s'] / base:.2f}x" if base else "-"
        print(
            f"{s['name']:<14} {m['msgs_per_s']:>10,.0f} {ratio:>14} "
            f"{m['client_cpu_pct']:>9.0f}% {m['server_cpu_pct']:>9.0f}% "
            f"{m['server_us_per_msg']:>10.1f} {m['p50_us']:>8.0f} {m['p99_us']:>8.0f} "
            f"{m['errors']:>6} {m['runs_ok']:>5}"
        )
        if m["client_cpu_pct"] >= 0.9 * client_capacity_pct:
            print(f"{'':<14} note: the load processes were near saturation: the figure is a floor")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--inflight", type=int, default=16, help="messages in flight per conn")
    parser.add_argument("--size", type=int, default=64, help="message size in bytes")
    parser.add_argument("--seconds", type=float, default=5.0, help="measured window")
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--client-procs", type=int, default=1)
    parser.add_argument("--server-cpus", default="0", help="taskset -c list; '' for no pinning")
    parser.add_argument("--client-cpus", default="1", help="CPUs for the load processes")
    parser.add_argument(
        "--server",
        action="append",
        metavar="NAME=COMMAND",
        help="a server command with {port}; repeat; replaces the default set",
    )
    parser.add_argument("--text", action="store_true", help="text messages instead of binary")
    parser.add_argument("--start-timeout", type=float, default=20.0)
    parser.add_argument("--settle", type=float, default=0.5, help="wait after the first handshake")
    parser.add_argument("--stop-timeout", type=float, default=10.0)
    parser.add_argument("--drain-timeout", type=float, default=5.0)
    parser.add_argument("--json", metavar="FILE")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.runs < 1 or args.connections < 1 or args.inflight < 1 or args.size < 0:
        parser.error("--runs, --connections and --inflight must be >= 1, --size >= 0")
    if args.client_procs < 1 or args.seconds <= 0 or args.warmup < 0:
        parser.error("--client-procs must be >= 1, --seconds > 0, --warmup >= 0")
    allowed = os.sched_getaffinity(0)
    client_cpus = parse_cpus(args.client_cpus)
    if not set(client_cpus) <= allowed:
        parser.error(f"--client-cpus {args.client_cpus} not within this process's CPUs {allowed}")
    if set(client_cpus) & set(parse_cpus(args.server_cpus)):
        print("warning: client and server CPUs overlap; the figures will be noisier")

    servers: list[dict[str, Any]] = []
    for spec in args.server or DEFAULT_SERVERS:
        name, sep, command = spec.partition("=")
        if not sep or not name.strip() or "{port}" not in command:
            parser.error(f"--server {spec!r}: expected NAME=COMMAND with {{port}} in COMMAND")
        servers.append(
            {"name": name.strip(), "command": command.strip(), "runs": [], "failure": None}
        )

    print(
        f"echo: {args.connections} connections x {args.inflight} in flight x {args.size} B "
        f"{'text' if args.text else 'binary'}, {args.warmup:g} s warm-up + {args.seconds:g} s, "
        f"{args.runs} run(s); server CPUs {args.server_cpus or 'any'}, "
        f"{args.client_procs} load process(es) on CPUs {args.client_cpus or 'any'}",
        flush=True,
    )
    for round_no in range(1, args.runs + 1):
        for s in servers:
            if s["failure"] is not None and not s["runs"]:
                continue  # never started: do not retry every round
            print(f"[{round_no}/{args.runs}] {s['name']}: ", end="", flush=True)
            try:
                run = one_run(s["name"], s["command"], args)
            except ServerFailed as e:
                s["failure"] = str(e)
                print(f"FAILED: {e}", flush=True)
                if not s["runs"]:
                    continue
                s["runs"].append({"ok": False, "failure": str(e)})
                continue
            s["runs"].append(run)
            stop = run["stop"]
            stop_text = f"stopped: status {stop['exit_status']} in {stop['stop_s']:.2f} s"
            if stop["killed"]:
                stop_text += f", SIGKILLed {stop['killed']}"
            if stop["left_running"]:
                stop_text += f", STILL RUNNING {stop['left_running']}"
            if not run.get("ok"):
                print(f"run failed: {run['failure']}; {stop_text}", flush=True)
                continue
            print(
                f"{run['msgs_per_s']:,.0f} msg/s, client CPU {run['client_cpu_pct']:.0f}%, "
                f"server CPU {run['server_cpu_pct']:.0f}% ({run['server_us_per_msg']:.1f} us/msg),"
                f" {run['server_processes']} server process(es),"
                f" p50 {run['p50_us']:.0f} us, p99 {run['p99_us']:.0f} us, "
                f"errors {run['errors']}; {stop_text}",
                flush=True,
            )
            for sample in run["error_samples"]:
                print(f"    {sample}")

    for s in servers:
        s["summary"] = summarize(s["runs"])
        if s["summary"] is None and s["failure"] is None:
            s["failure"] = "no successful run"
    # Each load process is one thread: it can use at most one of the CPUs it may run on.
    capacity = 100.0 * min(args.client_procs, len(client_cpus) or os.cpu_count() or 1)
    print()
    print_table(servers, capacity)
    if args.json:
        config = {k: v for k, v in vars(args).items() if k not in ("json", "server")}
        with open(args.json, "w") as f:
            json.dump(
                {"config": config, "cpu_count": os.cpu_count(), "servers": servers}, f, indent=1
            )
    ok = all(s["summary"] is not None and s["summary"]["errors"] == 0 for s in servers)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
