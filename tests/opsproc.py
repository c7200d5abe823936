"""Helpers of the operations tests: a ``wsfleet serve`` process with its control socket,
and the ``wsfleet status|stop|drain`` commands run as processes.

`Served` starts the server in its own temporary socket folder, waits until its
supervisor answers, and at the end kills (by pid) whatever of its process tree
is left.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import orjson
import psutil

from wsfleet.ipc import opsock

from .conftest import free_port


class Served:
    """``wsfleet serve --port P --control PATH ...`` for one test (a context manager)."""

    def __init__(
        self, folder: Path, shards: int = 2, *extra: str, env: dict[str, str] | None = None
    ) -> None:
        self.port = free_port()
        folder.chmod(0o700)
        self.control = str(folder / f"{self.port}.sock")
        self.argv = [
            sys.executable, "-m", "wsfleet", "serve", "--quiet", "--port", str(self.port),
            "--shards", str(shards), "--control", self.control, *extra,
        ]  # fmt: skip
        self.env = None if env is None else {**os.environ, **env}
        self.proc: subprocess.Popen | None = None
        self.tree: list[psutil.Process] = []

    def __enter__(self) -> Served:
        self.proc = subprocess.Popen(self.argv, stderr=subprocess.PIPE, text=True, env=self.env)
        deadline = time.monotonic() + 20
        while True:
            try:
                doc = self.status()
                if all(row["state"] == "running" for row in doc["shards"]):
                    break
            except OSError:
                pass
            assert self.proc.poll() is None, self.proc.stderr.read()
            assert time.monotonic() < deadline, "the server did not come up"
            time.sleep(0.05)
        root = psutil.Process(self.proc.pid)
        self.tree = [root, *root.children(recursive=True)]
        return self

    def __exit__(self, *exc: object) -> None:
        try:  # and what started since (restarted or reloaded shards)
            root = psutil.Process(self.proc.pid)
            self.tree += root.children(recursive=True)
        except psutil.NoSuchProcess:
            pass
        for process in self.tree:
            try:
                process.kill()
            except psutil.NoSuchProcess:
                pass
        if self.proc is not None:
            self.proc.wait(10)
            self.proc.stderr.close()

    def status(self) -> dict[str, Any]:
        return opsock.request(self.control, {"cmd": "status"}, 5.0)[0]

    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"


def wsfleet(*argv: str, timeout: float = 30) -> subprocess.CompletedProcess:
    """``wsfleet ARGV...`` as a process, its output captured."""
    return subprocess.run(
        [sys.executable, "-m", "wsfleet", *argv],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def status_json(control: str) -> dict[str, Any]:
    result = wsfleet("status", "--control", control, "--json")
    assert result.returncode == 0, result.stderr
    return orjson.loads(result.stdout)
