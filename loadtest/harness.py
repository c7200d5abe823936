"""What the benchmarks share: load processes, the servers under test, rounds and the table.

A scenario (`Scenario`: ``echo_bench.SCENARIO``, ``relay_bench.SCENARIO``,
``scenarios.BROADCAST``/``CONNECT``/``IDLE``) brings its options, the load function
that runs in each load process (or, for idle, its run in this process), the figures it
draws from their results, how one run is printed and which columns the table has. This
module does the rest, the same way for every scenario and every front end (the
benchmarks' command lines, ``wsfleet loadtest`` on any URL, ``compare``):

* in each load process: the counters and error samples (`LoadState`, `LoadCounts`),
  the latency histograms (HdrHistogram: `histogram_of`, `merge_histograms`), the
  connections (`connections`), the shared start and the measured window
  (`run_window`), the close (`close_connections`), the event loop (`on_uvloop`);
* in the driving process: one measurement against a running server (`measure`: the
  load processes of `run_clients` pinned round robin, phases told to a `Progress`,
  the server tree's CPU time over the window when its pid is known, `Target`); one
  server run (`one_run`: `ServerProcess` under ``taskset``, a bounded wait for a
  handshake, `measure`, SIGTERM then SIGKILL), the rounds over every server
  (`run_rounds`), and the medians, the table with the ratio to a base server, the JSON
  file and the exit status (`report`);
* the servers to compare (`server_catalog`: websockets, ``wsfleet-K``, Godot 3.2.3 and
  Node's ws for each mode, with those not installed marked ``skip``) and a benchmark's
  whole command line (`scenario_parser`, `run_benchmark`).
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
from collections import Counter
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import IO, Any, ParamSpec, TypeVar

import psutil
import uvloop
from hdrh.histogram import HdrHistogram

from wsfleet.loadtest.wsclient import WSConnection, connect

HOST = "127.0.0.1"
MAX_ERROR_SAMPLES = 5
# Handshakes one load process has in progress at once (``--connect-concurrency``): a burst
# of SYNs larger than the server's listen backlog is dropped and retried a second later.
CONNECT_CONCURRENCY = 64
# Latency histograms: microseconds from 1 us to one minute (longer ones are clamped), 3 digits.
HIST_HIGHEST_US = 60_000_000
HIST_DIGITS = 3

C = TypeVar("C", bound=WSConnection)
P = ParamSpec("P")
R = TypeVar("R")


# -- latency histograms ---------------------------------------------------------------------


def new_histogram() -> HdrHistogram:
    return HdrHistogram(1, HIST_HIGHEST_US, HIST_DIGITS)


def histogram_of(samples_us: Iterable[int]) -> HdrHistogram:
    """An HdrHistogram of microsecond samples (equal values recorded once, with a count)."""
    hist = new_histogram()
    for value, count in Counter(samples_us).items():
        hist.record_value(min(max(value, 1), HIST_HIGHEST_US), count)
    return hist


def encode_histogram(hist: HdrHistogram) -> str:
    """How results carry a histogram (ASCII; "" when empty) so that load processes' add up."""
    return hist.encode().decode("ascii") if hist.get_total_count() else ""


def merge_histograms(encoded: Iterable[str]) -> HdrHistogram:
    """The sum of histograms as the results carry them (`encode_histogram`)."""
    total = new_histogram()
    for text in encoded:
        if text:
            total.add(HdrHistogram.decode(text.encode("ascii")))
    return total


def percentiles_us(hist: HdrHistogram) -> tuple[float, float, float]:
    """(p50, p99, max) in microseconds; NaN when nothing was recorded."""
    if hist.get_total_count() == 0:
        return float("nan"), float("nan"), float("nan")
    return (
        float(hist.get_value_at_percentile(50)),
        float(hist.get_value_at_percentile(99)),
        float(hist.get_max_value()),
    )


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
    latency_samples: int = 0
    latency_hist: str = ""  # round-trip times in the window, microseconds (`encode_histogram`)

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
        self.latencies = array("d")  # seconds; the histogram is made once the run is over

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
        result.latency_samples = len(self.latencies)
        hist = histogram_of(round(x * 1e6) for x in self.latencies)
        result.latency_hist = encode_histogram(hist)


