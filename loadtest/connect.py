"""The connect scenario: handshake + close cycles per second.

``concurrency`` loops, each repeating TCP connect + WebSocket handshake, then the
close handshake (the client sends 1000 as soon as the 101 is checked, waits for the
server's close frame and the end of TCP), all under one timer
(``connect_timeout + close_timeout``) per cycle. Cycles that end in the window give
handshakes/s; handshake latency (connect to 101) goes to the histogram; failed or
timed-out handshakes are ``failures`` (errors); a server that ends TCP without a close
frame counts as ``unclean_closes`` (not an error).

`run_connect` is the load itself as a plain function call (the scenario tests
call it); `ConnectScenario` is how the front ends run it.

May import `counters`, `loadclient`, `loadprocs`, `report`, `scenario` and `wsclient`.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from wsfleet.loadtest.counters import (
    MAX_LATENCY_SAMPLES,
    Counters,
    LoadState,
    WindowClock,
    cpu_figures,
    error_samples,
    latency_figures,
    total,
)
from wsfleet.loadtest.loadclient import on_uvloop, sleep_until
from wsfleet.loadtest.loadprocs import Load, split_evenly
from wsfleet.loadtest.report import Column, Table
from wsfleet.loadtest.scenario import ProcessScenario
from wsfleet.loadtest.wsclient import CLOSE_1000, WSConnection


@dataclass(kw_only=True)
class ConnectCounts(Counters):
    """Client-side accounting of one connect run (`counters.Counters`: sent counts
    connections started, received handshakes done (101), window_received the cycles that
    ended in the window, latencies TCP connect to 101)."""

    concurrency: int
    cycles: int = 0  # handshake and close done
    failures: int = 0  # handshakes that failed or timed out
    unclean_closes: int = 0  # TCP ended without the server's close frame

    @property
    def attempts(self) -> int:
        return self.sent

    @property
    def handshakes(self) -> int:
        return self.received


class CycleConnection(WSConnection):
    """One handshake + close cycle: as soon as the 101 is checked it sends its close (1000);
    the server's close frame (answered by `WSConnection`) or the end of TCP ends it."""

    opened_ns = 0

    def on_open(self) -> None:
        self.opened_ns = time.perf_counter_ns()
        if self.transport is not None:
            self.transport.write(CLOSE_1000)
            self._close_sent = True


