"""A shard started as a fresh interpreter by ``wsfleet reload``: boot, wait, take over.

``python -m wsfleet.shards --boot-fd N`` is run by the supervisor (fork and
exec: a new interpreter, so an upgraded wsfleet takes effect) with one
inherited descriptor, a socket on which it receives, in order:

1. from the supervisor, `ShardBoot`: its configuration and every descriptor of
   the shard it replaces (channel, shared state, rings, counters, listening
   sockets); it then says `SuccessorReady` on its channel;
2. from the old shard, its connections (`wsfleet.ipc.handoff`), once the
   supervisor has told it to hand off.

Then it runs the shard (`worker.run` with the connections) and tells the
supervisor `TookOver`.  Nothing of the shard is touched before the handoff has
arrived whole, so a successor that fails (it cannot boot, the old shard dies
midway) leaves the old shard's state as it was; it exits with
`EXIT_HANDOFF_FAILED` and the supervisor deals with the shard.

Imports `wsfleet.ipc` and its siblings.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys

from wsfleet.ipc import RingFds, ShardState, SharedRing, control, handoff
from wsfleet.ipc.logconfig import apply as apply_logging
from wsfleet.ipc.stats import Stats

from . import worker

log = logging.getLogger("wsfleet.shard")

#: The old shard's handoff did not arrive whole: its connections are lost.
EXIT_HANDOFF_FAILED = 5
_RING_FDS = 3


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m wsfleet.shards")
    parser.add_argument("--boot-fd", type=int, required=True, help="set by the supervisor")
    args = parser.parse_args(argv)
    link = socket.socket(fileno=args.boot_fd)
    received = control.receive(link)
    if received is None or not isinstance(received[0], control.ShardBoot):
        raise SystemExit("wsfleet shard: no boot message from the supervisor")
    boot, fds = received
    if boot.ipc_version != control.IPC_VERSION:
        raise SystemExit(
            f"wsfleet shard: this wsfleet speaks IPC version {control.IPC_VERSION}, the "
            f"running server {boot.ipc_version}: restart the server to upgrade"
        )
    config = boot.config
    apply_logging(config.log, f"shard {config.index}")
    channel = socket.socket(fileno=fds[0])
    state = ShardState.attach(fds[1], config.shards)
    events = SharedRing.attach(RingFds(*fds[2 : 2 + _RING_FDS]))
    commands = SharedRing.attach(RingFds(*fds[2 + _RING_FDS : 2 + 2 * _RING_FDS]))
    rest = fds[2 + 2 * _RING_FDS :]
    stats = None
    if boot.stats:
        stats = Stats(rest[0], config.shards).writer(config.index)
        rest = rest[1:]
    listen_socks = [socket.socket(fileno=fd) for fd in rest]
    control.send(channel, control.SuccessorReady())
    try:
        takeover = handoff.receive(link)
    except (handoff.HandoffError, OSError) as exc:
        log.error("shard %d: the handoff failed: %s", config.index, exc)
        return EXIT_HANDOFF_FAILED
    link.close()
    return worker.run(
        config,
        listen_socks,
        events,
        commands,
        state,
        boot.supervisor_pid,
        stats,
        channel=channel,
        takeover=takeover,
    )


def run() -> None:
    """The process's entry: the status of `main`, without interpreter teardown."""
    try:
        status = main()
    except SystemExit as exc:  # a message: it cannot boot (the supervisor gives up the reload)
        print(exc.code, file=sys.stderr)
        status = worker.EXIT_BOOT_FAILED
    sys.stderr.flush()
    os._exit(status)
