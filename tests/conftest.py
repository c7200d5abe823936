"""Shared fixtures: every process a test starts is ended by the fixture that started it."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest_plugins = ["tests.godot_setup"]

TESTS_DIR = Path(__file__).resolve().parent


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
