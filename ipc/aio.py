"""Reading a ring from an asyncio (or uvloop) event loop.

The consumer drains the ring whenever its doorbell rings.  While drains
find records it keeps draining once per loop iteration (``call_soon``, so
the loop's I/O callbacks run in between) without arming the doorbell: a
busy producer then publishes without an ``eventfd`` write, and this side
reads no eventfd either.  Only a drain that finds the ring empty announces
that it sleeps (`Consumer.arm`); if records slipped in meanwhile, the next
drain is scheduled at once.  One drain takes at most ``max_batch`` records,
so a busy ring (a join storm, a flood of commands) cannot starve the loop's
other callbacks.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from .ring import Consumer, Record


class RingReader:
    """Deliver every record of ``consumer`` to ``on_records`` from inside ``loop``.

    ``on_gone`` is called once, after the last record, when the producer's
    lifeline (``lifeline``, a watch fd) ends.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        consumer: Consumer,
        on_records: Callable[[list[Record]], object],
        *,
        lifeline: int | None = None,
        on_gone: Callable[[], object] | None = None,
        max_batch: int = 4096,
    ) -> None:
        self._loop = loop
        self._consumer = consumer
        self._on_records = on_records
        self._lifeline = lifeline
        self._on_gone = on_gone
        self._max_batch = max_batch
        self._running = False
        self._drain_scheduled = False

    def start(self) -> None:
        self._running = True
        self._loop.add_reader(self._consumer.fileno(), self._on_bell)
        if self._lifeline is not None:
            self._loop.add_reader(self._lifeline, self._on_lifeline_end)
        self._schedule_drain()

    def stop(self) -> None:
        if not self._running:
            return
        self._running = False
        self._loop.remove_reader(self._consumer.fileno())
        if self._lifeline is not None:
            self._loop.remove_reader(self._lifeline)

    def _schedule_drain(self) -> None:
        if not self._drain_scheduled:
            self._drain_scheduled = True
            self._loop.call_soon(self._drain)

    def _on_bell(self) -> None:
        self._consumer.disarm()
        self._schedule_drain()

    def _drain(self) -> None:
        self._drain_scheduled = False
        if not self._running:
            return
        records = self._consumer.pop_all(self._max_batch)
        if records:
            self._on_records(records)
            if self._running:
                # More may follow within this loop iteration's I/O: look again next
                # iteration rather than ask the producer for a doorbell.
                self._schedule_drain()
        elif self._consumer.arm():
            self._schedule_drain()

    def _on_lifeline_end(self) -> None:
        # Whatever the producer published before it died is still delivered.
        while self._running:
            records = self._consumer.pop_all()
            if not records:
                break
            self._on_records(records)
        self.stop()
        if self._on_gone is not None:
            self._on_gone()
