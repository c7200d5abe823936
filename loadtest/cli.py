"""wsfleet loadtest: one scenario's load against any WebSocket server, by its URL.

    wsfleet loadtest echo --url ws://127.0.0.1:9080 [--connections 50] [--inflight 16]
        [--size 64] [--text]
    wsfleet loadtest broadcast --url URL [--connections 100] [--senders 10] [--size 64]
        [--inflight 2]
    wsfleet loadtest connect --url URL [--concurrency 32]
    wsfleet loadtest idle --url URL [--connections 2000] [--rate 1000] [--hold 1]
    wsfleet loadtest mp-relay --url URL [--clients 50] [--mode all|unicast] [--inflight N]
        [--size 32]
  and for all of them:
        [--seconds S] [--warmup 1] [--procs 1] [--client-cpus LIST] [--server-pid PID]
        [--drain-timeout 5] [--no-progress] [--json FILE]

What the server at the URL must do: echo every message back to its sender (echo;
``wsfleet serve``), send every message to every other client (broadcast), accept
connections (connect, idle), or relay Godot 3.2's multiplayer protocol (mp-relay;
``wsfleet serve --gd-mp-api`` or Godot's own server). The scenarios are the
benchmarks' own (`scenarios.SCENARIOS`; their modules' docstrings say what each
sends and checks), run by `bench.measure` against a `servers.Target` made of the
URL; only the server is not started here. ``ws://`` only (the load generator has no
TLS); the URL's path (and query) goes into the request line.

The run is bounded: at most ``MAX_CONNECTIONS`` connections, a window of at most
``MAX_SECONDS``, and every wait in it has a timeout. ``--procs N`` spreads the
connections over N load processes (echo, connect, mp-relay; broadcast and idle
run in one), pinned round robin to ``--client-cpus`` if given. While it runs,
the phase (connecting, warm-up, measuring, draining) and its progress go to
stderr, with the server's CPU when ``--server-pid`` names it. Then a table of the
run's figures goes to stdout (latency percentiles from HdrHistograms), and
``--json FILE`` writes them with the options. ``--server-pid`` also gives the
server's CPU per message and, for idle, the memory per connection (RSS of the
process and all its descendants): without it idle reports only whether every
connection stayed open.

Exit status: 0 when the run completed without errors (nor missing deliveries),
1 when it failed or counted any, 2 for bad options, 130 on Ctrl-C.

May import `bench`, `procstats`, `report`, `scenario`, `scenarios` and `servers`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import threading
import time
from typing import IO, Any
from urllib.parse import urlsplit

import psutil

from wsfleet.loadtest import bench
from wsfleet.loadtest.procstats import ProcessTree, parse_cpus
from wsfleet.loadtest.report import client_capacity_pct, client_load_pct, config_of
from wsfleet.loadtest.scenario import Scenario
from wsfleet.loadtest.scenarios import HELP, SCENARIOS
from wsfleet.loadtest.servers import Target

MAX_CONNECTIONS = 100_000
MAX_SECONDS = 3600.0
MAX_PROCS = 64
MAX_INFLIGHT = 10_000
MAX_SIZE = 16 * 1024 * 1024
# The per-scenario counts worth a row after the table's columns, in this order.
COUNTS = (
    ("sent", "sent"),
    ("received", "received"),
    ("delivered", "delivered"),
    ("expected", "expected"),
    ("missing", "missing"),
    ("in_flight_at_close", "in flight at close"),
    ("mismatches", "mismatches"),
    ("sequence_errors", "sequence errors"),
    ("cycles", "cycles"),
    ("failures", "failures"),
    ("unclean_closes", "unclean closes"),
    ("requested", "requested"),
    ("opened", "opened"),
    ("still_open", "still open"),
    ("closed_early", "closed early"),
    ("max_us", "max latency us"),
    ("server_processes", "server processes"),
)


def parse_url(url: str) -> tuple[str, int, str]:
    """``ws://host[:port][/path][?query]`` as (host, port, request path). ValueError if not."""
    parts = urlsplit(url)
    if parts.scheme == "wss":
        raise ValueError("wss:// is not supported: the load generator has no TLS; use ws://")
    if parts.scheme != "ws" or not parts.hostname:
        raise ValueError(f"{url!r} is not a ws://host[:port][/path] URL")
    port = parts.port or 80  # ValueError for a port out of range
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    return parts.hostname, port, path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="wsfleet loadtest",
        description=__doc__.split("\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="wsfleet loadtest SCENARIO --help lists a scenario's options.",
    )
    sub = parser.add_subparsers(dest="scenario", required=True, metavar="SCENARIO")
    for name, scenario in SCENARIOS.items():
        p = sub.add_parser(name, help=HELP[name], description=HELP[name])
        p.add_argument("--url", required=True, help="ws://host[:port][/path] of the server")
        scenario.add_arguments(p)
        if scenario.seconds is not None:
            p.add_argument("--seconds", type=float, default=scenario.seconds, help="measured")
            p.add_argument("--warmup", type=float, default=1.0, help="seconds before measuring")
        else:
            p.set_defaults(seconds=0.0, warmup=0.0)
        if not scenario.one_process:
            p.add_argument(
                "--procs", dest="client_procs", type=int, default=1, help="load processes"
            )
        else:
            p.set_defaults(client_procs=1)
        p.add_argument("--client-cpus", default="", help="CPUs for the load (taskset -c list)")
        p.add_argument(
            "--server-pid",
            type=int,
            help="the server's process: its CPU (and for idle, memory) with its descendants",
        )
        p.add_argument("--drain-timeout", type=float, default=5.0)
        p.add_argument("--no-progress", action="store_true", help="nothing on stderr while running")
        p.add_argument("--json", metavar="FILE", help="write the figures and options here")
    return parser


