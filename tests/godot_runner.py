"""The real Godot 3.2.3 engine for tests: ``godot3-server`` processes running tests/godot.

A test module defines its fixture as::

    @pytest.fixture
    def godot(tmp_path: Path) -> Iterator[GodotProcesses]:
        with GodotProcesses(tmp_path) as processes:
            yield processes

and starts scripts with ``godot.start(script, *arguments)`` (`options` writes the
``--wsfleet-NAME=VALUE`` form the scripts read). Every process gets its own working
directory under ``tmp_path`` (Godot writes logs/ under res://, the working directory
when there is no project) and a HOME there (user://, ~/.local/share/godot); its
stdout and stderr are read by a thread; each ``RESULT {json}`` line is one
observation. The processes still running at the end are killed, by pid.

CI installs Debian's ``godot3-server`` (3.2.3); without it these tests fail, on
purpose. ``WSFLEET_GODOT`` may name another Godot 3.2 headless binary.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any

import pytest

GODOT_DIR = Path(__file__).resolve().parent / "godot"
AFTER_EXIT = 5  # seconds for what is still to come of processes that have all exited


@functools.cache
def _checked_godot(path: str) -> str:
    with tempfile.TemporaryDirectory(prefix="godot-version-") as cwd:
        version = subprocess.run(
            [path, "--version"], capture_output=True, text=True, timeout=30, cwd=cwd
        ).stdout.strip()
    if not version.startswith("3.2."):
        pytest.fail(f"{path} is Godot {version!r}; these tests need Godot 3.2.x")
    return path


def godot_binary() -> str:
    """The Godot 3.2 headless binary (its version checked once); fails the test without it."""
    path = shutil.which(os.environ.get("WSFLEET_GODOT") or "godot3-server")
    if not path:
        pytest.fail(
            "godot3-server (Godot 3.2.3 headless, Debian package 'godot3-server') is not "
            "installed: these tests need the real engine. Install it, or set WSFLEET_GODOT "
            "to a Godot 3.2 headless binary."
        )
    return _checked_godot(path)


def options(**values: Any) -> list[str]:
    """``--wsfleet-NAME=VALUE`` arguments (``_`` in a name becomes ``-``)."""
    return [f"--wsfleet-{key.replace('_', '-')}={value}" for key, value in values.items()]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class GodotProcess:
    """One ``godot3-server`` process; its output is read by a thread."""

    def __init__(self, proc: subprocess.Popen, name: str) -> None:
        self.proc = proc
        self.name = name
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            self.lines.append(raw.decode("utf-8", "replace").rstrip("\n"))

    def exited(self) -> bool:
        return self.proc.poll() is not None

    def finish_reading(self) -> None:
        self._reader.join(timeout=10)

    def output(self) -> str:
        return f"[{self.name}, exit status {self.proc.poll()}]\n" + "\n".join(self.lines)

    def results(self) -> list[dict[str, Any]]:
        return [json.loads(line[7:]) for line in list(self.lines) if line.startswith("RESULT ")]

    def events(self, name: str) -> list[dict[str, Any]]:
        return [r for r in self.results() if r.get("event") == name]

    def checks(self, name: str) -> list[dict[str, Any]]:
        return [r for r in self.results() if r.get("check") == name]

    def count_lines(self, text: str) -> int:
        return sum(text in line for line in self.lines)

    def stop(self) -> None:
        """Kill the process (this pid only) if it still runs; read what it printed."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)
        self.finish_reading()
        if self.proc.stdout is not None:
            self.proc.stdout.close()


class GodotProcesses:
    """Starts Godot scripts for one test; leaving the ``with`` block stops them all."""

    def __init__(self, tmp_path: Path) -> None:
        self.binary = godot_binary()
        self.tmp_path = tmp_path
        self.started: list[GodotProcess] = []
        home = tmp_path / "home"
        home.mkdir()
        self.env = dict(
            os.environ,
            HOME=str(home),
            XDG_DATA_HOME=str(home / "data"),
            XDG_CONFIG_HOME=str(home / "config"),
            XDG_CACHE_HOME=str(home / "cache"),
            LANG="en_US.UTF-8",  # Godot reads LANG only, and complains about "C"
        )

    def start(self, script: Path, *arguments: str) -> GodotProcess:
        """``godot3-server --no-window -s SCRIPT ARGUMENTS...`` in a fresh working directory."""
        name = f"{script.stem}-{len(self.started)}"
        workdir = self.tmp_path / name
        workdir.mkdir()
        proc = subprocess.Popen(
            [self.binary, "--no-window", "-s", str(script), *arguments],
            cwd=workdir,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        process = GodotProcess(proc, name)
        self.started.append(process)
        return process

    def __enter__(self) -> GodotProcesses:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for process in self.started:
            process.stop()


def wait_until(
    condition: Callable[[], Any],
    processes: list[GodotProcess],
    what: str,
    *,
    wait: float,
    poll: Callable[[], None] = lambda: time.sleep(0.01),
) -> None:
    """``poll()`` until ``condition()``; on a deadline show what Godot printed.

    The deadline is ``wait`` seconds, or `AFTER_EXIT` once every Godot process has exited.
    """
    deadline = time.monotonic() + wait
    exited_at = None
    while not condition():
        now = time.monotonic()
        if exited_at is None and all(p.exited() for p in processes):
            exited_at = now
        if now > deadline or (exited_at is not None and now > exited_at + AFTER_EXIT):
            for p in processes:
                p.finish_reading()
            outputs = "\n---\n".join(p.output() for p in processes)
            why = "every Godot process exited" if exited_at is not None else "timed out"
            raise AssertionError(f"{why} before {what}; Godot printed:\n{outputs}")
        poll()
