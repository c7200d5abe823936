"""The load processes of a run, from the driving process: start them pinned, start them
together, collect their results.

Owns: `Load` (what each load process runs, with its config), `client_main` (the
entry point of a spawned load process: pin, connect, ready, wait for the shared
start time, run, send back its `counters.Counters` as a dict), `run_clients` (all
of that against a `servers.Target`, every wait bounded, with the server's CPU
seconds over the window), `Progress` (the phases told to a front end).

May import `counters`, `loadclient`, `procstats` and `servers`.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from multiprocessing.connection import Connection
from typing import Any

from wsfleet.loadtest import loadclient
from wsfleet.loadtest.counters import Counters
from wsfleet.loadtest.procstats import parse_cpus
from wsfleet.loadtest.servers import Target

# Told when a phase of a run starts: its name and how long it should take (None: unknown).
Progress = Callable[[str, float | None], None]


def no_progress(phase: str, seconds: float | None) -> None:
    pass


@dataclass(frozen=True)
class Load:
    """What the load processes of one run do: ``run(host, port, start_at=..., path=...,
    **config)`` in each (see `client_main`), one config per process."""

    run: Callable[..., Counters]
    result_type: Callable[..., Counters]  # rebuilds a result from its dict
    configs: list[dict[str, Any]]
    finish_timeout: float  # seconds for every result to come in after the window


def split_evenly(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def sleep_until_sync(deadline: float) -> None:
    delay = deadline - time.monotonic()
    if delay > 0:
        time.sleep(delay)


def client_main(
    run: Callable[..., Counters],
    pipe: Connection,
    cpu: int | None,
    host: str,
    port: int,
    cfg: dict[str, Any],
    connect_concurrency: int = loadclient.CONNECT_CONCURRENCY,
) -> None:
    """Entry point of one load process: pin, connect, report ready, wait for go, run.

    ``run(host, port, start_at=..., **cfg)`` (``cfg`` holds ``path``) calls ``start_at()``
    once connected for the ``time.monotonic()`` at which to start sending.
    """
    loadclient.set_connect_concurrency(connect_concurrency)
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


def run_clients(
    load: Load, args: argparse.Namespace, target: Target, progress: Progress | None = None
) -> tuple[list[Any], float, float]:
    """Run the load processes against ``target``; return their results, the server's CPU
    seconds in the window (NaN when the target has no pid) and the window length as this
    process measured it. Every wait is bounded."""
    progress = progress or no_progress
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
                    getattr(args, "connect_concurrency", loadclient.CONNECT_CONCURRENCY),
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
