"""A peer's received messages in the front, and the loop that files them (in C).

`Inbox` (``_inbox.c``): the FIFO of one peer's messages not yet read, as
``(payload, was_text)`` pairs, with the byte count and the two limits
(``max_packets``, ``max_bytes``) past which the reader asks the shard to
stop reading that socket (``paused``).  ``push`` / ``pop`` / ``take`` (all
at once) / ``clear``, ``len()``, and ``ready`` (the peer is listed in this
poll's ready peers already, for per-peer delivery).

`deliver` is the per-record loop of the front's ``poll()`` for messages:

    index, failed, exc = deliver(records, start, channels, EV_TEXT, EV_BINARY,
                                 handlers, ready, pause)

From ``records[start]`` on, while the records are messages, it appends each
payload to ``channels[peer].inbox`` (a peer not in ``channels`` has left:
its message is skipped), calls ``pause(peer)`` when that peer's inbox has
just reached a limit (at once, before the handlers: a read of theirs may
resume it), and then either calls every handler of ``handlers`` with
the peer id (per message, Godot's ``data_received``), or, with ``handlers``
None, appends the peer once to ``ready`` (per peer: the caller signals each
ready peer once).  It returns at the first record that is not a message
(``index`` < ``len(records)``, ``failed`` -1), at the end (``index`` ==
``len(records)``), or when handler number ``failed`` raised an ``Exception``
on record ``index`` (``exc``, already cleared): the caller logs it, calls the
remaining handlers for that record, and goes on from ``index + 1``.  Other
exceptions (KeyboardInterrupt, SystemExit) propagate.

Two helpers for a batch of outbound messages: ``bytes_total(payloads)``
(their summed length, -1 unless a list of exactly bytes) and
``append_commands(backlog, kind, peer, payloads)`` (one command record
``(kind, peer, 0, payload)`` per payload, appended to the list ``backlog``).

What a Python loop cost per message (a dict lookup, a tuple, the byte count,
the limit checks, the handler loop: ≈ 0.45 µs here) is ≈ 0.05 µs in C; see
``loadtest/dispatch_bench.py``.
"""

from ._inbox import Inbox, append_commands, bytes_total, deliver

__all__ = ["Inbox", "append_commands", "bytes_total", "deliver"]
