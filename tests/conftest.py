"""Shared fixtures and helpers: every process a test starts is ended by the fixture that
started it.

Fixtures: `spawn` (a helper script of tests/ in a fresh interpreter), `servers` (wsfleet
servers in this process, `wsserver.start`), `counting_server` (a server process that
prints what it saw on SIGTERM: the websockets baseline ``loadtest/ws_server.py`` or
``loadtest/wsfleet_apps.py``), `pinned_cpus`. Plain helpers the test
modules import (``from .conftest import ...``): `free_port`, `connect_when_up`,
`shm_entries`. Frame helpers live in ``wsframes.py``, in-process server helpers in
``wsserver.py``; no test module imports another.
"""

from __future__ import annotations

import asyncio
import os
import re
import selectors
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection, connect

from wsfleet import WebSocketServer

from .wsserver import start

pytest_plugins = ["tests.godot_setup"]

TESTS_DIR = Path(__file__).resolve().parent


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def connect_when_up(url: str, **kwargs: Any) -> ClientConnection:
    """A websockets client connection to ``url``, retried for up to ~10 s while nothing
    listens there yet (a server process still starting)."""
    for _ in range(200):
        try:
            return await connect(url, open_timeout=2, **kwargs)
        except OSError:
            await asyncio.sleep(0.05)
    raise AssertionError(f"nothing listens at {url}")


@pytest.fixture
def servers() -> Iterator[Callable[..., WebSocketServer]]:
    """Start servers with ``servers(...)`` (`wsserver.start`); every one is stopped at
    teardown."""
    started: list[WebSocketServer] = []

    def make(*args: Any, **kwargs: Any) -> WebSocketServer:
        server = start(*args, **kwargs)
        started.append(server)
        return server

    yield make
    for server in started:
        server.stop()


class CountingServer:
    """A server process on 127.0.0.1 started with ``--port 0 --report-count``."""

    def __init__(self, proc: subprocess.Popen[str], port: int) -> None:
        self.proc = proc
        self.port = port

    def stop_and_count(self) -> dict[str, int]:
        """SIGTERM, then the counts it prints on exit (the "connected ..." line of
        "name value" pairs)."""
        self.proc.send_signal(signal.SIGTERM)
        out, _ = self.proc.communicate(timeout=20)
        assert self.proc.returncode == 0, out
        line = [x for x in out.splitlines() if x.startswith("connected ")]
        assert line, out
        words = line[-1].split()
        return {name: int(value) for name, value in zip(words[::2], words[1::2], strict=True)}


@pytest.fixture
def counting_server() -> Iterator[Callable[..., CountingServer]]:
    """``counting_server(MODULE, *args)``: ``python -m MODULE *args --port 0 --report-count``,
    once it printed ``listening HOST:PORT``; killed by pid at teardown if still running."""
    started: list[subprocess.Popen[str]] = []

    def start(*module_args: str) -> CountingServer:
        proc = subprocess.Popen(
            [sys.executable, "-m", *module_args, "--port", "0", "--report-count"],
            stdout=subprocess.PIPE,
            text=True,
        )
        started.append(proc)
        assert proc.stdout is not None
        with selectors.DefaultSelector() as sel:
            sel.register(proc.stdout, selectors.EVENT_READ)
            assert sel.select(30), f"{module_args[0]} did not start"
        line = proc.stdout.readline()
        match = re.fullmatch(r"listening [\d.]+:(\d+)\n", line)
        assert match, line
        return CountingServer(proc, int(match[1]))

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.kill()  # that pid only
        proc.wait(timeout=10)
        if proc.stdout is not None:
            proc.stdout.close()


@pytest.fixture
def spawn() -> Iterator:
    """Start a fresh interpreter on a helper script in tests/; killed (by pid) at teardown."""
    started: list[subprocess.Popen] = []

    def start(script: str, *args: str, pass_fds: tuple[int, ...] = (), **kw) -> subprocess.Popen:
        proc = subprocess.Popen(
            [sys.executable, str(TESTS_DIR / script), *args],
            pass_fds=pass_fds,
            **kw,
        )
        started.append(proc)
        return proc

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


def shm_entries() -> set[str]:
    try:
        return set(os.listdir("/dev/shm"))
    except FileNotFoundError:
        return set()


@pytest.fixture
def pinned_cpus() -> Iterator[tuple[int, int] | None]:
    """Pin this process to one CPU and offer another for the peer (the stress must cross cores)."""
    original = os.sched_getaffinity(0)
    cpus = sorted(original)
    if len(cpus) < 2:
        yield None
        return
    os.sched_setaffinity(0, {cpus[0]})
    try:
        yield cpus[0], cpus[1]
    finally:
        os.sched_setaffinity(0, original)
