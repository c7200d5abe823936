"""The fleet's counters in shared memory: their layout, the shards' writer, everyone's reader.

The front creates one memfd when it listens (`Stats.create`) and hands it to
the supervisor (``--stats-fd``), whose shards inherit the mapping by fork; so
the front (``get_stats``) and the supervisor (the control socket, /metrics)
read the same words the shards write, without asking anybody.

Layout: 256-byte blocks (four cache lines), 8-byte words.  Block 0 is the
fleet's (word 1: the drain flag, written by the supervisor, read by every
shard at each handshake); block ``1 + i`` is shard ``i``'s, written by that
shard only (`ShardStats.publish`), word 0 a sequence number (a seqlock: odd
while a write is under way; readers retry), then `SHARD_FIELDS` in order.
After the shards' blocks, the front's region (`FRONT_BYTES`): a seqlock word,
a length word, then a JSON object the front publishes (`Stats.write_front`,
e.g. its ``"cluster"`` section, once a second) and `status_document` merges
into the document.

A shard counts into plain int attributes in its own loops (no call per
message) and publishes the lot every `PUBLISH_SECONDS` from a loop timer:
one copy of ~25 words, costing nothing per message.  A restarted shard
continues the counters of its predecessor (`ShardStats.resume`), so that they
only ever grow while the server runs; gauges (``peers``, ``ring_fill``,
``paused_sockets``) start again from 0, and the supervisor zeroes them when a
shard dies (`Stats.clear_gauges`).

Imports the standard library, orjson (the front's region), psutil (CPU and memory of the
processes) and
`wsfleet.ipc.atomic` only.
"""

from __future__ import annotations

import mmap
import os
import time
from array import array
from dataclasses import dataclass
from typing import Any

import orjson
import psutil

from .atomic import AtomicWord

BLOCK_BYTES = 512
_WORDS = BLOCK_BYTES // 8
#: How often a shard publishes its counters (the figures are at most this old).
PUBLISH_SECONDS = 0.1

#: Close codes with their own counter; any other code counts in ``closes_other``.
CLOSE_CODES = (1000, 1001, 1002, 1003, 1006, 1007, 1008, 1009, 1011, 1012)
#: Reasons a handshake is refused: the HTTP status sent (400 covers every other
#: malformed request, 414 counts as 431), ``timeout`` (not done within
#: ``handshake_timeout``), ``dropped`` (``set_refuse_new_connections``: cut, no answer).
REFUSE_REASONS = ("403", "429", "431", "503", "400", "timeout", "dropped")

#: The words of a shard's block after its sequence number, in order.
SHARD_FIELDS: tuple[str, ...] = (
    "peers",
    "handshakes_accepted",
    *(f"refused_{reason}" for reason in REFUSE_REASONS),
    "messages_in",
    "bytes_in",
    "messages_out",
    "bytes_out",
    *(f"closes_{code}" for code in CLOSE_CODES),
    "closes_other",
    "reloads",
    "handoff_dropped",
    "health_checks",
    "rate_limited",
    "deflate_reload_closes",
    "shard_handler_errors",
    "ring_fill",
    "ring_capacity",
    "paused_sockets",
)
#: The fields that are levels, not running totals (a restarted shard starts them at 0).
GAUGES = frozenset({"peers", "ring_fill", "ring_capacity", "paused_sockets"})
assert len(SHARD_FIELDS) < _WORDS
_GAUGE_INDEXES = tuple(i for i, name in enumerate(SHARD_FIELDS) if name in GAUGES)
_DRAIN_WORD = 1
#: The front's region: what the front alone knows (a cluster's view), as JSON.
FRONT_BYTES = 64 * 1024


def refuse_field(status: int | None) -> str:
    """The counter of a handshake refused with HTTP ``status`` (None: no answer sent)."""
    if status == 403:
        return "refused_403"
    if status == 429:
        return "refused_429"
    if status in (431, 414):
        return "refused_431"
    if status == 503:
        return "refused_503"
    return "refused_400"


def close_field(code: int) -> str:
    """The counter of a connection that ended with close code ``code``."""
    return f"closes_{code}" if code in CLOSE_CODES else "closes_other"


