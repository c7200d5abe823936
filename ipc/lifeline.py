"""Learning that another process has exited, whatever killed it.

A lifeline is a pipe. The *watched* process holds the write end and never
writes to it; the *watcher* holds the read end. When every copy of the write
end is closed - which the kernel does for a process that exits, even by
SIGKILL - the read end reports end-of-file (``POLLHUP``), so the watcher can
wait on it in ``poll``/``select`` or an event loop's ``add_reader``.

The write end must live only in the watched process: a fork of the watcher
that inherits a copy keeps the line "alive" after the watched process died.
Both ends are created close-on-exec; hand the write end to a freshly started
process with ``subprocess.Popen(..., pass_fds=[hold_fd])`` and close the
creator's copy right after the start.
"""

from __future__ import annotations

import os
import select


class Lifeline:
    """The two ends of a new lifeline: ``watch_fd`` (keep) and ``hold_fd`` (hand over)."""

    __slots__ = ("watch_fd", "hold_fd")

    def __init__(self) -> None:
        self.watch_fd, self.hold_fd = os.pipe()

    def release_hold(self) -> None:
        """Close the creator's copy of the write end (after handing it to the watched process)."""
        if self.hold_fd >= 0:
            os.close(self.hold_fd)
            self.hold_fd = -1

    def close(self) -> None:
        self.release_hold()
        if self.watch_fd >= 0:
            os.close(self.watch_fd)
            self.watch_fd = -1


def has_ended(watch_fd: int) -> bool:
    """True once every holder of the line's write end has exited or closed it."""
    poller = select.poll()
    poller.register(watch_fd, select.POLLIN)
    # The holder never writes, so any event (POLLHUP, or POLLIN for EOF) means gone.
    return bool(poller.poll(0))
