"""The NATS link of a cluster node: nats-py's asyncio client in a thread of the front.

Owns everything that talks to NATS, and nothing of the cluster's meaning:

* the connection (nats-py reconnects by itself once connected; a first
  connect that fails is retried here every `RETRY_SECONDS`, and reported
  once per failure streak);
* the subscriptions: the node's inbox (`wsfleet.cluster_wire.inbox_subject`)
  and the heartbeat subject.  Every message lands in the front's queue
  (``notify``) with its arrival time; the front handles them in ``poll()``;
* publishing: `publish` takes the messages of one ``poll()`` tick from the
  front's thread and one sender task puts them on the wire in order;
* the id slot lease in JetStream key-value (bucket
  `wsfleet.cluster_wire.SLOTS_BUCKET`, keys ``slot.N``, TTL `LEASE_TTL`):
  ``kv.create`` takes a free slot, ``kv.update`` with the last revision
  refreshes it every `HEARTBEAT_SECONDS`; a slot whose owner stopped
  refreshing (a crash) stays taken for the TTL, so its ids are not reused
  while other nodes may still report its peers;
* the heartbeat, every `HEARTBEAT_SECONDS` while the lease is held, and the
  ``BYE`` plus the lease's release at `stop`.

What it reports to the front (tuples in ``notify``): ``("msg", t, data)``,
``("up",)``, ``("down",)``, ``("unreachable", text)``, ``("lease", slot)``,
``("conflict", slot, holder)``, ``("lease_error", text)`` (no lease yet: JetStream
off or unreachable), ``("tick",)`` once a second.

Imported only by `wsfleet.cluster` when a server has ``cluster=``: it is the
one module of wsfleet that imports nats.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import threading
import time
from collections.abc import Callable
from typing import Any

import nats
from nats.js import errors as js_errors

from wsfleet.ipc import messages as m

from . import cluster_wire as w

log = logging.getLogger("wsfleet.cluster")

#: Heartbeat and lease refresh period.
HEARTBEAT_SECONDS = 1.0
#: A slot lease not refreshed for this long expires (JetStream deletes the key).
LEASE_TTL = 10.0
#: Between two tries of a first connection that failed.
RETRY_SECONDS = 1.0
CONNECT_TIMEOUT = 2.0


def slot_key(slot: int) -> str:
    return f"slot.{slot}"


class NatsLink:
    """nats-py in a daemon thread with its own event loop (see the module docstring)."""

    def __init__(
        self,
        url: str,
        name: str,
        incarnation: int,
        notify: Callable[[tuple[Any, ...]], None],
        heartbeat_body: Callable[[], bytes],
        first_slot: int,
        tls: ssl.SSLContext | None = None,
        credentials: str | None = None,
    ) -> None:
        self.url = url
        self._tls = tls
        self._credentials = credentials
        self.name = name
        self.incarnation = incarnation
        self._notify = notify
        self._heartbeat_body = heartbeat_body
        self._first_slot = first_slot
        self._value = f"{name} {incarnation}".encode()
        #: Read by the front's thread (plain attributes, written here only).
        self.connected = False
        self.max_payload = 1024 * 1024
        self.lease_held = False
        self.conflict = False
        self.publish_failed = 0
        #: Bytes handed to `publish` (the front's thread only) and put on the wire (this
        #: thread only): their difference is what waits here (`backlog`).
        self.enqueued_bytes = 0
        self.sent_bytes = 0
        #: The slot this node uses for good: the first it leased, or the provisional one the
        #: front chose when NATS could not be reached in time (`fix_slot`).
        self._fixed: int | None = None
        self._lock = threading.Lock()
        self.lease_done = threading.Event()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name="wsfleet-nats", daemon=True)
        self._stopping: asyncio.Event | None = None
        self._outq: asyncio.Queue[list[tuple[str, bytes]]] | None = None
        self._nc: Any = None
        self._kv: Any = None
        self._revision = 0
        self._holder = ""
        self._reported = False

    # -- the front's side ---------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def fix_slot(self, slot: int) -> int:
        """Use ``slot`` unless one is leased already; the slot used from now on."""
        with self._lock:
            if self._fixed is None:
                self._fixed = slot
            return self._fixed

    @property
    def backlog(self) -> int:
        """Bytes given to `publish` that are not on the wire yet."""
        return self.enqueued_bytes - self.sent_bytes

    def publish(self, items: list[tuple[str, bytes]]) -> None:
        """Put ``(subject, data)`` messages on the wire, in order (from the front's thread)."""
        self.enqueued_bytes += sum(len(data) for _subject, data in items)
        try:
            self._loop.call_soon_threadsafe(self._enqueue, items)
        except RuntimeError:  # the loop is closed: stopping
            pass

    def stop(self, timeout: float = 3.0) -> None:
        """Say BYE, release the lease, close the connection; bounded by ``timeout``."""
        if not self._thread.is_alive():
            return
        try:
            self._loop.call_soon_threadsafe(self._request_stop)
        except RuntimeError:
            return
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.warning("cluster: the NATS thread did not stop within %.1f s", timeout)

    # -- the thread ---------------------------------------------------------------------------

    def _enqueue(self, items: list[tuple[str, bytes]]) -> None:
        if self._outq is not None:
            self._outq.put_nowait(items)

    def _request_stop(self) -> None:
        if self._stopping is not None:
            self._stopping.set()

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self._main())
        except Exception:
            log.exception("cluster: the NATS thread failed")
        finally:
            self.connected = False
            self._loop.close()

    async def _main(self) -> None:
        self._stopping = asyncio.Event()
        self._outq = asyncio.Queue()
        if not await self._connect():
            return
        sender = asyncio.ensure_future(self._sender())
        try:
            while not self._stopping.is_set():
                started = time.monotonic()
                await self._beat()
                self._notify(("tick",))
                rest = HEARTBEAT_SECONDS - (time.monotonic() - started)
                try:
                    await asyncio.wait_for(self._stopping.wait(), max(0.05, rest))
                except TimeoutError:
                    pass
        finally:
            await self._goodbye()
            sender.cancel()

    async def _connect(self) -> bool:
        """The first connection, tried until it works or `stop`; False when stopped.

        With ``max_reconnect_attempts=-1`` nats-py itself keeps trying a first
        connection that fails (calling `_error` each time: the first failure is
        reported to the front), and reconnects forever once connected.
        """
        stopping = self._stopping
        assert stopping is not None
        while not stopping.is_set():
            extra: dict[str, Any] = {} if self._tls is None else {"tls": self._tls}
            if self._credentials is not None:
                extra["user_credentials"] = self._credentials
            connect = asyncio.ensure_future(
                nats.connect(
                    **extra,
                    servers=self.url,
                    name=self.name,
                    no_echo=True,
                    allow_reconnect=True,
                    max_reconnect_attempts=-1,
                    reconnect_time_wait=RETRY_SECONDS / 2,
                    connect_timeout=CONNECT_TIMEOUT,
                    ping_interval=5,
                    max_outstanding_pings=2,
                    disconnected_cb=self._disconnected,
                    reconnected_cb=self._reconnected,
                    error_cb=self._error,
                )
            )
            stop = asyncio.ensure_future(stopping.wait())
            await asyncio.wait({connect, stop}, return_when=asyncio.FIRST_COMPLETED)
            stop.cancel()
            if not connect.done():
                connect.cancel()
                return False
            try:
                self._nc = connect.result()
                break
            except Exception as exc:  # e.g. refused credentials
                await self._error(exc)
                try:
                    await asyncio.wait_for(stopping.wait(), RETRY_SECONDS)
                except TimeoutError:
                    pass
        else:
            return False
        nc = self._nc
        self.max_payload = int(nc.max_payload or self.max_payload)
        await nc.subscribe(w.inbox_subject(self.name), cb=self._on_message)
        await nc.subscribe(w.HEARTBEAT_SUBJECT, cb=self._on_message)
        self.connected = True
        self._notify(("up",))
        return True

    async def _on_message(self, msg: Any) -> None:
        self._notify(("msg", time.monotonic(), msg.data))

    async def _disconnected(self) -> None:
        if self.connected:
            self.connected = False
            self._notify(("down",))

    async def _reconnected(self) -> None:
        self.max_payload = int(self._nc.max_payload or self.max_payload)
        self.connected = True
        self._notify(("up",))

    async def _error(self, exc: Exception) -> None:
        if self._nc is None and not self._reported:  # never connected yet
            self._reported = True
            self._notify(("unreachable", f"{type(exc).__name__}: {exc}"))
        log.debug("cluster: NATS: %s: %s", type(exc).__name__, exc)

    async def _sender(self) -> None:
        assert self._outq is not None
        while True:
            await self._publish(await self._outq.get())

    async def _publish(self, items: list[tuple[str, bytes]]) -> None:
        for subject, data in items:
            try:
                await self._nc.publish(subject, data)
            except Exception as exc:
                self.publish_failed += 1
                log.debug("cluster: publish to %s failed: %s", subject, exc)
            self.sent_bytes += len(data)

    # -- the lease and the heartbeat -------------------------------------------------------

    async def _beat(self) -> None:
        """The heartbeat first (a slow key-value answer must not delay it past the others'
        dead bound), then the lease: refreshed, or taken."""
        nc = self._nc
        if nc is None or not nc.is_connected or self.conflict:
            return
        held = self.lease_held
        if held:
            await self._heartbeat(nc)
        try:
            if self._kv is None:
                js = nc.jetstream(timeout=2.0)
                try:
                    self._kv = await js.create_key_value(
                        bucket=w.SLOTS_BUCKET, ttl=LEASE_TTL, history=1
                    )
                except js_errors.BadRequestError:  # exists with another configuration
                    self._kv = await js.key_value(w.SLOTS_BUCKET)
            if self.lease_held:
                await self._refresh()
            else:
                await self._lease()
        except Exception as exc:  # JetStream not ready, a timeout: the lease lasts its TTL
            log.debug("cluster: lease: %s: %s", type(exc).__name__, exc)
            if not self.lease_held:  # the front logs it (rate-limited): no lease, no cluster
                self._notify(("lease_error", f"{type(exc).__name__}: {exc}"))
        if not held and self.lease_held:  # just leased: the others hear of it now
            await self._heartbeat(nc)

    async def _heartbeat(self, nc: Any) -> None:
        if not nc.is_connected:
            return
        slot = self._fixed or 0
        header = w.encode_header(w.HEARTBEAT, slot, self.incarnation, self.name.encode())
        try:
            await nc.publish(w.HEARTBEAT_SUBJECT, header + self._heartbeat_body())
        except Exception as exc:
            log.debug("cluster: heartbeat: %s", exc)

    async def _lease(self) -> None:
        """Take a slot: the fixed one if any, else the first free from `_first_slot` on."""
        with self._lock:
            fixed = self._fixed
        candidates = (
            [fixed]
            if fixed is not None
            else [(self._first_slot + i) % m.CLUSTER_SLOTS for i in range(m.CLUSTER_SLOTS)]
        )
        for slot in candidates:
            revision = await self._take(slot)
            if revision is None:
                continue
            with self._lock:
                if self._fixed is None:
                    self._fixed = slot
                fixed = self._fixed
            if fixed != slot:  # the front chose a provisional slot meanwhile: give this back
                await self._kv.delete(slot_key(slot))
                revision = await self._take(fixed)
                if revision is None:
                    self._conflict(fixed)
                    return
            self._revision = revision
            self.lease_held = True
            self.lease_done.set()
            self._notify(("lease", fixed))
            return
        if fixed is not None:
            self._conflict(fixed)
        else:
            log.error("cluster: every one of the %d id slots is leased", m.CLUSTER_SLOTS)

    async def _take(self, slot: int) -> int | None:
        """The revision of our lease on ``slot``, or None when another node holds it."""
        key = slot_key(slot)
        try:
            return await self._kv.create(key, self._value)
        except js_errors.KeyWrongLastSequenceError:
            pass
        try:
            entry = await self._kv.get(key)
        except js_errors.KeyNotFoundError:  # expired between the two: try once more
            try:
                return await self._kv.create(key, self._value)
            except js_errors.KeyWrongLastSequenceError:
                return None
        if entry.value == self._value:  # ours (a refresh whose answer was lost)
            return entry.revision
        self._holder = (entry.value or b"").decode(errors="replace").split(" ")[0]
        return None

    async def _refresh(self) -> None:
        slot = self._fixed
        assert slot is not None
        try:
            self._revision = await self._kv.update(slot_key(slot), self._value, last=self._revision)
        except js_errors.KeyWrongLastSequenceError:
            # Expired (NATS was away longer than the TTL) or taken meanwhile: take it again.
            revision = await self._take(slot)
            if revision is None:
                self._conflict(slot)
            else:
                self._revision = revision

    def _conflict(self, slot: int) -> None:
        holder = self._holder or "another node"
        self.lease_held = False
        self.conflict = True
        self.lease_done.set()
        self._notify(("conflict", slot, holder))

    async def _goodbye(self) -> None:
        nc = self._nc
        if nc is None:
            return
        try:
            if self._outq is not None:  # what the last poll() sent goes before the goodbye
                while not self._outq.empty():
                    await self._publish(self._outq.get_nowait())
            if self.lease_held and nc.is_connected:
                slot = self._fixed or 0
                header = w.encode_header(w.BYE, slot, self.incarnation, self.name.encode())
                await nc.publish(w.HEARTBEAT_SUBJECT, header)
                await nc.flush(timeout=1)
                if self._kv is not None:
                    await asyncio.wait_for(self._kv.delete(slot_key(slot)), 1.0)
        except Exception as exc:
            log.debug("cluster: goodbye: %s", exc)
        finally:
            self.lease_held = False
            try:
                await asyncio.wait_for(nc.close(), 1.0)
            except Exception:
                pass