class Stats:
    """The whole mapping: every shard's block and the fleet's (see the module docstring)."""

    def __init__(self, fd: int, shards: int) -> None:
        self.fd = fd
        self.shards = shards
        self._map = mmap.mmap(fd, _size(shards))
        self._words = memoryview(self._map).cast("Q")
        view = memoryview(self._map)
        self._drain = AtomicWord(view[_DRAIN_WORD * 8 :][:8])
        self._seqs = [AtomicWord(view[(1 + i) * BLOCK_BYTES :][:8]) for i in range(shards)]
        self._front_at = BLOCK_BYTES * (1 + shards)
        self._front_seq = AtomicWord(view[self._front_at :][:8])

    @classmethod
    def create(cls, shards: int) -> Stats:
        """A new zeroed mapping; its fd is inheritable-by-``pass_fds`` (close-on-exec)."""
        fd = os.memfd_create("wsfleet-stats", os.MFD_CLOEXEC)
        os.ftruncate(fd, _size(shards))
        return cls(fd, shards)

    def close(self) -> None:
        """Unmap and close the fd (after every reader and writer of this process is done)."""
        self._drain.close()
        self._front_seq.close()
        for seq in self._seqs:
            seq.close()
        self._words.release()
        self._map.close()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    # -- the fleet block ---------------------------------------------------------------------

    @property
    def draining(self) -> bool:
        return bool(self._drain.load())

    @draining.setter
    def draining(self, value: bool) -> None:
        self._drain.store(int(value))

    # -- the front's region ------------------------------------------------------------------

    def write_front(self, document: bytes) -> bool:
        """Publish the front's JSON object (the front only); False if it does not fit."""
        if len(document) > FRONT_BYTES - 16:
            return False
        seq = self._front_seq
        current = seq.load()
        seq.store(current + 1)
        start = self._front_at
        self._words[start // 8 + 1] = len(document)
        self._map[start + 16 : start + 16 + len(document)] = document
        seq.store(current + 2)
        return True

    def read_front(self) -> bytes:
        """The front's JSON object as last published (b"" if none yet)."""
        start = self._front_at
        data = b""
        for _ in range(1000):
            before = self._front_seq.load()
            if before & 1:
                continue
            size = min(self._words[start // 8 + 1], FRONT_BYTES - 16)
            data = bytes(self._map[start + 16 : start + 16 + size])
            if self._front_seq.load() == before:
                break
        return data

    # -- shard blocks ------------------------------------------------------------------------

    def read_shard(self, index: int) -> dict[str, int]:
        """Shard ``index``'s figures, a consistent snapshot (retried while a write is under way)."""
        seq = self._seqs[index]
        start = (1 + index) * _WORDS + 1
        for _ in range(1000):
            before = seq.load()
            if before & 1:
                continue
            values = self._words[start : start + len(SHARD_FIELDS)].tolist()
            if seq.load() == before:
                break
        else:  # a writer that keeps writing (it cannot: 10 writes a second): take what is there
            values = self._words[start : start + len(SHARD_FIELDS)].tolist()
        return dict(zip(SHARD_FIELDS, values, strict=True))

    def clear_gauges(self, index: int) -> None:
        """Zero shard ``index``'s gauges: it died (only when no process writes its block)."""
        start = (1 + index) * _WORDS + 1
        for i in _GAUGE_INDEXES:
            self._words[start + i] = 0
        seq = self._seqs[index]
        if seq.load() & 1:  # it was killed in the middle of a write: close the write
            seq.store(seq.load() + 1)

    def writer(self, index: int) -> ShardStats:
        return ShardStats(self, index)

    def write_shard(self, index: int, values: array) -> None:
        """Shard ``index``'s words, under its seqlock (its own process only: `ShardStats`)."""
        seq = self._seqs[index]
        start = (1 + index) * _WORDS + 1
        current = seq.load()
        seq.store(current + 1)  # odd: readers wait
        self._words[start : start + len(values)] = values
        seq.store(current + 2)


def _size(shards: int) -> int:
    return BLOCK_BYTES * (1 + shards) + FRONT_BYTES


class ShardStats:
    """One shard's writer: `publish` copies a shard's figures into its block."""

    def __init__(self, stats: Stats, index: int) -> None:
        self._stats = stats
        self.index = index

    def resume(self) -> dict[str, int]:
        """The running totals a predecessor left (gauges 0): what this shard continues from."""
        figures = self._stats.read_shard(self.index)
        return {name: 0 if name in GAUGES else value for name, value in figures.items()}

    def publish(self, figures: dict[str, int]) -> None:
        """Write ``figures`` (every name of `SHARD_FIELDS`) as one consistent snapshot."""
        self._stats.write_shard(self.index, array("Q", [figures[name] for name in SHARD_FIELDS]))

    @property
    def draining(self) -> bool:
        """The drain flag (refuse new upgrades with 503), read at each handshake."""
        return self._stats.draining


# -- the status document (``wsfleet status --json``, ``get_stats``, /metrics) --------------

#: Bumped only when a field changes meaning or goes away (new fields may be added).
STATUS_VERSION = 1


@dataclass(frozen=True, slots=True)
class ShardView:
    """What the process that supervises (or talks to) a shard knows of it besides counters.

    ``state``: ``"running"``, ``"down"`` (dead, about to be restarted) or
    ``"failed"`` (given up; ``reason`` says why).  ``started``: Unix time the
    running process started (0 when none runs).
    """

    index: int
    pid: int | None
    state: str
    reason: str | None
    restarts: int
    started: float


class ProcessMeter:
    """CPU % (since the previous reading) and RSS of processes, by pid, through psutil."""

    def __init__(self) -> None:
        self._procs: dict[int, psutil.Process] = {}

    def read(self, pid: int | None) -> tuple[float, int]:
        if not pid:
            return 0.0, 0
        proc = self._procs.get(pid)
        try:
            if proc is None:
                proc = self._procs[pid] = psutil.Process(pid)
                proc.cpu_percent(None)  # the first reading only starts the interval
            with proc.oneshot():
                return proc.cpu_percent(None), proc.memory_info().rss
        except psutil.Error:
            self._procs.pop(pid, None)
            return 0.0, 0

    def forget_others(self, pids: set[int]) -> None:
        for pid in list(self._procs):
            if pid not in pids:
                del self._procs[pid]


def status_document(
    stats: Stats, shards: list[ShardView], meter: ProcessMeter, **fleet: Any
) -> dict[str, Any]:
    """The fleet's figures, as ``wsfleet status --json`` prints them (docs/METRICS.md).

    ``{"version", "peers", "draining", "shards": [{"index", "pid", "state",
    "reason", "restarts", "uptime", "cpu_percent", "rss", <SHARD_FIELDS>}],
    "totals": {<SHARD_FIELDS>, "restarts", "cpu_percent", "rss"}}`` plus the
    ``fleet`` keywords (``port``, ``supervisor_pid``...), plus what the front
    published (`Stats.write_front`: ``"cluster"`` for a node of a cluster).
    """
    now = time.time()
    front: dict[str, Any] = {}
    raw = stats.read_front()
    if raw:
        try:
            front = orjson.loads(raw)
        except orjson.JSONDecodeError:
            front = {}
    rows = []
    for view in shards:
        row: dict[str, Any] = {
            "index": view.index,
            "pid": view.pid,
            "state": view.state,
            "reason": view.reason,
            "restarts": view.restarts,
            "uptime": round(now - view.started, 3) if view.started else 0.0,
        }
        cpu, rss = meter.read(view.pid if view.state == "running" else None)
        row["cpu_percent"], row["rss"] = round(cpu, 1), rss
        figures = stats.read_shard(view.index)
        if view.state != "running":
            for name in GAUGES:
                figures[name] = 0
        row.update(figures)
        rows.append(row)
    meter.forget_others({view.pid for view in shards if view.pid})
    summed = (*SHARD_FIELDS, "restarts", "cpu_percent", "rss")
    totals = {name: sum(row[name] for row in rows) for name in summed}
    totals["cpu_percent"] = round(totals["cpu_percent"], 1)
    return {
        "version": STATUS_VERSION,
        **fleet,
        "draining": stats.draining,
        "peers": totals["peers"],
        "shards": rows,
        "totals": totals,
        **front,
    }