def cpu_figures(
    results: Sequence[Any], server_cpu: float, window: float, rate: float, per: str
) -> dict[str, float]:
    """The load processes' CPU (each over its own window, summed: 100 = one core), the
    server's over ``window``, and the server's microseconds per unit of ``rate``
    (``server_us_per_<per>``)."""
    return {
        "client_cpu_pct": 100 * sum(r.cpu_s / r.window_s for r in results if r.window_s > 0),
        "server_cpu_pct": 100 * server_cpu / window,
        f"server_us_per_{per}": 1e6 * server_cpu / (rate * window) if rate else float("nan"),
    }


def error_samples(results: Iterable[Any]) -> list[str]:
    """The first `MAX_ERROR_SAMPLES` error texts of the load processes together."""
    return [s for r in results for s in r.error_samples][:MAX_ERROR_SAMPLES]


def latency_figures(results: Iterable[Any]) -> dict[str, float]:
    """p50, p99 and max (microseconds) of the load processes' histograms together."""
    p50, p99, top = percentiles_us(merge_histograms(r.latency_hist for r in results))
    return {"p50_us": p50, "p99_us": p99, "max_us": top}


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
    path: str = "/",
) -> list[C]:
    """``count`` connections to ``path``, connection ``i`` made with ``options(i)`` (the
    factory takes ``path=`` too); all or none.

    Raises ConnectionError (the open ones aborted) if any of them failed.
    """
    gate = asyncio.Semaphore(CONNECT_CONCURRENCY)  # a burst of SYNs could overflow the backlog

    async def open_one(index: int) -> C:
        async with gate:
            return await connect(host, port, factory, timeout=timeout, path=path, **options(index))

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
    path: str = "/",
) -> AsyncIterator[list[C]]:
    """The `open_connections` for the body; whatever is left of them is aborted after it,
    and once the body succeeded, ``load.finish(result, ...)``."""
    conns = await open_connections(
        host, port, factory, count, options, timeout=timeout, what=what, path=path
    )
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
    connect_concurrency: int = CONNECT_CONCURRENCY,
) -> None:
    """Entry point of one load process: pin, connect, report ready, wait for go, run.

    ``run(host, port, start_at=..., **cfg)`` (``cfg`` holds ``path``) calls ``start_at()``
    once connected for the ``time.monotonic()`` at which to start sending.
    """
    global CONNECT_CONCURRENCY
    CONNECT_CONCURRENCY = connect_concurrency  # this process's own copy of the module
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


class ProcessTree:
    """A process and every process under it that was seen alive (only signalled by pid)."""

    def __init__(self, pid: int) -> None:
        self.root = psutil.Process(pid)  # psutil.NoSuchProcess when there is none
        self.procs: dict[tuple[int, float], psutil.Process] = {}
        self._remember(self.root)

    def __len__(self) -> int:
        return len(self.procs)

    def _remember(self, p: psutil.Process) -> None:
        try:
            self.procs[(p.pid, p.create_time())] = p
        except psutil.NoSuchProcess:
            pass

    def refresh(self) -> None:
        try:
            children = self.root.children(recursive=True)
        except psutil.NoSuchProcess:
            return
        for child in children:
            self._remember(child)

    def cpu_seconds(self) -> float:
        """User + system CPU of the live tree, plus what reaped children left to their parents."""
        self.refresh()
        total = 0.0
        for p in list(self.procs.values()):
            try:
                t = p.cpu_times()
            except psutil.NoSuchProcess:
                continue
            total += t.user + t.system + t.children_user + t.children_system
        return total


class Target:
    """Where the load goes: ``ws://host:port/path``, and the server's pid when known (for its
    CPU time and memory). `ServerProcess` is one; ``wsfleet loadtest`` makes one of a URL."""

    def __init__(self, host: str, port: int, path: str = "/", pid: int | None = None) -> None:
        self.host = host
        self.port = port
        self.path = path
        self.pid = pid
        self.tree = ProcessTree(pid) if pid is not None else None

    def cpu_seconds(self) -> float:
        """The server tree's CPU seconds so far; NaN without a pid."""
        return self.tree.cpu_seconds() if self.tree is not None else float("nan")

    def server_processes(self) -> int | None:
        return len(self.tree) if self.tree is not None else None


