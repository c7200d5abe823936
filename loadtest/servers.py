"""The server under load: where it is (`Target`) and, for the benchmarks, starting and
stopping it (`ServerProcess`).

Owns: a server command line from a template (`server_argv`), one server process
in its own session under ``taskset`` with its log, a bounded wait for its first
WebSocket handshake, and its stop (SIGTERM, then SIGKILL for whatever is left
of its tree, each process by pid).

May import `procstats` and `wsclient`.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import IO, Any

import psutil
import uvloop

from wsfleet.loadtest.procstats import ProcessTree
from wsfleet.loadtest.wsclient import connect

HOST = "127.0.0.1"


class ServerFailed(Exception):
    """A server that could not start or never answered a handshake."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def server_argv(template: str, port: int) -> list[str]:
    """``template`` with ``{port}`` and ``{host}`` filled in, as argv: a leading
    ``python``/``python3`` is this interpreter, and a program not on PATH is looked up
    next to it (the venv's ``wsfleet`` without activating the venv)."""
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


class Target:
    """Where the load goes: ``ws://host:port/path``, and the server's pid when known (for its
    CPU and memory)."""

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
