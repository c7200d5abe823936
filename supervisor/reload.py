"""``wsfleet reload``: replace every shard process, one at a time, without losing a connection.

A `Reload` walks the shards in order; for each, a `Succession` goes through
two phases, driven by the arbiter's master loop (`on_readable`, `on_reaped`,
`check`), never blocking it:

``BOOTING``
    The supervisor has started the successor, a fresh interpreter
    (`Arbiter.spawn_successor`), and sent it the shard's configuration and
    descriptors; the old shard serves as before.  Ends when the successor says
    `SuccessorReady` on its channel.  If the successor dies or does not get
    ready within `BOOT_SECONDS`, the reload stops there and the old shard goes
    on (nothing of it was touched).  If the old shard dies, its death is a crash
    like any other (its peers are gone, it is restarted) and the successor is
    killed.
``HANDING``
    The supervisor has sent the old shard `HandOff` with the other end of the
    successor's boot socket, and made the successor the shard's process
    (`Arbiter.succeed`): the old shard hands its connections over and exits
    (its exit is expected: no `ShardDown`, no restart).  Ends when the
    successor says `TookOver`.  If the successor dies first (the old shard
    died midway, or the successor itself), that is the shard's death: its
    peers are gone and it is restarted, as after any crash, and the reload
    goes on with the next shard.  Bounded by `TAKEOVER_SECONDS`: then both
    processes are killed, which ends the same way.

Whoever asked (the control socket) gets a line per shard and a last line;
`wsfleet.supervisor.control` writes them.

Imports the standard library and `wsfleet.ipc` only.
"""

from __future__ import annotations

import enum
import logging
import os
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from wsfleet.ipc import control

log = logging.getLogger("wsfleet.supervisor")

#: How long a successor may take to start (a fresh interpreter imports uvloop, websockets).
BOOT_SECONDS = 30.0
#: How long a handoff may take, from `HandOff` to `TookOver` (the old shard gives its
#: connections up to 5 s to settle, twice, and a chunked command 5 s).
TAKEOVER_SECONDS = 30.0


class Shards(Protocol):
    """What a reload needs of the arbiter."""

    def running_pid(self, index: int) -> int:
        """The shard's process, 0 when none runs."""

    def spawn_successor(self, index: int) -> tuple[int, socket.socket, socket.socket]:
        """Start the successor: its pid, our end of its boot socket, our end of its channel."""

    def succeed(self, index: int, pid: int, channel: socket.socket, link: socket.socket) -> None:
        """Tell the shard's process to hand off on ``link``; ``pid`` becomes the shard's."""

    def took_over(self, index: int, pid: int) -> None:
        """The successor serves the shard's connections."""


class Phase(enum.Enum):
    BOOTING = "booting"
    HANDING = "handing"


@dataclass
class Succession:
    """One shard's replacement (see the module docstring for the phases)."""

    index: int
    old_pid: int
    pid: int
    #: Our end of the successor's boot socket, until it goes to the old shard.
    link: socket.socket | None
    channel: socket.socket
    phase: Phase = Phase.BOOTING
    started: float = field(default_factory=time.monotonic)
    deadline: float = 0.0

    def close_link(self) -> None:
        if self.link is not None:
            self.link.close()
            self.link = None


