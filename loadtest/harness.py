"""What the benchmarks share: load processes, the servers under test, rounds and the table.

A benchmark (``echo_bench``, ``relay_bench``) brings its scenario: the load function
that runs in each load process, the figures it draws from their results, how one run
is printed and which columns the table has. This module does the rest, the same way
for every scenario:

* in each load process: the counters and error samples (`LoadState`, `LoadCounts`),
  the connections (`connections`), the shared start and the measured window
  (`run_window`), the close (`close_connections`), the event loop (`on_uvloop`);
* in the benchmark process: one server run (`one_run`: `ServerProcess` under
  ``taskset``, a bounded wait for a handshake, the load processes of `run_clients`
  pinned round robin, the server tree's CPU time over the window, SIGTERM then
  SIGKILL), the rounds over every server (`run_rounds`), and the medians, the table
  with the ratio to the first server, the JSON file and the exit status (`report`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
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
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import IO, Any, ParamSpec, TypeVar

import psutil
import uvloop

from wsfleet.loadtest.wsclient import WSConnection, connect

HOST = "127.0.0.1"
MAX_ERROR_SAMPLES = 5
CONNECT_CONCURRENCY = 64
# Latency points one load process sends back (quantiles of its sorted sample).
LATENCY_POINTS = 20_000

C = TypeVar("C", bound=WSConnection)
P = ParamSpec("P")
R = TypeVar("R")


# -- in each load process -------------------------------------------------------------------


@dataclass(kw_only=True)
class LoadCounts:
    """What every load process reports. Counts cover the whole run unless they say ``window``."""

    sent: int = 0  # messages written
    received: int = 0  # messages received
    window_received: int = 0
    window_s: float = 0.0
    cpu_s: float = 0.0  # this process's CPU time (user + system) in the window
    errors: int = 0
    error_samples: list[str] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)  # sorted round-trip sample, seconds

    @property
    def rate(self) -> float:
        return self.window_received / self.window_s if self.window_s > 0 else 0.0


class LoadState:
    """State shared by the connections of one load process (one event loop, no locking)."""

    def __init__(self) -> None:
        self.sending = False
        self.measuring = False
        self.sent = 0
        self.received = 0
        self.errors = 0
        self.error_samples: list[str] = []
        self.latencies = array("d")

    def error(self, why: str) -> None:
        self.errors += 1
        if len(self.error_samples) < MAX_ERROR_SAMPLES:
            self.error_samples.append(why)

    def finish(self, result: LoadCounts, conns: Sequence[WSConnection]) -> None:
        """Count the connections' protocol errors, then copy the counts into ``result``."""
        for conn in conns:
            if conn.error is not None:
                self.error(f"protocol: {conn.error}")
        result.sent = self.sent
        result.received = self.received
        result.errors = self.errors
        result.error_samples = self.error_samples
        result.latencies = thin_sorted(sorted(self.latencies), LATENCY_POINTS)


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


async def sleep_until(deadline: float) -> None:
    delay = deadline - time.monotonic()
    if delay > 0:
        await asyncio.sleep(delay)


def sleep_until_sync(deadline: float) -> None:
    delay = deadline - time.monotonic()
    if delay > 0:
        time.sleep(delay)


async def open_connections(
    host: str,
    port: int,
    factory: type[C],
    count: int,
    options: Callable[[int], dict[str, Any]],
    *,
    timeout: float,
    what: str = "connections",
) -> list[C]:
    """``count`` connections, connection ``i`` made with ``options(i)``; all or none.

    Raises ConnectionError (the open ones aborted) if any of them failed.
    """
    gate = asyncio.Semaphore(CONNECT_CONCURRENCY)  # a burst of SYNs could overflow the backlog

    async def open_one(index: int) -> C:
        async with gate:
            return await connect(host, port, factory, timeout=timeout, **options(index))

    opened = await asyncio.gather(*(open_one(i) for i in range(count)), return_exceptions=True)
    conns = [c for c in opened if isinstance(c, factory)]
    failures = [c for c in opened if not isinstance(c, factory)]
    if failures:
        for conn in conns:
            conn.abort()
        raise ConnectionError(f"{len(failures)} of {count} {what} failed: {failures[0]!r}")
    return conns


