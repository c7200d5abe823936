"""The supervisor: fork the shards, reap them, restart them, tell the front.

One master loop in the style of gunicorn's arbiter: signal handlers do
nothing but wake the loop (``signal.set_wakeup_fd``); the loop reaps children
with ``waitpid(-1, WNOHANG)``, restarts dead shards after a back-off, gives a
shard up when it keeps dying (or cannot boot at all), and ends everything
when the front goes away.

Lifetimes: the supervisor watches the front's lifeline (a pipe whose write
end only the front holds), so even a SIGKILLed front ends it; each shard is
created with ``PR_SET_PDEATHSIG`` so a SIGKILLed supervisor ends the shards.
It imports the shards' code (and so uvloop and websockets) before forking,
so that every (re)start is quick.  The listening sockets (one per shard
for each address the front bound) live here for the whole run: a restarted
shard takes over its predecessor's sockets, and connections that arrived in
between wait in their backlog instead of being refused.

A hung shard (its loop stuck, the process alive: nothing reaps it) is found
by its heartbeat word in `ShardState`, which its loop bumps once a second:
one older than ``FleetConfig.shard_timeout`` gets SIGKILL, and its death
takes the path of any crash (reaped, `ShardDown`, restarted).  Every
process logs through the front's `LogConfig` (``wsfleet.ipc.logconfig``) and
titles itself ``wsfleet supervisor :PORT`` / ``wsfleet shard I/N :PORT``.

The front's configuration (`FleetConfig`) and every control message are the
typed ones of `wsfleet.ipc.control`; each shard gets its `ShardConfig`.

For an operator (`wsfleet.supervisor.ops`), the loop also serves the control
socket (``wsfleet status|stop|drain|reload``) and ``/metrics`` / ``/healthz``
from the counters the shards keep in shared memory (`wsfleet.ipc.stats`), so
they answer while the application is busy.  A reload (`wsfleet.supervisor.reload`)
is the one time a shard is started as a fresh interpreter (`spawn_successor`,
fork and exec) rather than forked: it takes over its predecessor's rings,
channel and connections, so the supervisor keeps each shard's rings and the
other end of its channel (`ShardSlot.rings`, ``.channel``).

Stopping is the front's to drive.  ``systemctl stop`` (``KillMode=control-group``)
or ``kill -TERM -PGID`` sends SIGTERM to every process of the tree at once; if the
shards and the supervisor acted on it they would race the front's orderly stop
(queued packets first, then 1001).  So the supervisor acts on SIGTERM only once
the front is gone (else the front's ``stop`` message follows), shards ignore
SIGTERM and stop on ``worker.STOP_SIGNAL`` from the supervisor, and a shard that
exits while the front is gone, while stopping, or with status 0 (it was told to
stop) is never restarted.  A shard killed alone is restarted as before.
"""

from __future__ import annotations

import argparse
import collections
import logging
import os
import select
import signal
import socket
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from wsfleet.ipc import ShardState, SharedRing, control
from wsfleet.ipc.config import FleetConfig
from wsfleet.ipc.lifeline import has_ended
from wsfleet.ipc.logconfig import LogConfig
from wsfleet.ipc.logconfig import apply as apply_logging
from wsfleet.ipc.proctitle import set_title
from wsfleet.ipc.shardstate import HEARTBEAT_SECONDS
from wsfleet.ipc.stats import ShardView, Stats
from wsfleet.shards import worker
from wsfleet.shards.worker import EXIT_BOOT_FAILED, STOP_SIGNAL

from .ops import Operations
from .reload import Reload

log = logging.getLogger("wsfleet.supervisor")

#: A shard that dies more often than this within the window is given up.
CRASH_LIMIT = 5
CRASH_WINDOW_SECONDS = 10.0
MAX_BACKOFF_SECONDS = 2.0
#: How long shards get to close their peers when the front has died / asked to stop.
FRONT_GONE_GRACE_SECONDS = 1.0
STOP_GRACE_SECONDS = 3.0


@dataclass
class ShardSlot:
    index: int
    #: One listening socket per address the front bound (``SO_REUSEPORT`` groups).
    listen_socks: list[socket.socket]
    pid: int = 0
    deaths: collections.deque[float] = field(default_factory=collections.deque)
    restart_at: float | None = None
    failed: bool = False
    reason: str | None = None  # why it was given up
    spawns: int = 0
    started: float = 0.0  # Unix time the running process started
    #: Killed by us for a stale heartbeat: its death is said to be that, not a crash.
    hung: bool = False
    #: Our end of the channel to the running process (`HandOff` goes there).
    channel: socket.socket | None = None
    #: The rings of the running process: a successor (``wsfleet reload``) takes them over.
    rings: tuple[SharedRing, SharedRing] | None = None

    def drop_channel(self) -> None:
        if self.channel is not None:
            self.channel.close()
            self.channel = None

    def drop_rings(self) -> None:
        if self.rings is not None:
            for ring in self.rings:
                ring.close()
            self.rings = None


