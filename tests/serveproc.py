"""`wsfleet serve` as a child process for the operations tests: its log lines, its tree, its end.

`ServeProcess` starts ``python -m wsfleet serve`` in a session of its own,
gathers stderr line by line in a thread (`wait_for` a line), records the
process tree, and `end` kills by pid whatever of it still lives.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time

import psutil

from .conftest import free_port


class ServeProcess:
    def __init__(
        self,
        *options: str,
        port: int | None = None,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        add_port: bool = True,
        preexec_fn=None,
    ) -> None:
        self.port = free_port() if port is None else port
        argv = [sys.executable, "-m", "wsfleet", "serve", *options]
        if add_port:
            argv += ["--port", str(self.port)]
        self.proc = subprocess.Popen(
            argv,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
            start_new_session=True,
            env={**os.environ, **(env or {})},
            cwd=cwd,
            preexec_fn=preexec_fn,
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.tree: list[psutil.Process] = []

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))

    def wait_for(self, pattern: str, timeout: float = 20.0, start: int = 0) -> re.Match[str]:
        """The first log line from index ``start`` on that matches ``pattern``; fails after
        ``timeout``."""
        deadline = time.monotonic() + timeout
        regex = re.compile(pattern)
        while True:
            for line in self.lines[start:]:
                found = regex.search(line)
                if found:
                    return found
            if time.monotonic() > deadline:
                raise AssertionError(f"no line matches {pattern!r} in:\n" + self.log())
            if self.proc.poll() is not None:
                time.sleep(0.2)  # the last lines
                for line in self.lines[start:]:
                    if regex.search(line):
                        return regex.search(line)  # type: ignore[return-value]
                raise AssertionError(
                    f"exited ({self.proc.returncode}) before {pattern!r}:\n" + self.log()
                )
            time.sleep(0.05)

    def wait_up(self, timeout: float = 20.0) -> None:
        self.wait_for(r"wsfleet [0-9.]+: .* on wss?://", timeout)
        self.record_tree()

    def record_tree(self) -> list[psutil.Process]:
        front = psutil.Process(self.proc.pid)
        self.tree = [front, *front.children(recursive=True)]
        return self.tree

    def shards(self) -> list[psutil.Process]:
        """The shard processes now (the supervisor's children)."""
        front = psutil.Process(self.proc.pid)
        return [child for sup in front.children() for child in sup.children()]

    def wait_shards(self, count: int, timeout: float = 10.0) -> list[psutil.Process]:
        """The shard processes once there are ``count`` of them."""
        deadline = time.monotonic() + timeout
        while len(shards := self.shards()) != count:
            assert time.monotonic() < deadline, f"{len(shards)} shards, not {count}"
            time.sleep(0.05)
        return shards

    def log(self) -> str:
        return "\n".join(self.lines)

    def end(self) -> None:
        """Kill (by pid) whatever this test started that is still alive."""
        known = list(self.tree)
        try:
            known += self.record_tree()
        except psutil.NoSuchProcess:
            pass
        for process in known:
            try:
                process.kill()
            except psutil.NoSuchProcess:
                pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            pass
        self._reader.join(10)
        if self.proc.stderr is not None:
            self.proc.stderr.close()
