"""Processes seen from outside: CPU time and memory of a server's process tree, CPU
lists and pinning, and the open-files limit.

Owns: `ProcessTree` (a process and every descendant seen alive, their CPU seconds),
`tree_memory` / `rss_by_role` (RSS and USS, psutil), `parse_cpus` and `pinned`
(``taskset -c`` lists, this process's affinity for a while), `raise_nofile`.

Imports only the standard library and psutil.
"""

from __future__ import annotations

import contextlib
import os
import resource
from collections.abc import Iterator
from dataclasses import dataclass

import psutil

# File descriptors a load process needs besides the connections (stdio, event loop, pipes...).
FD_MARGIN = 64


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


@dataclass
class TreeMemory:
    rss: int  # bytes, summed over the processes
    uss: int | None  # unique set size, summed; None when it cannot be read
    processes: int


def tree_memory(pid: int) -> TreeMemory:
    """Memory of process ``pid`` and all its descendants (psutil)."""
    root = psutil.Process(pid)
    procs = [root]
    try:
        procs += root.children(recursive=True)
    except psutil.NoSuchProcess:
        pass
    rss = 0
    uss: int | None = 0
    counted = 0
    for p in procs:
        try:
            rss += p.memory_info().rss
            counted += 1
        except psutil.NoSuchProcess:
            continue
        if uss is not None:
            try:
                uss += p.memory_full_info().uss
            except (psutil.AccessDenied, psutil.NoSuchProcess, AttributeError):
                uss = None
    return TreeMemory(rss, uss, counted)


def rss_by_role(pid: int) -> dict[str, int]:
    """RSS (bytes) of a wsfleet tree by role: ``front`` (``pid``), ``supervisor``,
    ``shard0``..., and their ``total``."""
    out: dict[str, int] = {}
    try:
        front = psutil.Process(pid)
        out["front"] = front.memory_info().rss
        for supervisor in front.children():
            out["supervisor"] = supervisor.memory_info().rss
            for i, shard in enumerate(sorted(supervisor.children(), key=lambda p: p.pid)):
                out[f"shard{i}"] = shard.memory_info().rss
    except psutil.NoSuchProcess:
        pass
    out["total"] = sum(out.values())
    return out


def parse_cpus(spec: str) -> list[int]:
    """A ``taskset -c`` list (``0,2-3``) as CPU numbers; "" is none."""
    cpus: list[int] = []
    for part in filter(None, spec.split(",")):
        lo, _, hi = part.partition("-")
        cpus.extend(range(int(lo), int(hi or lo) + 1))
    return cpus


@contextlib.contextmanager
def pinned(cpus: set[int]) -> Iterator[None]:
    """This process on ``cpus`` (all it had when empty) for the body, then as it was."""
    original = os.sched_getaffinity(0)
    try:
        if cpus:
            os.sched_setaffinity(0, cpus)
        yield
    finally:
        os.sched_setaffinity(0, original)


class ResourceLimitError(RuntimeError):
    """The file descriptor limit cannot hold the connections asked for."""


def raise_nofile(needed: int) -> int:
    """Raise RLIMIT_NOFILE's soft limit to ``needed`` (never above the hard limit).

    Returns the soft limit now in force; raises `ResourceLimitError` when the hard
    limit is below ``needed``. Processes started afterwards inherit the limit.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return soft
    if hard != resource.RLIM_INFINITY and hard < needed:
        raise ResourceLimitError(
            f"{needed} file descriptors are needed but RLIMIT_NOFILE's hard limit is {hard} "
            f"(soft {soft}); raise the hard limit (ulimit -Hn, systemd LimitNOFILE=) or open "
            f"at most {hard - FD_MARGIN} connections"
        )
    resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))
    return needed