class Arbiter:
    def __init__(
        self,
        control_sock: socket.socket,
        front_lifeline: int,
        listen_socks: list[list[socket.socket]],
        ops: dict[str, Any] | None = None,
    ) -> None:
        self.control = control_sock
        self.front_lifeline = front_lifeline
        self.slots = [ShardSlot(i, socks) for i, socks in enumerate(listen_socks)]
        self.config: FleetConfig | None = None
        self.stopping = False
        self._wakeup_r, self._wakeup_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        # Anonymous shared memory survives the shards: each one keeps its next
        # peer id here so that its replacement continues after it, and its peer
        # count, which every shard reads to enforce max_peers.
        self.state = ShardState(len(self.slots))
        # The operator's side (wsfleet.supervisor.ops): ``ops`` holds the shared counters'
        # Stats and, when on, the control socket and its path and the metrics socket.
        self.ops: Operations | None = None
        if ops is not None:
            self.ops = Operations(
                ops["stats"],
                self.shard_views,
                lambda: self._notify(control.StopRequested()),
                listen_socks[0][0].getsockname()[1] if listen_socks else 0,
                ops.get("control"),
                ops.get("metrics"),
                request_reload=self.start_reload,
            )
        #: The ``wsfleet reload`` under way (`wsfleet.supervisor.reload`), or the last one.
        self.reload: Reload | None = None

    # -- the master loop ------------------------------------------------------------------

    def run(self) -> int:
        try:
            return self._run()
        finally:
            if self.ops is not None:
                self.ops.close()

    def shard_views(self) -> list[ShardView]:
        return [
            ShardView(
                index=slot.index,
                pid=slot.pid or None,
                state="running" if slot.pid else "failed" if slot.failed else "down",
                reason=slot.reason,
                restarts=max(0, slot.spawns - 1),
                started=slot.started if slot.pid else 0.0,
            )
            for slot in self.slots
        ]

    def _run(self) -> int:
        self._install_signals()
        self.config = self._receive_config()
        apply_logging(self.config.log, "supervisor")
        set_title("supervisor", self.config.port)
        for slot in self.slots:
            self.spawn(slot)
        while True:
            readable = self._sleep()
            self.reap()
            self._check_heartbeats()
            if self.front_lifeline in readable:
                log.info("the front has exited: stopping the shards")
                self.stop(FRONT_GONE_GRACE_SECONDS)
                return 0
            if self.control in readable and self._handle_control():
                return 0
            if self._wakeup_r in readable and self._handle_signals():
                return 0
            if self.ops is not None:
                self.ops.handle(readable)
            if self.reload is not None:
                self.reload.on_readable(readable)
                self.reload.check()
            self._restart_due()

    def _sleep(self) -> set[Any]:
        now = time.monotonic()
        due = [slot.restart_at for slot in self.slots if slot.restart_at is not None]
        # At most a heartbeat apart, so that a hung shard is found within its timeout + 1 s.
        timeout = max(0.0, min(due) - now) if due else 1.0
        timeout = min(timeout, HEARTBEAT_SECONDS)
        watched = [self.front_lifeline, self.control, self._wakeup_r]
        if self.ops is not None:
            watched += self.ops.fds()
        if self.reload is not None:
            watched += self.reload.fds()
        readable, _, _ = select.select(watched, [], [], timeout)
        return set(readable)

    def _handle_control(self) -> bool:
        """True when the front asked to stop (or closed the channel)."""
        try:
            received = control.receive(self.control)
        except BlockingIOError:
            return False
        except control.ControlError as exc:
            log.error("bad control message from the front: %s", exc)
            return False
        except OSError:
            received = None
        if received is None:
            self.stop(FRONT_GONE_GRACE_SECONDS)
            return True
        message, _fds = received  # none: receive() checks that only ShardUp carries fds
        if isinstance(message, control.Stop):
            self.stop(STOP_GRACE_SECONDS)
            return True
        log.error("unexpected control message from the front: %r", message)
        return False

    def _handle_signals(self) -> bool:
        try:
            received = os.read(self._wakeup_r, 512)
        except BlockingIOError:
            return False
        if signal.SIGTERM in received and has_ended(self.front_lifeline):
            log.info("SIGTERM: stopping the shards")
            self.stop(FRONT_GONE_GRACE_SECONDS)
            return True
        # SIGCHLD: reap() already ran. SIGTERM while the front lives: it went to the whole
        # process group (systemctl stop, kill -TERM -PGID), and the front's stop follows.
        return False

    def _install_signals(self) -> None:
        signal.set_wakeup_fd(self._wakeup_w)
        for signum in (signal.SIGCHLD, signal.SIGTERM):
            signal.signal(signum, lambda *_: None)  # the wakeup fd carries the signal
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the front's to handle

    def _receive_config(self) -> FleetConfig:
        self.control.settimeout(30)
        try:
            received = control.receive(self.control)
        except control.ControlError as exc:
            raise SystemExit(
                f"wsfleet supervisor: bad configuration from the front: {exc}"
            ) from None
        self.control.setblocking(False)
        if received is None or not isinstance(received[0], FleetConfig):
            raise SystemExit("wsfleet supervisor: no configuration from the front")
        return received[0]

    # -- shards ---------------------------------------------------------------------------

    def _check_heartbeats(self) -> None:
        """SIGKILL every shard whose loop has not beaten for ``shard_timeout`` (it is hung).

        Its death then takes the path of a crash: reaped, its peers reported
        gone (`ShardDown`), restarted (and given up if it keeps hanging).
        """
        assert self.config is not None
        if self.stopping:
            return
        timeout = self.config.shard_timeout
        moving = self.reload.current.index if self.reload and self.reload.current else None
        for slot in self.slots:
            # A shard being handed over beats again once its successor runs; the reload's
            # own deadlines bound that.
            if slot.pid and not slot.hung and slot.index != moving:
                age = self.state.heartbeat_age(slot.index)
                if age > timeout:
                    log.error(
                        "shard %d (pid %d) is hung: no heartbeat for %.1f s (shard timeout "
                        "%g s); killing it",
                        slot.index,
                        slot.pid,
                        age,
                        timeout,
                    )
                    slot.hung = True
                    os.kill(slot.pid, signal.SIGKILL)

    def spawn(self, slot: ShardSlot) -> None:
        assert self.config is not None
        capacity = self.config.ring_capacity
        events = SharedRing.create(capacity)
        commands = SharedRing.create(capacity)
        slot.drop_rings()
        slot.drop_channel()
        slot.rings = (events, commands)
        slot.channel, shard_channel = control.socketpair()
        slot.restart_at = None
        slot.hung = False
        # Its heartbeat starts now: the shard has its timeout to boot and beat.
        self.state.beat(slot.index)
        supervisor_pid = os.getpid()
        # A signal that reached the child before it replaced our handlers would be
        # swallowed by them (SIGTERM: written to our wakeup fd) or kill it (STOP_SIGNAL's
        # default action): the child starts with both blocked, and the shard unblocks
        # them once its own handlers are in place (a pending stop is then handled).
        blocked = {signal.SIGTERM, STOP_SIGNAL}
        signal.pthread_sigmask(signal.SIG_BLOCK, blocked)
        pid = os.fork()
        if pid != 0:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, blocked)
        if pid == 0:  # the shard
            status = 1
            try:
                self._become_shard(slot)
                status = worker.run(
                    self.config.for_shard(slot.index, len(self.slots)),
                    slot.listen_socks,
                    events,
                    commands,
                    self.state,
                    supervisor_pid,
                    self.ops.stats.writer(slot.index) if self.ops is not None else None,
                    channel=shard_channel,
                )
            except BaseException:
                traceback.print_exc()
            finally:
                os._exit(status)
        shard_channel.close()
        slot.pid = pid
        slot.spawns += 1
        slot.started = time.time()
        if self.ops is not None:
            self.ops.shard_started(pid)
        log.debug("shard %d started (pid %d)", slot.index, pid)
        try:
            control.send(
                self.control,
                control.ShardUp(shard=slot.index, pid=pid),
                [*events.fds, *commands.fds],
            )
        except OSError:
            pass  # the front is gone; the loop notices its lifeline

    def _become_shard(self, slot: ShardSlot) -> None:
        """In the forked child: drop what belongs to the supervisor."""
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the front drives the stop (see above)
        os.close(self._wakeup_r)
        os.close(self._wakeup_w)
        os.close(self.front_lifeline)
        self.control.close()
        if self.ops is not None:
            self.ops.close_in_child()
        for other in self.slots:
            other.drop_channel()
            if other is not slot:
                other.drop_rings()
                for sock in other.listen_socks:
                    sock.close()
        if self.reload is not None and self.reload.current is not None:
            self.reload.current.channel.close()
            self.reload.current.close_link()

    # -- wsfleet reload (the steps: wsfleet.supervisor.reload) --------------------------------

    def start_reload(self, report: Callable[[dict[str, Any]], None]) -> None:
        """Replace every shard process in turn (``wsfleet reload``); ``report`` gets the lines."""
        assert self.config is not None

        def refuse(why: str) -> None:
            log.error("reload refused: %s", why)
            report({"reloaded": True, "ok": False, "errors": [why], "replaced": 0})

        if self.reload is not None and not self.reload.done:
            refuse("a reload is already under way")
        elif self.stopping:
            refuse("the server is stopping")
        elif self.config.tls is not None:
            refuse(
                "connections over TLS cannot move to another process (their encryption "
                "state lives inside it); restart the server instead"
            )
        else:
            log.info("reload: replacing %d shard process(es), one at a time", len(self.slots))
            self.reload = Reload(self, [slot.index for slot in self.slots], report)

    def running_pid(self, index: int) -> int:
        slot = self.slots[index]
        return slot.pid if slot.rings is not None and slot.channel is not None else 0

    def spawn_successor(self, index: int) -> tuple[int, socket.socket, socket.socket]:
        """Start a fresh interpreter for shard ``index`` and send it the shard (`ShardBoot`)."""
        assert self.config is not None and self.slots[index].rings is not None
        slot = self.slots[index]
        link, successor_link = control.socketpair()
        channel, successor_channel = control.socketpair()
        blocked = {signal.SIGTERM, STOP_SIGNAL}  # as in spawn(): the shard unblocks them
        signal.pthread_sigmask(signal.SIG_BLOCK, blocked)
        pid = os.fork()
        if pid == 0:
            try:
                # Only the boot socket crosses exec(); the rest comes over it.
                os.dup2(successor_link.fileno(), 3)
                os.closerange(4, os.sysconf("SC_OPEN_MAX"))
                os.execv(
                    sys.executable,
                    [sys.executable, "-m", "wsfleet.shards", "--boot-fd", "3"],
                )
            finally:
                os._exit(127)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, blocked)
        successor_link.close()
        events, commands = slot.rings
        fds = [successor_channel.fileno(), self.state.fd, *events.fds, *commands.fds]
        if self.ops is not None:
            fds.append(self.ops.stats.fd)
        fds += [sock.fileno() for sock in slot.listen_socks]
        boot = control.ShardBoot(
            config=self.config.for_shard(index, len(self.slots)),
            supervisor_pid=os.getpid(),
            listen_count=len(slot.listen_socks),
            stats=self.ops is not None,
        )
        try:
            control.send(link, boot, fds)
        except OSError:
            link.close()
            channel.close()
            raise
        finally:
            successor_channel.close()
        if self.ops is not None:
            self.ops.shard_started(pid)
        log.info("shard %d: successor started (pid %d)", index, pid)
        return pid, link, channel

    def succeed(self, index: int, pid: int, channel: socket.socket, link: socket.socket) -> None:
        slot = self.slots[index]
        old = slot.channel
        slot.channel = channel
        slot.pid = pid
        slot.started = time.time()
        assert old is not None
        try:
            control.send(old, control.HandOff(), [link.fileno()])
        finally:
            old.close()

    def took_over(self, index: int, pid: int) -> None:
        self._notify(control.ShardMoved(shard=index, pid=pid))

    def reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            code = os.waitstatus_to_exitcode(status)
            if self.reload is not None and self.reload.on_reaped(pid, code):
                continue  # a successor that never ran the shard, or an old one retired
            slot = next((s for s in self.slots if s.pid == pid), None)
            if slot is None:
                continue
            slot.pid = 0
            slot.drop_channel()
            if self.reload is not None:
                self.reload.shard_died(slot.index, pid)
            if slot.hung:
                log.warning("shard %d: the hung shard is dead; its peers are gone", slot.index)
            # Its connections died with it: free their max_peers slots and their addresses'
            # counts before anyone (the front, a new connection to another shard) hears of
            # the death.
            self.state.forget(slot.index)
            if self.ops is not None:
                self.ops.shard_died(slot.index)
            self._notify(control.ShardDown(shard=slot.index))
            if self.stopping or has_ended(self.front_lifeline):
                continue  # the stop (ours, or the loop's once it sees the lifeline) is under way
            self._schedule_restart(slot, code)

    def _schedule_restart(self, slot: ShardSlot, code: int) -> None:
        now = time.monotonic()
        slot.deaths.append(now)
        while slot.deaths and now - slot.deaths[0] > CRASH_WINDOW_SECONDS:
            slot.deaths.popleft()
        # A shard exits with 0 only once told to stop (STOP_SIGNAL): one that was told so
        # by someone else than us is not brought back behind the sender's back.
        if code in (0, EXIT_BOOT_FAILED) or len(slot.deaths) > CRASH_LIMIT:
            if code == EXIT_BOOT_FAILED:
                reason = "it cannot boot"
            elif code == 0:
                reason = "it was stopped from outside the server (exit status 0)"
            else:
                reason = f"it died {len(slot.deaths)} times in {CRASH_WINDOW_SECONDS:.0f} s"
            log.error("shard %d given up: %s", slot.index, reason)
            slot.failed = True
            slot.reason = reason
            for sock in slot.listen_socks:
                sock.close()  # the kernel stops sending it connections
            self._notify(control.ShardFailed(shard=slot.index, reason=reason))
            return
        # The first death restarts at once; a shard that keeps dying waits longer each time.
        backoff = 0.0 if len(slot.deaths) == 1 else 0.1 * 2 ** (len(slot.deaths) - 2)
        slot.restart_at = now + min(backoff, MAX_BACKOFF_SECONDS)
        log.warning("shard %d exited (%d); restarting in %.1f s", slot.index, code, backoff)

    def _restart_due(self) -> None:
        now = time.monotonic()
        for slot in self.slots:
            if slot.restart_at is not None and slot.restart_at <= now and not slot.failed:
                self.spawn(slot)

    def stop(self, grace: float) -> None:
        """Tell every shard to stop (they close their peers: 1001); SIGKILL what outlives ``grace``.

        `STOP_SIGNAL`, not SIGTERM, which shards ignore (see the module docstring).
        """
        self.stopping = True
        if self.reload is not None and not self.reload.done:
            self.reload.abort("the server is stopping")
        for slot in self.slots:
            if slot.pid:
                os.kill(slot.pid, STOP_SIGNAL)
        deadline = time.monotonic() + grace
        while any(slot.pid for slot in self.slots) and time.monotonic() < deadline:
            time.sleep(0.01)
            self.reap()
        clean = True
        for slot in self.slots:
            if slot.pid:
                clean = False
                os.kill(slot.pid, signal.SIGKILL)
        while any(slot.pid for slot in self.slots):
            time.sleep(0.005)
            self.reap()
        if self.ops is not None:
            self.ops.stopped(clean)  # whoever ran `wsfleet stop` hears it now

    def _notify(self, message: control.Message) -> None:
        try:
            control.send(self.control, message)
        except OSError:
            pass  # the front is gone; its lifeline ends the loop


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m wsfleet.supervisor")
    parser.add_argument("--control-fd", type=int, required=True)
    parser.add_argument("--lifeline-fd", type=int, required=True)
    parser.add_argument(
        "--listen-fds",
        action="append",
        required=True,
        help="one per shard: its listening sockets, comma-separated (one per address)",
    )
    parser.add_argument("--stats-fd", type=int, help="the shared counters (wsfleet.ipc.stats)")
    parser.add_argument("--ops-socket-fd", type=int, help="the listening control socket")
    parser.add_argument("--ops-socket-path", help="its path (unlinked at exit)")
    parser.add_argument("--metrics-fd", type=int, help="the listening /metrics socket")
    args = parser.parse_args(argv)
    # Until the front's configuration says how (`Arbiter.run`).
    apply_logging(LogConfig(), "supervisor")
    control_sock = socket.socket(fileno=args.control_fd)
    listen_socks = [
        [socket.socket(fileno=int(fd)) for fd in per_shard.split(",")]
        for per_shard in args.listen_fds
    ]
    ops: dict[str, Any] | None = None
    if args.stats_fd is not None:
        ops = {"stats": Stats(args.stats_fd, len(listen_socks))}
        if args.ops_socket_fd is not None:
            ops["control"] = (socket.socket(fileno=args.ops_socket_fd), args.ops_socket_path)
        if args.metrics_fd is not None:
            ops["metrics"] = socket.socket(fileno=args.metrics_fd)
    return Arbiter(control_sock, args.lifeline_fd, listen_socks, ops).run()