class ServerProcess(Target):
    """One started server and every process under it (only ever signalled by pid)."""

    tree: ProcessTree

    def __init__(self, name: str, template: str, cpus: str) -> None:
        self.name = name
        port = free_port()
        argv = server_argv(template, port)
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
        super().__init__(HOST, port, "/", self.proc.pid)

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
            self.tree.refresh()
            return
        raise ServerFailed(f"no WebSocket handshake within {timeout:.0f} s ({last_error})")

    def stop(self, timeout: float) -> dict[str, Any]:
        """SIGTERM to the server, then SIGKILL to whatever is left of its tree."""
        self.tree.refresh()
        t0 = time.monotonic()
        status: int | None = None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            status = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
        # The tree may still be shutting down after the root exits; wait the same bound.
        others = [p for p in self.tree.procs.values() if p.pid != self.proc.pid]
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
    """What the load processes of one run do: ``run(host, port, start_at=..., path=...,
    **config)`` in each (see `client_main`), one config per process."""

    run: Callable[..., LoadCounts]
    result_type: Callable[..., LoadCounts]  # rebuilds a result from its dict
    configs: list[dict[str, Any]]
    finish_timeout: float  # seconds for every result to come in after the window


# One run's figures from the load processes' results, the server's CPU seconds in the
# window and the window's length (as the benchmark process measured it).
Figures = Callable[[list[Any], float, float], dict[str, Any]]
# Told when a phase of a run starts: its name and how long it should take (None: unknown).
Progress = Callable[[str, float | None], None]


def _no_progress(phase: str, seconds: float | None) -> None:
    pass