@contextlib.asynccontextmanager
async def connections(
    load: LoadState,
    result: LoadCounts,
    host: str,
    port: int,
    factory: type[C],
    count: int,
    options: Callable[[int], dict[str, Any]],
    *,
    timeout: float,
    what: str = "connections",
) -> AsyncIterator[list[C]]:
    """The `open_connections` for the body; whatever is left of them is aborted after it,
    and once the body succeeded, ``load.finish(result, ...)``."""
    conns = await open_connections(host, port, factory, count, options, timeout=timeout, what=what)
    try:
        yield conns
    finally:
        for conn in conns:
            conn.abort()
    load.finish(result, conns)


async def run_window(
    load: LoadState,
    conns: Sequence[Any],
    inflight: int,
    t_go: float,
    warmup: float,
    seconds: float,
    result: LoadCounts,
) -> int:
    """At ``t_go`` call ``conn.start(inflight)`` on every connection; count over
    ``[t_go + warmup, t_go + warmup + seconds]`` into ``result``; stop sending.

    Returns the messages sent in the window.
    """
    await sleep_until(t_go)
    load.sending = True
    for conn in conns:
        conn.start(inflight)

    await sleep_until(t_go + warmup)
    sent0, received0 = load.sent, load.received
    cpu0 = time.process_time()
    wall0 = time.perf_counter()
    load.measuring = True
    await sleep_until(t_go + warmup + seconds)
    load.measuring = False
    result.window_s = time.perf_counter() - wall0
    result.cpu_s = time.process_time() - cpu0
    result.window_received = load.received - received0
    load.sending = False
    return load.sent - sent0


async def close_connections(conns: Sequence[WSConnection], timeout: float) -> None:
    """The close handshake on every connection, waited for (bounded)."""
    for conn in conns:
        conn.close()
    if conns:
        await asyncio.wait([c.closed for c in conns], timeout=timeout)


def on_uvloop(load: Callable[P, Coroutine[Any, Any, R]]) -> Callable[P, R]:
    """An async load function as a plain one that runs it on a fresh uvloop loop in the
    calling thread. It keeps the name it decorates: the benchmark process hands it to its
    load processes by reference (pickle)."""

    @functools.wraps(load)
    def run(*args: P.args, **kwargs: P.kwargs) -> R:
        return uvloop.run(load(*args, **kwargs))

    return run


def client_main(
    run: Callable[..., LoadCounts],
    pipe: Connection,
    cpu: int | None,
    host: str,
    port: int,
    cfg: dict[str, Any],
) -> None:
    """Entry point of one load process: pin, connect, report ready, wait for go, run.

    ``run(host, port, start_at=..., **cfg)`` calls ``start_at()`` once connected for the
    ``time.monotonic()`` at which to start sending.
    """
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})

    def start_at() -> float:
        pipe.send(("ready", None))
        if not pipe.poll(120):
            raise TimeoutError("no start time from the benchmark process")
        return pipe.recv()

    try:
        result = run(host, port, start_at=start_at, **cfg)
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


@dataclass(frozen=True)
class Load:
    """What the load processes of one run do: ``run(host, port, start_at=..., **config)``
    in each (see `client_main`), one config per process."""

    run: Callable[..., LoadCounts]
    result_type: Callable[..., LoadCounts]  # rebuilds a result from its dict
    configs: list[dict[str, Any]]
    finish_timeout: float  # seconds for every result to come in after the window


# One run's figures from the load processes' results, the server's CPU seconds in the
# window and the window's length (as the benchmark process measured it).
Figures = Callable[[list[Any], float, float], dict[str, Any]]