class Reload:
    """One ``wsfleet reload``: ``indexes`` in order; ``report`` gets each line for the client."""

    def __init__(
        self, shards: Shards, indexes: list[int], report: Callable[[dict[str, Any]], None]
    ) -> None:
        self._shards = shards
        self._queue = list(indexes)
        self._report = report
        self.current: Succession | None = None
        self.errors: list[str] = []
        self.replaced = 0
        self.done = False
        #: Old shards handing off or exiting after the handoff: their exit is expected.
        self.retiring: set[int] = set()
        self._next()

    # -- for the arbiter's loop ---------------------------------------------------------

    def fds(self) -> list[int]:
        """What the loop must watch for this reload (the successor's channel)."""
        return [self.current.channel.fileno()] if self.current is not None else []

    def on_readable(self, readable: set[Any]) -> None:
        current = self.current
        if current is None or current.channel.fileno() not in readable:
            return
        try:
            received = control.receive(current.channel)
        except BlockingIOError:
            return
        except (control.ControlError, OSError) as exc:
            log.error("shard %d: bad message from its successor: %s", current.index, exc)
            return
        if received is None:
            return  # it died: reaping it says what that means
        message, _fds = received
        if current.phase is Phase.BOOTING and isinstance(message, control.SuccessorReady):
            self._hand_off(current)
        elif current.phase is Phase.HANDING and isinstance(message, control.TookOver):
            self._shards.took_over(current.index, current.pid)
            seconds = time.monotonic() - current.started
            log.info(
                "shard %d reloaded: pid %d -> %d, %d connection(s) moved, %.2f s",
                current.index,
                current.old_pid,
                current.pid,
                message.connections,
                seconds,
            )
            self.replaced += 1
            self._report(
                {
                    "shard": current.index,
                    "old_pid": current.old_pid,
                    "pid": current.pid,
                    "connections": message.connections,
                    "seconds": round(seconds, 3),
                }
            )
            self.current = None
            self._next()
        else:
            log.error("shard %d: unexpected message from its successor: %r", current.index, message)

    def on_reaped(self, pid: int, code: int) -> bool:
        """A child exited; True when it was the reload's to deal with (not a shard's death).

        The arbiter handles every other death, including that of a successor
        that had become the shard's process (`HANDING`): then `shard_died`
        follows.
        """
        if pid in self.retiring:
            self.retiring.discard(pid)
            if code != 0:
                log.warning("the old process %d of a reloaded shard exited with %d", pid, code)
            return True
        current = self.current
        if current is not None and current.phase is Phase.BOOTING and pid == current.pid:
            self._fail(current, f"its successor exited ({code}) before it was ready", stop=True)
            return True
        return False

    def shard_died(self, index: int, pid: int) -> None:
        """The arbiter reaped the process of shard ``index`` (a crash: its peers are gone)."""
        current = self.current
        if current is None or current.index != index:
            return
        if current.phase is Phase.BOOTING and pid == current.old_pid:
            self._kill_successor(current)  # it would take over rings that are renewed
            self._fail(current, "it died during the reload: its peers are gone")
        elif current.phase is Phase.HANDING and pid == current.pid:
            self._fail(current, "the handoff failed: its peers are gone (it is restarted)")

    def check(self) -> None:
        """Deadlines: a successor that does not boot, a handoff that does not end."""
        current = self.current
        if current is None or time.monotonic() < current.deadline:
            return
        if current.phase is Phase.BOOTING:
            self._kill_successor(current)
            self._fail(current, f"its successor was not ready within {BOOT_SECONDS:g} s", stop=True)
        else:
            log.error(
                "shard %d: the handoff took over %g s; killing both",
                current.index,
                TAKEOVER_SECONDS,
            )
            for pid in (current.old_pid, current.pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            current.deadline = float("inf")  # the successor's death ends it (shard_died)

    def abort(self, why: str) -> None:
        """The server stops: a successor still booting is killed; the reload ends."""
        current = self.current
        if current is not None and current.phase is Phase.BOOTING:
            self._kill_successor(current)
            self._fail(current, why, stop=True)
        elif not self.done:
            self._stop_here()

    # -- the steps ----------------------------------------------------------------------

    def _next(self) -> None:
        while self._queue:
            index = self._queue.pop(0)
            old_pid = self._shards.running_pid(index)
            if not old_pid:
                self._error(index, "it is not running")
                continue
            try:
                pid, link, channel = self._shards.spawn_successor(index)
            except OSError as exc:
                self._error(index, f"its successor could not be started: {exc}")
                self._stop_here()
                return
            channel.setblocking(False)
            self.current = Succession(index, old_pid, pid, link, channel)
            self.current.deadline = self.current.started + BOOT_SECONDS
            return
        self._finish()

    def _kill_successor(self, current: Succession) -> None:
        """End a successor that never ran the shard; its exit is then expected."""
        os.kill(current.pid, signal.SIGKILL)
        self.retiring.add(current.pid)

    def _hand_off(self, current: Succession) -> None:
        assert current.link is not None
        try:
            self._shards.succeed(current.index, current.pid, current.channel, current.link)
        except OSError as exc:  # the old shard is gone: its death is being reaped
            log.error("shard %d: cannot tell it to hand off: %s", current.index, exc)
        current.close_link()
        self.retiring.add(current.old_pid)
        current.phase = Phase.HANDING
        current.deadline = time.monotonic() + TAKEOVER_SECONDS

    def _fail(self, current: Succession, why: str, *, stop: bool = False) -> None:
        """This shard is not reloaded; the next is, unless ``stop`` (its successor could not
        boot: the others' would not either, with the same code)."""
        current.close_link()
        if current.phase is Phase.BOOTING:
            current.channel.close()
        self.current = None
        self._error(current.index, why)
        if stop:
            self._stop_here()
        else:
            self._next()

    def _stop_here(self) -> None:
        """End the reload now: the shards not yet reached keep their processes."""
        if self._queue:
            rest = ", ".join(map(str, self._queue))
            text = f"the reload stopped: shard {rest} keeps its process"
            if len(self._queue) > 1:
                text = f"the reload stopped: shards {rest} keep their processes"
            log.error("%s", text)
            self.errors.append(text)
            self._queue.clear()
        self._finish()

    def _error(self, index: int, why: str) -> None:
        text = f"shard {index} not reloaded: {why}"
        log.error("%s", text)
        self.errors.append(text)
        self._report({"shard": index, "error": text})

    def _finish(self) -> None:
        if self.done:
            return
        self.done = True
        self._report(
            {
                "reloaded": True,
                "ok": not self.errors,
                "errors": self.errors,
                "replaced": self.replaced,
            }
        )