def run_clients(
    load: Load, args: argparse.Namespace, target: Target, progress: Progress | None = None
) -> tuple[list[Any], float, float]:
    """Run the load processes against ``target``; return their results, the server's CPU
    seconds in the window (NaN when the target has no pid) and the window length as this
    process measured it. Every wait is bounded."""
    progress = progress or _no_progress
    ctx = multiprocessing.get_context("spawn")  # a fresh interpreter: no inherited loop state
    cpus = parse_cpus(args.client_cpus)
    procs: list[tuple[multiprocessing.process.BaseProcess, Connection]] = []
    try:
        progress("connecting", None)
        for i, cfg in enumerate(load.configs):
            mine, theirs = ctx.Pipe()
            cpu = cpus[i % len(cpus)] if cpus else None
            proc = ctx.Process(
                target=client_main,
                args=(
                    load.run,
                    theirs,
                    cpu,
                    target.host,
                    target.port,
                    {**cfg, "path": target.path},
                    getattr(args, "connect_concurrency", CONNECT_CONCURRENCY),
                ),
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

        if args.warmup > 0:
            progress("warm-up", args.warmup)
        sleep_until_sync(t_go + args.warmup)
        cpu0 = target.cpu_seconds()
        w0 = time.monotonic()
        progress("measuring", args.seconds)
        sleep_until_sync(t_go + args.warmup + args.seconds)
        server_cpu = target.cpu_seconds() - cpu0
        window = time.monotonic() - w0
        progress("draining and closing", None)

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


@dataclass(frozen=True)
class Scenario:
    """One kind of load, as every front end runs it: the benchmarks' command lines (on
    servers they start), ``wsfleet loadtest`` (on any URL) and ``compare``.

    Either ``load`` (load processes, `run_clients`) and ``figures``, or ``run_here``: the run
    in this process, returning its figures (idle: it reads the server's memory).
    """

    name: str
    mode: str  # which application the servers run: "echo", "broadcast" or "mp-relay"
    add_arguments: Callable[[argparse.ArgumentParser], None]  # its own options
    check: Callable[[argparse.ArgumentParser, argparse.Namespace], None]  # parser.error or not
    config_text: Callable[[argparse.Namespace], str]  # one line on what a run does
    describe: Callable[[dict[str, Any]], str]  # one run, one line
    table: Table
    load: Callable[[argparse.Namespace], Load] | None = None
    figures: Figures | None = None
    run_here: Callable[[argparse.Namespace, Target, Progress], dict[str, Any]] | None = None
    prepare: Callable[[argparse.Namespace], None] | None = None  # before any server starts
    seconds: float | None = 5.0  # the default measured window; None: it has none
    one_process: bool = False  # the load runs in one process (--client-procs 1)


def measure(
    scenario: Scenario, args: argparse.Namespace, target: Target, progress: Progress | None = None
) -> dict[str, Any]:
    """One run of ``scenario`` against a server that is up: its figures, with ``ok`` (False
    and ``failure`` when the load could not run)."""
    try:
        if scenario.run_here is not None:
            figures = scenario.run_here(args, target, progress or _no_progress)
        else:
            assert scenario.load is not None and scenario.figures is not None
            results, server_cpu, window = run_clients(scenario.load(args), args, target, progress)
            figures = scenario.figures(results, server_cpu, window)
            figures["server_processes"] = target.server_processes()
    except (RuntimeError, OSError, EOFError, psutil.Error) as e:
        return {"ok": False, "failure": repr(e)}
    return {"ok": True, **figures}


def one_run(
    name: str, template: str, args: argparse.Namespace, scenario: Scenario
) -> dict[str, Any]:
    """Start the server, load it, stop it. Raises ServerFailed if it never served."""
    server = ServerProcess(name, template, args.server_cpus)
    run: dict[str, Any] = {"port": server.port, "argv": server.argv}
    try:
        server.wait_ready(args.start_timeout, args.settle)
        run.update(measure(scenario, args, server))
        if not run["ok"]:
            run["failure"] += f"; server log: {server.log_tail(4)}"
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


def run_rounds(servers: list[dict[str, Any]], args: argparse.Namespace, scenario: Scenario) -> None:
    """``--runs`` rounds, each running every server once, in the same order, so drift on a
    shared machine hits all alike. A server that never started is not retried."""
    for round_no in range(1, args.runs + 1):
        for s in servers:
            if s["failure"] is not None and not s["runs"]:
                continue  # never started: do not retry every round
            print(f"[{round_no}/{args.runs}] {s['name']}: ", end="", flush=True)
            try:
                run = one_run(s["name"], s["command"], args, scenario)
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
            print(f"{scenario.describe(run)}; {stop_text}", flush=True)
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
    lower_is_better: bool = False  # of ``rate`` (memory per connection)

    def rate_title(self) -> str:
        return next(c.title for c in self.columns if c.key == self.rate)


def summarize(runs: list[dict[str, Any]], table: Table) -> dict[str, Any] | None:
    good = [r for r in runs if r.get("ok")]
    if not good:
        return None
    summary: dict[str, Any] = {k: statistics.median(r[k] for r in good) for k in table.medians}
    for k in table.sums:
        summary[k] = sum(r[k] for r in good)
    summary["runs_ok"] = len(good)
    return summary


def summarize_servers(servers: list[dict[str, Any]], table: Table) -> None:
    """Each server's ``summary`` (None, with a ``failure``, when no run succeeded)."""
    for s in servers:
        s["summary"] = summarize(s["runs"], table)
        if s["summary"] is None and s["failure"] is None:
            s["failure"] = "no successful run"


def ratio_base(servers: list[dict[str, Any]], base: str | None) -> dict[str, Any] | None:
    """The server the ratios compare with: the one named ``base``, else the first."""
    for s in servers:
        if s["name"] == base:
            return s
    return servers[0] if servers else None


def print_table(
    servers: list[dict[str, Any]],
    table: Table,
    client_capacity_pct: float,
    base: str | None = None,
) -> None:
    """The table of summaries; the ratio column compares with ``base`` (default: the first)."""
    ref = ratio_base(servers, base)
    base_rate = ref["summary"][table.rate] if ref and ref["summary"] else None
    w = table.name_width
    titles = [c.title or f"vs {ref['name'] if ref else '-'}" for c in table.columns]
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
        ratio = f"{m[table.rate] / base_rate:.2f}x" if base_rate else "-"
        print(f"{s['name']:<{w}}" + "".join(f" {c.cell(m, ratio)}" for c in table.columns))
        if m["client_cpu_pct"] >= 0.9 * client_capacity_pct:
            print(f"{'':<{w}} note: the load processes were near saturation: the figure is a floor")


def client_capacity_pct(args: argparse.Namespace, client_cpus: list[int]) -> float:
    # Each load process is one thread: it can use at most one of the CPUs it may run on.
    return 100.0 * min(args.client_procs, len(client_cpus) or os.cpu_count() or 1)


def config_of(args: argparse.Namespace) -> dict[str, Any]:
    """The options of a run as JSON values."""
    return {
        k: str(v) if isinstance(v, Path) else v
        for k, v in vars(args).items()
        if k not in ("json", "server")
    }


def all_clean(servers: list[dict[str, Any]], table: Table) -> bool:
    """Every server has a summary, and it counted none of ``table.sums`` (errors...)."""
    return all(
        s["summary"] is not None and all(s["summary"][k] == 0 for k in table.sums) for s in servers
    )


def report(
    servers: list[dict[str, Any]], args: argparse.Namespace, client_cpus: list[int], table: Table
) -> int:
    """Summaries, the table, the JSON file; the exit status (1: a server failed, or a run
    counted any of ``table.sums``)."""
    summarize_servers(servers, table)
    print()
    print_table(servers, table, client_capacity_pct(args, client_cpus))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"config": config_of(args), "cpu_count": os.cpu_count(), "servers": servers},
                f,
                indent=1,
            )
    return 0 if all_clean(servers, table) else 1


