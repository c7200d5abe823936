"""What runs inside a load process: its connections, its measured window, its event loop.

Owns: opening many connections with a bound on handshakes in progress
(`open_connections`, `connections`), the shared start and the measured window
(`run_window`), the close of every connection (`close_connections`), and
`on_uvloop`, which makes a scenario's async load function a plain one that a
spawned load process can call.

May import `counters` and `wsclient`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from typing import Any, ParamSpec, TypeVar

import uvloop

from wsfleet.loadtest.counters import Counters, LoadState, WindowClock
from wsfleet.loadtest.wsclient import WSConnection, connect

# Handshakes one load process has in progress at once (``--connect-concurrency``): a burst
# of SYNs larger than the server's listen backlog is dropped and retried a second later.
CONNECT_CONCURRENCY = 64

C = TypeVar("C", bound=WSConnection)
P = ParamSpec("P")
R = TypeVar("R")

_concurrency = CONNECT_CONCURRENCY


def set_connect_concurrency(count: int) -> None:
    """The handshakes `open_connections` has in progress at once in this process."""
    global _concurrency
    _concurrency = count


async def sleep_until(deadline: float) -> None:
    """Sleep until ``time.monotonic()`` reaches ``deadline``."""
    delay = deadline - time.monotonic()
    if delay > 0:
        await asyncio.sleep(delay)


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
    gate = asyncio.Semaphore(_concurrency)  # a burst of SYNs could overflow the backlog

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
    result: Counters,
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
    result: Counters,
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
    clock = WindowClock()
    wall0 = time.perf_counter()
    load.measuring = True
    await sleep_until(t_go + warmup + seconds)
    load.measuring = False
    result.window_s = time.perf_counter() - wall0
    clock.stop(result)
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