def check_bounds(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse runs that would not end in reasonable time or would open too much."""
    for name in ("connections", "clients", "concurrency"):
        value = getattr(args, name, None)
        if value is not None and value > MAX_CONNECTIONS:
            parser.error(f"--{name}: at most {MAX_CONNECTIONS:,}")
    if not 0 <= args.seconds <= MAX_SECONDS or not 0 <= args.warmup <= MAX_SECONDS:
        parser.error(f"--seconds and --warmup: at most {MAX_SECONDS:g}")
    if getattr(args, "hold", 0) > MAX_SECONDS:
        parser.error(f"--hold: at most {MAX_SECONDS:g}")
    if getattr(args, "rate", 1) > MAX_CONNECTIONS:
        parser.error(f"--rate: at most {MAX_CONNECTIONS:,} connections/s")
    if not 1 <= args.client_procs <= MAX_PROCS:
        parser.error(f"--procs: 1 to {MAX_PROCS}")
    if (getattr(args, "inflight", None) or 0) > MAX_INFLIGHT:
        parser.error(f"--inflight: at most {MAX_INFLIGHT:,}")
    if getattr(args, "size", 0) > MAX_SIZE:
        parser.error(f"--size: at most {MAX_SIZE:,} bytes")
    if not 0 < args.drain_timeout <= 600:
        parser.error("--drain-timeout: more than 0, at most 600")
    cpus = parse_cpus(args.client_cpus)
    if not set(cpus) <= os.sched_getaffinity(0):
        parser.error(f"--client-cpus {args.client_cpus}: not all of them are allowed here")


class ProgressLine:
    """`loadprocs.Progress` on a terminal line (or a line per second when not a terminal):
    the phase, the time spent in it, and the server's CPU when its pid is known."""

    def __init__(self, stream: IO[str], pid: int | None, interval: float = 1.0) -> None:
        self.stream = stream
        self.tty = stream.isatty()
        self.interval = interval / 2 if self.tty else interval
        # Its own view of the server: the main thread reads the target's at the same time.
        self.tree = ProcessTree(pid) if pid is not None else None
        self.lock = threading.Lock()
        self.t0 = time.monotonic()
        self.phase = ""
        self.phase_t0 = self.t0
        self.expected: float | None = None
        self.last_cpu = (self.t0, self.tree.cpu_seconds() if self.tree else 0.0)
        self.server_pct: float | None = None
        self.width = 0
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="progress", daemon=True)
        self.thread.start()

    def __call__(self, phase: str, seconds: float | None) -> None:
        with self.lock:
            self.phase, self.expected = phase, seconds
            self.phase_t0 = time.monotonic()
        self._render()

    def _loop(self) -> None:
        while not self.done.wait(self.interval):
            if self.tree is not None:
                now, cpu = time.monotonic(), self.tree.cpu_seconds()
                t, c = self.last_cpu
                self.server_pct = 100 * (cpu - c) / (now - t) if now > t else None
                self.last_cpu = (now, cpu)
            self._render()

    def _render(self) -> None:
        with self.lock:
            if not self.phase:
                return
            now = time.monotonic()
            in_phase = now - self.phase_t0
            text = f"[{now - self.t0:6.1f} s] {self.phase}"
            if self.expected:
                text += f" {min(in_phase, self.expected):.1f}/{self.expected:g} s"
            else:
                text += f" {in_phase:.1f} s"
            if self.server_pct is not None:
                text += f" | server CPU {self.server_pct:.0f}%"
            if self.tty:
                self.stream.write("\r" + text.ljust(self.width))
                self.width = len(text)
            else:
                self.stream.write(text + "\n")
            self.stream.flush()

    def close(self) -> None:
        self.done.set()
        self.thread.join(5)
        if self.tty and self.width:
            self.stream.write("\n")
            self.stream.flush()