# -- the servers to compare -------------------------------------------------------------------

LOADTEST_DIR = Path(__file__).resolve().parent
GODOT_SCRIPT = LOADTEST_DIR / "godot_server.gd"  # plain mode: echo or broadcast
GODOT_MP_SCRIPT = LOADTEST_DIR.parent / "tests" / "godot" / "mp_server.gd"  # multiplayer relay
NODE_SCRIPT = LOADTEST_DIR / "node_ws_server.js"
MODES = ("echo", "broadcast", "mp-relay")
# The default set of each mode, the first one being the baseline of the benchmark's ratios.
DEFAULT_NAMES = {
    "echo": ("websockets", "wsfleet-1", "wsfleet-2", "godot", "node"),
    "broadcast": ("websockets", "wsfleet-1", "wsfleet-2", "godot", "node"),
    "mp-relay": ("godot", "wsfleet-1", "wsfleet-2"),
}
REFERENCES = ("websockets", "godot", "node")  # the servers that are not wsfleet


def node_status(node: str) -> str | None:
    """None when ``node`` runs and finds the ``ws`` module, else why not ("not installed: ...")."""
    exe = shutil.which(node)
    if exe is None:
        return f"not installed: {node} not found"
    try:
        # From the script's folder, as require() in the script resolves (plus NODE_PATH).
        check = subprocess.run(
            [exe, "-e", "require.resolve('ws')"], cwd=LOADTEST_DIR, capture_output=True, timeout=20
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"not installed: {node} does not run ({e})"
    if check.returncode != 0:
        return "not installed: the ws module is missing (npm install ws; --node-path or NODE_PATH)"
    return None


def _godot_command(args: argparse.Namespace, workdir: str, script: Path, options: str) -> str:
    # Godot writes logs/ under res:// (its working directory without a project) and user data
    # under $HOME: both go to a temporary directory. LANG: Godot complains of "C".
    w = shlex.quote(workdir)
    return (
        f"env -C {w} HOME={w} XDG_DATA_HOME={w} XDG_CONFIG_HOME={w} XDG_CACHE_HOME={w} "
        f"LANG=en_US.UTF-8 {shlex.quote(args.godot)} --no-window -s {shlex.quote(str(script))}"
        f" --wsfleet-port={{port}} {options} --wsfleet-sleep-usec={args.godot_sleep_usec}"
    )


def server_catalog(
    mode: str, args: argparse.Namespace, workdir: str, names: Sequence[str] | None = None
) -> list[dict[str, Any]]:
    """The servers ``names`` (default: the mode's set) for ``mode`` as server records, in that
    order, with ``skip`` set (why) for those not installed or without that mode.

    Names: ``websockets``, ``wsfleet-K`` (K shards), ``godot``, ``node``. The options
    ``args.godot``, ``args.godot_sleep_usec``, ``args.node`` and, for mp-relay,
    ``args.godot_script`` (`add_server_arguments`) pick the programs. Raises ValueError for
    an unknown name.
    """
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}")
    servers = []
    for name in names or DEFAULT_NAMES[mode]:
        skip = None
        shards = name.removeprefix("wsfleet-")
        if name.startswith("wsfleet-") and shards.isdigit() and int(shards) >= 1:
            if mode == "echo":  # the echo application of `wsfleet serve`: echo in the front
                command = f"wsfleet serve --bind {{host}} --port {{port}} --shards {shards} --quiet"
            elif mode == "broadcast":
                command = "python -m wsfleet.loadtest.wsfleet_apps broadcast --bind {host}"
                command += f" --port {{port}} --shards {shards}"
            else:
                command = "wsfleet serve --gd-mp-api --quiet --bind {host} --port {port}"
                command += f" --shards {shards}"
        elif name == "websockets":
            if mode == "echo":
                command = "python -m wsfleet.loadtest.ws_echo_server --port {port}"
            else:
                command = "python -m wsfleet.loadtest.scenarios serve-websockets --mode broadcast"
                command += " --port {port}"
            if mode == "mp-relay":
                command, skip = "", "not applicable: no Godot multiplayer mode"
        elif name == "godot":
            if mode == "mp-relay":
                script = Path(args.godot_script)
                options = "--wsfleet-clients=0 --wsfleet-timeout=0 --wsfleet-quiet=1"
            else:
                script, options = GODOT_SCRIPT, f"--wsfleet-mode={mode}"
            command = _godot_command(args, workdir, script, options)
            if shutil.which(args.godot) is None:
                skip = f"not installed: {args.godot}"
            elif not script.is_file():
                skip = f"not installed: {script} not found"
        elif name == "node":
            command = f"{shlex.quote(args.node)} {shlex.quote(str(NODE_SCRIPT))} --port {{port}}"
            command += f" --mode {mode}"
            if mode == "mp-relay":
                skip = "not applicable: no Godot multiplayer mode"
            else:
                skip = node_status(args.node)
        else:
            raise ValueError(f"unknown server {name!r} (websockets, wsfleet-K, godot, node)")
        servers.append(
            {"name": name, "command": command, "runs": [], "failure": None, "skip": skip}
        )
    return servers


