"""Accepting on the supervisor's non-blocking operator sockets (control, metrics).

Both are served from the master loop, one readable wake-up at a time: take
every connection waiting, never block, and never let an accept error stop
the loop.  Imports nothing of wsfleet.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Iterator

log = logging.getLogger("wsfleet.supervisor")


def waiting_connections(listener: socket.socket, what: str) -> Iterator[socket.socket]:
    """Every connection ``listener`` has waiting now; an accept error is logged and ends it."""
    while True:
        try:
            conn, _addr = listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            log.error("%s: %s", what, exc)
            return
        yield conn
