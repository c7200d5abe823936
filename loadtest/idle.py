"""The idle scenario: the server's memory per idle connection.

Raises this process's ``RLIMIT_NOFILE`` soft limit as far as the hard limit
(`procstats.ResourceLimitError` with the numbers if ``connections`` cannot fit),
measures the server's process tree memory (RSS and USS summed over the root and
every descendant, psutil; without a server pid the memory figures are NaN and
only whether the connections stayed open is reported), opens ``connections``
connections at ``rate`` per second (at most ``loadclient.CONNECT_CONCURRENCY``
handshakes at once) that then stay idle, waits ``hold`` seconds, measures again
and reports bytes per connection; then checks that every one is still open and
closes them all. The connections live in the driving process (it reads the
server's memory), pinned to ``--client-cpus`` for the run.

`run_idle` is the load itself as a plain function call (the scenario tests call
it); `IdleScenario` is how the front ends run it.

May import `counters`, `loadclient`, `loadprocs`, `procstats`, `report`, `scenario`,
`servers` and `wsclient`.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from dataclasses import dataclass
from typing import Any

from wsfleet.loadtest.counters import Counters, LoadState
from wsfleet.loadtest.loadclient import (
    CONNECT_CONCURRENCY,
    close_connections,
    on_uvloop,
    sleep_until,
)
from wsfleet.loadtest.loadprocs import Progress
from wsfleet.loadtest.procstats import FD_MARGIN, parse_cpus, pinned, raise_nofile, tree_memory
from wsfleet.loadtest.report import Column, Table
from wsfleet.loadtest.scenario import Scenario
from wsfleet.loadtest.servers import Target
from wsfleet.loadtest.wsclient import WSConnection, connect


@dataclass(kw_only=True)
class IdleCounts(Counters):
    """Client-side accounting of one idle run (`counters.Counters`: sent counts connections
    attempted, received those opened; no window and no latencies)."""

    requested: int
    asked_rate: float  # connections per second asked for
    failures: int = 0
    still_open: int = 0  # at the end of the hold
    closed_early: int = 0  # closed by the server or lost before the hold ended
    open_s: float = 0.0  # from the first connect to the last handshake
    nofile_soft: int = 0
    rss_before: int = 0
    rss_after: int = 0
    uss_before: int | None = None
    uss_after: int | None = None
    memory_measured: bool = False  # False without a server pid: the figures are NaN
    server_processes: int = 0

    @property
    def opened(self) -> int:
        return self.received

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


@on_uvloop
async def _idle(
    host: str,
    port: int,
    *,
    result: IdleCounts,
    hold: float,
    server_pid: int | None,
    connect_timeout: float,
    close_timeout: float,
    path: str,
) -> IdleCounts:
    load = LoadState()
    if server_pid is not None:
        before = tree_memory(server_pid)
        result.rss_before, result.uss_before = before.rss, before.uss
    gate = asyncio.Semaphore(CONNECT_CONCURRENCY)
    conns: list[WSConnection] = []
    t0 = time.monotonic()
    cpu0 = time.process_time()
    last_open = t0

    async def open_one(i: int) -> None:
        nonlocal last_open
        await sleep_until(t0 + i / result.asked_rate)
        async with gate:
            load.sent += 1
            try:
                conn = await connect(
                    host, port, timeout=connect_timeout, close_timeout=close_timeout, path=path
                )
            except (OSError, TimeoutError) as e:
                result.failures += 1
                load.error(f"connection {i}: {type(e).__name__}: {e}")
                return
        conns.append(conn)
        last_open = time.monotonic()

    try:
        # One task per connection, each waiting for its slot in the schedule.
        await asyncio.gather(*(open_one(i) for i in range(result.requested)))
        result.cpu_s = time.process_time() - cpu0
        load.received = len(conns)
        result.open_s = last_open - t0
        await asyncio.sleep(hold)
        if server_pid is not None:
            after = tree_memory(server_pid)
            result.rss_after, result.uss_after = after.rss, after.uss
            result.server_processes = after.processes
            result.memory_measured = True
        result.still_open = sum(1 for c in conns if c.is_open)
        result.closed_early = len(conns) - result.still_open
        if result.closed_early:
            load.error(f"{result.closed_early} connections were closed before the hold ended")
        await close_connections(conns, close_timeout + 1)
    finally:
        for conn in conns:
            conn.abort()
    load.finish(result, conns)
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
) -> IdleCounts:
    """Open ``connections`` idle connections to ``ws://host:port/path`` at ``rate``/s;
    measure ``server_pid``'s tree (without a pid, only whether they all stayed open).

    Raises `procstats.ResourceLimitError` before opening anything when the connections
    cannot fit in this process's file descriptor limit. Takes about ``connections /
    rate + hold`` seconds plus the close.
    """
    if connections < 1 or rate <= 0 or hold < 0:
        raise ValueError("need connections >= 1, rate > 0, hold >= 0")
    result = IdleCounts(requested=connections, asked_rate=rate)
    result.nofile_soft = raise_nofile(connections + FD_MARGIN)
    return _idle(
        host,
        port,
        result=result,
        hold=hold,
        server_pid=server_pid,
        connect_timeout=connect_timeout,
        close_timeout=close_timeout,
        path=path,
    )


TABLE = Table(
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


class IdleScenario(Scenario):
    """Connections that stay open; with the server's pid, its memory per connection."""

    name = "idle"
    mode = "echo"
    table = TABLE
    seconds = None
    one_process = True
    in_this_process = True

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--connections", type=int, default=2000)
        parser.add_argument(
            "--rate", type=float, default=1000.0, help="connections opened per second"
        )
        parser.add_argument(
            "--hold", type=float, default=1.0, help="seconds before measuring again"
        )

    def check(self, parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
        if args.connections < 1 or args.rate <= 0 or args.hold < 0:
            parser.error("need --connections >= 1, --rate > 0, --hold >= 0")

    def config_text(self, args: argparse.Namespace) -> str:
        return f"idle: {args.connections} connections at {args.rate:g}/s, hold {args.hold:g} s"

    def describe(self, run: dict[str, Any]) -> str:
        return (
            f"{run['kib_per_connection']:,.1f} KiB RSS per connection (USS "
            f"{run['uss_kib_per_connection']:,.1f} KiB), {run['opened']:,}/{run['requested']:,} "
            f"opened at {run['achieved_rate']:,.0f}/s, server RSS "
            f"{run['rss_before'] / 2**20:,.1f} -> {run['rss_after'] / 2**20:,.1f} MiB in "
            f"{run['server_processes']} process(es), failures {run['failures']}, closed early "
            f"{run['closed_early']}, errors {run['errors']}"
        )

    def prepare(self, args: argparse.Namespace) -> None:
        # Before any server starts, so that they inherit the limit too. ResourceLimitError
        # (a RuntimeError) if not.
        raise_nofile(args.connections + FD_MARGIN)

    def expected_seconds(self, args: argparse.Namespace) -> float:
        return args.connections / args.rate + args.hold

    def measure(
        self, args: argparse.Namespace, target: Target, progress: Progress
    ) -> dict[str, Any]:
        """One idle run against a server that is up, from this process pinned to
        ``--client-cpus`` for the run; the server's memory needs its pid (``target.pid``)."""
        with pinned(set(parse_cpus(args.client_cpus))):
            progress(
                f"opening {args.connections:,} connections at {args.rate:g}/s, holding "
                f"{args.hold:g} s",
                self.expected_seconds(args),
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


SCENARIO = IdleScenario()