def _text(value: Any, spec: str = ",.0f") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, bool) or not isinstance(value, int | float):
        return str(value)
    return f"{value:,}" if isinstance(value, int) else f"{value:{spec}}"


def print_run(scenario: Scenario, run: dict[str, Any], note: str) -> None:
    """The figures of one run: the scenario table's columns, then its counts, one per line."""
    rows = [
        (c.title, _text(run[c.key], c.spec) + (c.suffix if _text(run[c.key]) != "-" else ""))
        for c in scenario.table.columns
        if c.key and c.key in run
    ]
    shown = {c.key for c in scenario.table.columns}
    rows += [
        (title, _text(run[key]))
        for key, title in COUNTS
        if key not in shown and run.get(key) is not None
    ]
    width = max(len(title) for title, _ in rows)
    print(f"{'':<{width}}  {scenario.name}")
    print("-" * (width + 2 + max(len(scenario.name), *(len(v) for _, v in rows))))
    for title, value in rows:
        print(f"{title:<{width}}  {value}")
    if note:
        print(note)
    for sample in run.get("error_samples", []):
        print(f"  error: {sample}")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    scenario = SCENARIOS[args.scenario]
    try:
        host, port, path = parse_url(args.url)
    except ValueError as e:
        parser.error(f"--url: {e}")
    scenario.check(parser, args)
    check_bounds(parser, args)
    try:
        target = Target(host, port, path, args.server_pid)
    except psutil.Error as e:
        parser.error(f"--server-pid {args.server_pid}: {e}")
    try:
        scenario.prepare(args)
    except RuntimeError as e:
        print(f"wsfleet loadtest {scenario.name}: {e}", file=sys.stderr)
        return 2

    print(
        f"{scenario.config_text(args)}; ws://{host}:{port}{path}, "
        f"{args.client_procs} load process(es) on CPUs {args.client_cpus or 'any'}, "
        f"server pid {args.server_pid or 'unknown'}; about "
        f"{scenario.expected_seconds(args):.0f} s plus connecting and closing",
        flush=True,
    )
    progress = None if args.no_progress else ProgressLine(sys.stderr, args.server_pid)
    started = time.monotonic()
    try:
        run = bench.measure(scenario, args, target, progress)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        if progress is not None:
            progress.close()
    run["elapsed_s"] = time.monotonic() - started
    if not run["ok"]:
        print(f"the run failed: {run['failure']}")
    else:
        notes = []
        if args.server_pid is None:
            notes.append("server figures: give --server-pid")
        capacity = client_capacity_pct(args, parse_cpus(args.client_cpus))
        if client_load_pct(run) >= 0.9 * capacity:
            notes.append("the load generator was near saturation: the rate is a floor")
        print()
        print_run(scenario, run, "; ".join(f"note: {n}" for n in notes))
    if args.json:
        with open(args.json, "w") as f:
            config = config_of(args)
            json.dump(
                {"scenario": scenario.name, "url": args.url, "config": config, "run": run},
                f,
                indent=1,
            )
    clean = run["ok"] and all(run[k] == 0 for k in scenario.table.sums)
    return 0 if clean else 1


if __name__ == "__main__":
    sys.exit(main())