def select_servers(
    parser: argparse.ArgumentParser, args: argparse.Namespace, mode: str, workdir: str
) -> list[dict[str, Any]]:
    """The servers of a benchmark: ``--server`` specs (``{mode}`` replaced) or the catalog's,
    narrowed by ``--only``; with ``skip`` set for those that cannot run."""
    only = [n.strip() for n in (args.only or "").split(",") if n.strip()]
    if args.server:
        specs = [spec.replace("{mode}", mode) for spec in args.server]
        servers = servers_from_specs(parser, specs)
        if only:
            unknown = set(only) - {s["name"] for s in servers}
            if unknown:
                parser.error(f"--only: unknown server(s) {sorted(unknown)}")
            servers = [s for s in servers if s["name"] in only]
        return servers
    try:
        return server_catalog(mode, args, workdir, only or None)
    except ValueError as e:
        parser.error(f"--only: {e}")


# -- the command line -----------------------------------------------------------------------


def add_load_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seconds", type=float, default=5.0, help="measured window")
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--client-procs", type=int, default=1)
    parser.add_argument("--server-cpus", default="0", help="taskset -c list; '' for no pinning")
    parser.add_argument("--client-cpus", default="1", help="CPUs for the load processes")
    parser.add_argument(
        "--connect-concurrency",
        type=int,
        default=CONNECT_CONCURRENCY,
        help="handshakes each load process has in progress at once (default %(default)s; "
        "Godot 3.2 listens with a backlog of 8)",
    )