def run_clients(
    load: Load, args: argparse.Namespace, server: ServerProcess
) -> tuple[list[Any], float, float]:
    """Run the load processes; return their results, the server's CPU seconds in the window
    and the window length as this process measured it."""
    ctx = multiprocessing.get_context("spawn")  # a fresh interpreter: no inherited loop state
    cpus = parse_cpus(args.client_cpus)
    procs: list[tuple[multiprocessing.process.BaseProcess, Connection]] = []
    try:
        for i, cfg in enumerate(load.configs):
            mine, theirs = ctx.Pipe()
            cpu = cpus[i % len(cpus)] if cpus else None
            proc = ctx.Process(
                target=client_main,
                args=(load.run, theirs, cpu, HOST, server.port, cfg),
                daemon=True,
            )
            proc.start()
            theirs.close()
            procs.append((proc, mine))

        deadline = time.monotonic() + 60
        for _, pipe in procs:
            if not pipe.poll(max(0.0, deadline - time.monotonic())):
                raise RuntimeError("a load process did not get ready within 60 s")
            kind, detail = pipe.recv()
            if kind != "ready":
                raise RuntimeError(f"load process: {detail}")
        t_go = time.monotonic() + 0.1
        for _, pipe in procs:
            pipe.send(t_go)

        sleep_until_sync(t_go + args.warmup)
        cpu0 = server.cpu_seconds()
        w0 = time.monotonic()
        sleep_until_sync(t_go + args.warmup + args.seconds)
        server_cpu = server.cpu_seconds() - cpu0
        window = time.monotonic() - w0

        results = []
        deadline = time.monotonic() + load.finish_timeout
        for _, pipe in procs:
            if not pipe.poll(max(0.0, deadline - time.monotonic())):
                raise RuntimeError("a load process did not finish in time")
            kind, detail = pipe.recv()
            if kind != "done":
                raise RuntimeError(f"load process: {detail}")
            results.append(load.result_type(**detail))
        return results, server_cpu, window
    finally:
        for proc, pipe in procs:
            pipe.close()
            proc.join(10)
            if proc.is_alive():
                proc.kill()  # SIGKILL to that pid only
                proc.join(5)


def one_run(
    name: str, template: str, args: argparse.Namespace, load: Load, figures: Figures
) -> dict[str, Any]:
    """Start the server, load it, stop it. Raises ServerFailed if it never served."""
    server = ServerProcess(name, template, args.server_cpus)
    run: dict[str, Any] = {"port": server.port, "argv": server.argv}
    try:
        server.wait_ready(args.start_timeout, args.settle)
        try:
            results, server_cpu, window = run_clients(load, args, server)
        except (RuntimeError, OSError, EOFError) as e:
            run.update(ok=False, failure=f"{e!r}; server log: {server.log_tail(4)}")
            return run
        run.update(ok=True, **figures(results, server_cpu, window))
        run["server_processes"] = len(server.tree)
        return run
    finally:
        run["stop"] = server.stop(args.stop_timeout)


def describe_stop(stop: dict[str, Any]) -> str:
    text = f"stopped: status {stop['exit_status']} in {stop['stop_s']:.2f} s"
    if stop["killed"]:
        text += f", SIGKILLed {stop['killed']}"
    if stop["left_running"]:
        text += f", STILL RUNNING {stop['left_running']}"
    return text


def run_rounds(
    servers: list[dict[str, Any]],
    args: argparse.Namespace,
    load: Load,
    figures: Figures,
    describe: Callable[[dict[str, Any]], str],
) -> None:
    """``--runs`` rounds, each running every server once, in the same order, so drift on a
    shared machine hits all alike. A server that never started is not retried."""
    for round_no in range(1, args.runs + 1):
        for s in servers:
            if s["failure"] is not None and not s["runs"]:
                continue  # never started: do not retry every round
            print(f"[{round_no}/{args.runs}] {s['name']}: ", end="", flush=True)
            try:
                run = one_run(s["name"], s["command"], args, load, figures)
            except ServerFailed as e:
                s["failure"] = str(e)
                print(f"FAILED: {e}", flush=True)
                if s["runs"]:
                    s["runs"].append({"ok": False, "failure": str(e)})
                continue
            s["runs"].append(run)
            stop_text = describe_stop(run["stop"])
            if not run.get("ok"):
                print(f"run failed: {run['failure']}; {stop_text}", flush=True)
                continue
            print(f"{describe(run)}; {stop_text}", flush=True)
            for sample in run["error_samples"]:
                print(f"    {sample}")


# -- the summary ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Column:
    """One column of the table: a summary value, or (``key=""``) the ratio to the first
    server's rate."""

    title: str
    key: str
    width: int
    spec: str = ""  # format spec of the value
    suffix: str = ""

    def cell(self, summary: dict[str, Any], ratio: str) -> str:
        if not self.key:
            return f"{ratio:>{self.width}}"
        return f"{summary[self.key]:>{self.width - len(self.suffix)}{self.spec}}{self.suffix}"


@dataclass(frozen=True)
class Table:
    rate: str  # the summary value the ratio compares
    medians: tuple[str, ...]  # summary values: medians over the good runs
    sums: tuple[str, ...]  # summary values: totals over the good runs, 0 for exit status 0
    columns: tuple[Column, ...]
    name_width: int