@on_uvloop
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
) -> ConnectCounts:
    load = LoadState()
    result = ConnectCounts(concurrency=concurrency)
    t_go = start_at() if start_at is not None else time.monotonic()
    w0 = t_go + warmup
    w1 = w0 + seconds
    aloop = asyncio.get_running_loop()

    def factory() -> CycleConnection:
        return CycleConnection(host, port, path, close_timeout=close_timeout)

    async def loop() -> None:
        await sleep_until(t_go)
        while time.monotonic() < w1:
            load.sent += 1
            t0 = time.perf_counter_ns()
            conn: CycleConnection | None = None
            code: int | None = None
            try:
                # TCP connect, the upgrade and the close handshake under one timer: no task,
                # shield or second timeout per cycle.
                async with asyncio.timeout(connect_timeout + close_timeout):
                    _, conn = await aloop.create_connection(factory, host, port)
                    code, _ = await conn.closed
            except (OSError, TimeoutError) as e:
                if conn is None or not conn.opened_ns:
                    result.failures += 1
                    load.error(f"handshake: {type(e).__name__}: {e}")
                    if conn is not None:
                        conn.abort()
                    await asyncio.sleep(0.01)  # do not spin on a refusing server
                    continue
                load.error("close: the connection did not end")
            finally:
                if conn is not None:
                    conn.abort()  # a no-op once TCP is gone
            if not conn.opened_ns:
                # The connection ended before a valid 101 (HandshakeError in conn.opened).
                result.failures += 1
                exc = conn.opened.exception() if conn.opened.done() else None
                load.error(f"handshake: {exc or conn.error or 'connection lost before the 101'}")
                await asyncio.sleep(0.01)
                continue
            load.received += 1
            if conn.error is not None:
                load.error(f"protocol: {conn.error}")
            if code is None:
                result.unclean_closes += 1
            result.cycles += 1
            if w0 <= time.monotonic() <= w1:
                result.window_received += 1
                if len(load.latencies) < MAX_LATENCY_SAMPLES:
                    load.latencies.append((conn.opened_ns - t0) // 1000)

    tasks = [asyncio.ensure_future(loop()) for _ in range(concurrency)]
    try:
        await sleep_until(w0)
        clock = WindowClock()
        wall0 = time.perf_counter()
        await sleep_until(w1)
        result.window_s = time.perf_counter() - wall0
        clock.stop(result)
        # Each loop ends after its current cycle, which the timeouts bound.
        await asyncio.wait_for(asyncio.gather(*tasks), connect_timeout + close_timeout + 5)
    finally:
        for task in tasks:
            task.cancel()
    load.finish(result)
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
) -> ConnectCounts:
    """Run ``concurrency`` handshake + close loops against ``ws://host:port/path`` on a fresh
    uvloop loop.

    Starts at ``start_at()`` (if given; it may block) and stops starting cycles at
    ``start + warmup + seconds``; cycles that end inside ``[start + warmup, start +
    warmup + seconds]`` count for the rate. The counts are final when it returns.
    """
    if concurrency < 1 or seconds <= 0 or warmup < 0:
        raise ValueError("need concurrency >= 1, seconds > 0, warmup >= 0")
    return _connect_loops(
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


TABLE = Table(
    rate="handshakes_per_s",
    medians=(
        "handshakes_per_s",
        "client_cpu_pct",
        "client_busy_pct",
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
        Column("cli busy", "client_busy_pct", 8, ".0f", "%"),
        Column("server CPU", "server_cpu_pct", 10, ".0f", "%"),
        Column("srv us/hs", "server_us_per_handshake", 9, ".0f"),
        Column("p50 us", "p50_us", 8, ",.0f"),
        Column("p99 us", "p99_us", 8, ",.0f"),
        Column("errors", "errors", 6),
        Column("runs", "runs_ok", 5),
    ),
    name_width=12,
)


class ConnectScenario(ProcessScenario):
    """Handshake + close cycles per second."""

    name = "connect"
    mode = "echo"
    table = TABLE
    seconds = 3.0

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--concurrency",
            "--connections",
            dest="concurrency",
            type=int,
            default=32,
            help="handshake + close loops at once",
        )

    def check(self, parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
        if args.concurrency < args.client_procs:
            parser.error("--concurrency must be >= --client-procs")

    def config_text(self, args: argparse.Namespace) -> str:
        return (
            f"connect: {args.concurrency} handshake + close loops, {args.warmup:g} s warm-up + "
            f"{args.seconds:g} s"
        )

    def describe(self, run: dict[str, Any]) -> str:
        return (
            f"{run['handshakes_per_s']:,.0f} handshakes/s (connect + close), client CPU "
            f"{run['client_cpu_pct']:.0f}% (busy {run['client_busy_pct']:.0f}%, "
            f"{run['client_us_per_handshake']:.0f} us/handshake), server CPU "
            f"{run['server_cpu_pct']:.0f}% "
            f"({run['server_us_per_handshake']:.0f} us/handshake), {run['server_processes']} "
            f"server process(es), handshake p50 {run['p50_us']:,.0f} us, p99 "
            f"{run['p99_us']:,.0f} us, cycles {run['cycles']:,}, failures {run['failures']}, "
            f"unclean closes {run['unclean_closes']}, errors {run['errors']}"
        )

    def load(self, args: argparse.Namespace) -> Load:
        configs = [
            {"concurrency": n, "seconds": args.seconds, "warmup": args.warmup}
            for n in split_evenly(args.concurrency, args.client_procs)
            if n > 0
        ]
        return Load(run_connect, ConnectCounts, configs, 30)

    def figures(
        self, results: list[ConnectCounts], server_cpu: float, window: float
    ) -> dict[str, Any]:
        rate = sum(r.rate for r in results)
        return {
            "handshakes_per_s": rate,
            **cpu_figures(results, server_cpu, window, rate, "handshake"),
            **latency_figures(results),
            "cycles": total(results, "cycles"),
            "failures": total(results, "failures"),
            "unclean_closes": total(results, "unclean_closes"),
            "errors": total(results, "errors"),
            "error_samples": error_samples(results),
        }


SCENARIO = ConnectScenario()