def add_server_arguments(parser: argparse.ArgumentParser) -> None:
    """The servers of `select_servers`."""
    parser.add_argument(
        "--server",
        action="append",
        metavar="NAME=COMMAND",
        help="a server command with {port} (and {host}, {mode}); repeat; replaces the default set",
    )
    parser.add_argument(
        "--only",
        default="",
        metavar="NAMES",
        help="comma-separated servers to run: from the default set or websockets, wsfleet-K, "
        "godot, node",
    )
    parser.add_argument("--godot", default=os.environ.get("WSFLEET_GODOT", "godot3-server"))
    parser.add_argument("--godot-sleep-usec", type=int, default=0)
    parser.add_argument(
        "--godot-script",
        type=Path,
        default=GODOT_MP_SCRIPT,
        help="Godot's multiplayer relay script (mp-relay; default: tests/godot/mp_server.gd)",
    )
    parser.add_argument("--node", default="node")
    parser.add_argument("--node-path", help="the node_modules folder that holds ws (NODE_PATH)")


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
    if args.connect_concurrency < 1:
        parser.error("--connect-concurrency must be >= 1")
    allowed = os.sched_getaffinity(0)
    client_cpus = parse_cpus(args.client_cpus)
    if not set(client_cpus) <= allowed:
        parser.error(f"--client-cpus {args.client_cpus} not within this process's CPUs {allowed}")
    if set(client_cpus) & set(parse_cpus(args.server_cpus)):
        print("warning: client and server CPUs overlap; the figures will be noisier")
    return client_cpus


def use_node_path(node_path: str | None) -> None:
    """Put ``node_path`` first in NODE_PATH for the Node servers started from now on."""
    if node_path:
        os.environ["NODE_PATH"] = os.pathsep.join(
            filter(None, [node_path, os.environ.get("NODE_PATH")])
        )


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


def add_scenario_arguments(parser: argparse.ArgumentParser, scenario: Scenario, runs: int) -> None:
    """A benchmark's options for ``scenario`` (`run_benchmark` runs it)."""
    parser.add_argument("--runs", type=int, default=runs)
    scenario.add_arguments(parser)
    add_load_arguments(parser)
    if scenario.seconds is not None:
        parser.set_defaults(seconds=scenario.seconds)
    add_server_arguments(parser)
    add_run_arguments(parser)


def scenario_parser(
    scenario: Scenario, runs: int, description: str = ""
) -> argparse.ArgumentParser:
    """A benchmark's command line for ``scenario``."""
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_scenario_arguments(parser, scenario, runs)
    return parser


def where_text(args: argparse.Namespace, scenario: Scenario) -> str:
    load = (
        "the load in this process"
        if scenario.run_here is not None
        else f"{args.client_procs} load process(es)"
    )
    return (
        f"{args.runs} run(s); server CPUs {args.server_cpus or 'any'}, {load} on CPUs "
        f"{args.client_cpus or 'any'}"
    )


def check_scenario(
    parser: argparse.ArgumentParser, args: argparse.Namespace, scenario: Scenario
) -> list[int]:
    """Refuse what ``scenario`` cannot run with ``args``; return the client CPUs."""
    if args.runs < 1:
        parser.error("--runs must be >= 1")
    if scenario.one_process and args.client_procs != 1:
        parser.error(f"{scenario.name} runs in one load process (--client-procs 1)")
    scenario.check(parser, args)
    return check_load_arguments(parser, args)


def run_benchmark(
    parser: argparse.ArgumentParser, args: argparse.Namespace, scenario: Scenario
) -> int:
    """A benchmark's main: ``scenario`` on each selected server, ``--runs`` rounds, the table.

    Servers not installed are reported as skipped (not an error). The exit status is 1 if
    a server failed or any run counted errors, 2 if ``scenario.prepare`` refused.
    """
    client_cpus = check_scenario(parser, args, scenario)
    use_node_path(args.node_path)
    if scenario.prepare is not None:
        try:
            scenario.prepare(args)  # before any server starts: they inherit what it sets
        except RuntimeError as e:
            print(f"{scenario.name}: {e}", file=sys.stderr)
            return 2
    with tempfile.TemporaryDirectory(prefix=f"wsfleet-{scenario.name}-") as workdir:
        servers = select_servers(parser, args, scenario.mode, workdir)
        skipped = [s for s in servers if s.get("skip")]
        servers = [s for s in servers if not s.get("skip")]
        print(f"{scenario.config_text(args)}, {where_text(args, scenario)}", flush=True)
        for s in skipped:
            print(f"{s['name']}: {s['skip']}; skipped", flush=True)
        if not servers:
            print("no server to run")
            return 1
        run_rounds(servers, args, scenario)
        status = report(servers, args, client_cpus, scenario.table)
    for s in skipped:
        print(f"{s['name']:<{scenario.table.name_width}} {s['skip']}")
    return status