def summarize(runs: list[dict[str, Any]], table: Table) -> dict[str, Any] | None:
    good = [r for r in runs if r.get("ok")]
    if not good:
        return None
    summary: dict[str, Any] = {k: statistics.median(r[k] for r in good) for k in table.medians}
    for k in table.sums:
        summary[k] = sum(r[k] for r in good)
    summary["runs_ok"] = len(good)
    return summary


def print_table(servers: list[dict[str, Any]], table: Table, client_capacity_pct: float) -> None:
    base = servers[0]["summary"][table.rate] if servers[0]["summary"] else None
    w = table.name_width
    titles = [c.title or f"vs {servers[0]['name']}" for c in table.columns]
    head = f"{'server':<{w}}" + "".join(
        f" {title:>{c.width}}" for c, title in zip(table.columns, titles, strict=True)
    )
    print(head)
    print("-" * len(head))
    for s in servers:
        m = s["summary"]
        if m is None:
            print(f"{s['name']:<{w}} failed: {s['failure']}")
            continue
        ratio = f"{m[table.rate] / base:.2f}x" if base else "-"
        print(f"{s['name']:<{w}}" + "".join(f" {c.cell(m, ratio)}" for c in table.columns))
        if m["client_cpu_pct"] >= 0.9 * client_capacity_pct:
            print(f"{'':<{w}} note: the load processes were near saturation: the figure is a floor")


def report(
    servers: list[dict[str, Any]], args: argparse.Namespace, client_cpus: list[int], table: Table
) -> int:
    """Summaries, the table, the JSON file; the exit status (1: a server failed, or a run
    counted any of ``table.sums``)."""
    for s in servers:
        s["summary"] = summarize(s["runs"], table)
        if s["summary"] is None and s["failure"] is None:
            s["failure"] = "no successful run"
    # Each load process is one thread: it can use at most one of the CPUs it may run on.
    capacity = 100.0 * min(args.client_procs, len(client_cpus) or os.cpu_count() or 1)
    print()
    print_table(servers, table, capacity)
    if args.json:
        config = {
            k: str(v) if isinstance(v, Path) else v
            for k, v in vars(args).items()
            if k not in ("json", "server")
        }
        with open(args.json, "w") as f:
            json.dump(
                {"config": config, "cpu_count": os.cpu_count(), "servers": servers}, f, indent=1
            )
    ok = all(
        s["summary"] is not None and all(s["summary"][k] == 0 for k in table.sums) for s in servers
    )
    return 0 if ok else 1


# -- the command line -----------------------------------------------------------------------


def add_load_arguments(parser: argparse.ArgumentParser) -> None:
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


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--start-timeout", type=float, default=20.0)
    parser.add_argument("--settle", type=float, default=0.5, help="wait after the first handshake")
    parser.add_argument("--stop-timeout", type=float, default=10.0)
    parser.add_argument("--drain-timeout", type=float, default=5.0)
    parser.add_argument("--json", metavar="FILE")


def check_load_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> list[int]:
    """Refuse what `add_load_arguments` cannot run; return the client CPUs."""
    if args.client_procs < 1 or args.seconds <= 0 or args.warmup < 0:
        parser.error("--client-procs must be >= 1, --seconds > 0, --warmup >= 0")
    allowed = os.sched_getaffinity(0)
    client_cpus = parse_cpus(args.client_cpus)
    if not set(client_cpus) <= allowed:
        parser.error(f"--client-cpus {args.client_cpus} not within this process's CPUs {allowed}")
    if set(client_cpus) & set(parse_cpus(args.server_cpus)):
        print("warning: client and server CPUs overlap; the figures will be noisier")
    return client_cpus


def servers_from_specs(parser: argparse.ArgumentParser, specs: Sequence[str]) -> list[dict]:
    """``NAME=COMMAND`` specs as the servers' records (their runs added by `run_rounds`)."""
    servers: list[dict[str, Any]] = []
    for spec in specs:
        name, sep, command = spec.partition("=")
        if not sep or not name.strip() or "{port}" not in command:
            parser.error(f"--server {spec!r}: expected NAME=COMMAND with {{port}} in COMMAND")
        servers.append(
            {"name": name.strip(), "command": command.strip(), "runs": [], "failure": None}
        )
    return servers
