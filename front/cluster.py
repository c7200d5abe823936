"""The node's side of a cluster (``WebSocketServer(cluster="nats://...")``).

Owns, inside the front process and its ``poll()``:

* the link to NATS (`.cluster_link`: nats-py in a daemon thread): what it
  receives waits in a queue that ``poll()`` drains (an eventfd in the
  fleet's epoll wakes a waiting ``poll``), and what this tick sends to
  other nodes leaves at the end of it: ONE NATS message per destination
  node per ``poll()`` (a batch of records, `.cluster_wire`), split only
  where a batch would pass NATS' ``max_payload``;
* the id slot: `start` waits up to ``connect_wait`` for a lease; when NATS
  cannot be reached in time the node serves its own peers with a
  *provisional* slot (the one its name hashes to, the first it would try
  anyway) and keeps trying: if that slot turns out to be leased by another
  node, this node logs an error and stays out of the cluster (its peer ids
  would collide) until it is restarted;
* the view of the other nodes (`RemoteNode`) and of their peers
  (`wsfleet.remote_peer.RemotePeer`): every node heartbeats each
  `HEARTBEAT_SECONDS`; one silent for `DEAD_AFTER` seconds is dead and its
  peers are reported gone (signals ``remote_peer_disconnected``, then
  ``cluster_node_left``).  Each node sends its peers' joins and leaves,
  numbered by a view sequence, to every other node's inbox; a node it has
  just met (or after a reconnect, a gap in the numbers, or a heartbeat
  whose sequence stays ahead) is asked for a snapshot, which comes back in
  the same ordered inbox stream: applied as a diff (stale peers reported
  gone, new ones connected), then increments from it on.
* sends to remote peers, their closes and broadcasts: records in the
  owner node's batch; what other nodes send for this node's peers is put
  on their sockets through the server (`ClusterDelivery`).

Imports `wsfleet.ipc.messages`, `.cluster_wire`, `.remote_peer`, `.errors`;
nats only inside `start`, through `.cluster_link`.
"""

from __future__ import annotations

import collections
import logging
import os
import re
import secrets
import socket
import ssl
import struct
import threading
import time
import urllib.parse
import zlib
from collections.abc import Callable, Iterable
from typing import Any, Protocol

import orjson

from wsfleet.ipc import messages as m

from . import cluster_wire as w
from .errors import Error
from .remote_peer import RemotePeer

log = logging.getLogger("wsfleet.cluster")

HEARTBEAT_SECONDS = 1.0
#: A node not heard from for this long is dead: its peers are reported gone.  With the
#: check every `CHECK_SECONDS`, a dead node's peers are reported within ~3.3 s of its
#: last heartbeat plus one ``poll()`` (the documented bound: 5 s).
DEAD_AFTER = 3.0
CHECK_SECONDS = 0.25
#: A snapshot asked for and not come after this long is asked for again.
RESYNC_AFTER = 2.0
#: A heartbeat's view sequence ahead of what was applied for this long: ask a snapshot.
BEHIND_GRACE = 2.0
#: How long `start` (inside ``listen``) waits for NATS and a slot lease.
DEFAULT_CONNECT_WAIT = 3.0
#: Bytes queued for NATS beyond which cross-node sends are refused (ERR_OUT_OF_MEMORY):
#: NATS slower than the application's sends must not grow the front without bound.
MAX_BACKLOG = 64 * 1024 * 1024
#: Most log lines a repeated problem writes: one per this many seconds.
LOG_EVERY = 10.0

_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")

__all__ = [
    "Cluster",
    "ClusterDelivery",
    "check_cluster_url",
    "check_node_name",
    "credentials_problem",
    "default_node_name",
]


def check_node_name(name: str) -> str:
    """``name`` if it can name a node (letters, digits, ``_``, ``-``; 1 to 64), else ValueError."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(
            f"node_name must be 1 to 64 letters, digits, '_' or '-' (it names a NATS subject): "
            f"{name!r}"
        )
    return name


#: The URL schemes nats-py connects with.
NATS_SCHEMES = ("nats", "tls", "ws", "wss")


def check_cluster_url(url: str) -> str:
    """``url`` if each of its comma-separated servers is ``nats|tls|ws|wss://[user:pass@]host
    [:port]``, else ValueError (credentials and TLS as nats-py takes them)."""
    if not isinstance(url, str) or not url.strip():
        raise ValueError(f"cluster must be a NATS URL such as nats://host:4222: {url!r}")
    for part in url.split(","):
        try:
            parsed = urllib.parse.urlsplit(part.strip())
            parsed.port  # noqa: B018  (ValueError for a bad port)
        except ValueError as exc:
            raise ValueError(f"cluster: {redact(part)!r} is not a NATS URL: {exc}") from None
        if parsed.scheme not in NATS_SCHEMES or not parsed.hostname:
            raise ValueError(
                f"cluster: {redact(part.strip())!r} is not a NATS URL "
                f"({'|'.join(NATS_SCHEMES)}://host:port)"
            )
    return url


def credentials_problem(path: str) -> str | None:
    """Why the NATS credentials file at ``path`` cannot be used, or None: readable, with a
    user JWT and an nkey seed in it, and ``nkeys`` (which nats-py signs with) installed."""
    try:
        with open(path, encoding="utf-8") as file:
            text = file.read()
    except (OSError, UnicodeDecodeError) as exc:
        return f"cannot read it: {exc}"
    if "BEGIN NATS USER JWT" not in text or "NKEY SEED" not in text:
        return "not a NATS credentials file (no user JWT and nkey seed in it)"
    try:
        import nkeys  # noqa: F401  (nats-py needs it for credentials files)
    except ImportError:
        return "credentials files need the nkeys package: pip install 'wsfleet[cluster]'"
    return None


def default_node_name() -> str:
    """``hostname-pid``, with what a NATS subject cannot hold replaced by ``_``."""
    host = re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname())[:50] or "node"
    return f"{host}-{os.getpid()}"


def redact(url: str) -> str:
    """The NATS URL(s) without user names, passwords or tokens (for logs and status)."""
    out = []
    for part in url.split(","):
        parsed = urllib.parse.urlsplit(part.strip())
        if parsed.username or parsed.password:
            host = parsed.hostname or ""
            if parsed.port:
                host = f"{host}:{parsed.port}"
            parsed = parsed._replace(netloc=f"***@{host}")
        out.append(urllib.parse.urlunsplit(parsed))
    return ",".join(out)


class ClusterDelivery(Protocol):
    """What the server does for the cluster (`wsfleet.server.WebSocketServer`)."""

    def deliver(self, peer_id: int, text: bool, payload: bytes) -> Error:
        """Send to a local peer: OK, ERR_DOES_NOT_EXIST (no such peer), else refused."""

    def close_local(self, peer_id: int, code: int, reason: bytes) -> Error: ...

    def broadcast_local(
        self, payload: bytes, text: bool, exclude: frozenset[int], group: bytes | None
    ) -> None: ...

    def local_peers(self) -> list[tuple[int, str, int, str]]: ...

    def remote_peer(self, peer_id: int, node: str, connected: bool) -> None:
        """A peer of another node came or went (signals; the relay's SYS_ADD / SYS_DEL)."""

    def mp_frame(self, sender: int, frame: bytes) -> None:
        """Multiplayer mode: another node relays a client frame to this node's peers."""

    def emit(self, signal: str, *args: Any) -> None: ...


class RemoteNode:
    """Another node as this one knows it."""

    __slots__ = (
        "name",
        "incarnation",
        "slot",
        "last_seen",
        "peers",
        "seq",
        "synced",
        "requested_at",
        "heartbeat_seq",
        "behind_since",
        "partial",
        "messages_in",
        "bytes_in",
        "messages_out",
        "bytes_out",
    )

    def __init__(self, name: str, incarnation: int, slot: int, now: float) -> None:
        self.name = name
        self.incarnation = incarnation
        self.slot = slot
        self.last_seen = now
        self.peers: dict[int, RemotePeer] = {}
        #: The last view sequence applied; `synced` once a snapshot came.
        self.seq = 0
        self.synced = False
        self.requested_at = 0.0
        self.heartbeat_seq = 0
        self.behind_since: float | None = None
        #: The parts of a snapshot that comes in several: (its sequence, peers so far).
        self.partial: tuple[int, list[tuple[int, str, int, str]]] | None = None
        self.messages_in = self.bytes_in = self.messages_out = self.bytes_out = 0


class _Every:
    """True at most once per `LOG_EVERY` seconds per key (rate-limited log lines)."""

    def __init__(self) -> None:
        self._last: dict[str, float] = {}

    def __call__(self, key: str) -> bool:
        now = time.monotonic()
        if now - self._last.get(key, -LOG_EVERY) >= LOG_EVERY:
            self._last[key] = now
            return True
        return False


class Cluster:
    """One node's membership of a cluster (see the module docstring)."""

    def __init__(
        self,
        url: str,
        node_name: str | None,
        shards: int,
        delivery: ClusterDelivery,
        connect_wait: float = DEFAULT_CONNECT_WAIT,
        tls: ssl.SSLContext | None = None,
        credentials: str | None = None,
    ) -> None:
        self.url = url
        #: The TLS context for NATS (None: nats-py's default for ``tls://``, the system's CAs).
        self.tls = tls
        #: A NATS credentials file (``.creds``), or None.
        self.credentials = credentials
        self.name = check_node_name(node_name) if node_name is not None else default_node_name()
        self._name_b = self.name.encode()
        self.incarnation = secrets.randbits(63) or 1
        self.shards = shards
        self._delivery = delivery
        self.connect_wait = connect_wait
        #: The id slot this node uses (`wsfleet.ipc.messages.slot_range`), from `start` on.
        self.slot = -1
        self.provisional = False
        #: Inside ``poll()`` (the fleet sets it): sends wait for its end.
        self.deferred = False
        self.nodes: dict[str, RemoteNode] = {}
        self._by_slot: dict[int, RemoteNode] = {}
        self.remote: dict[int, RemotePeer] = {}
        self._queue: collections.deque[tuple[Any, ...]] = collections.deque()
        self._fd = -1
        self._link: Any = None
        self._out: dict[str, list[bytes]] = {}
        self._seq = 0
        self._local_count = 0
        self._member = False
        self._conflict = False
        self._connected = False
        self._unreachable = threading.Event()
        self._next_check = 0.0
        self._next_status = 0.0
        #: Where the cluster section of ``wsfleet status`` goes once a second
        #: (`wsfleet.fleet.Fleet.publish_front`), set by the server.
        self.status_sink: Callable[[dict[str, Any]], None] | None = None
        self._every = _Every()
        self.counters: dict[str, int] = dict.fromkeys(
            (
                "messages_in",
                "bytes_in",
                "records_in",
                "messages_out",
                "bytes_out",
                "records_out",
                "refused_version",
                "bad_messages",
                "unknown_records",
                "sends_refused_down",
                "sends_refused_too_large",
                "sends_refused_backlog",
                "delivered",
                "dropped_unknown_peer",
                "dropped_full",
                "nodes_lost",
                "mp_unknown_sender",
            ),
            0,
        )

    # -- start and stop -----------------------------------------------------------------------

    def start(self) -> int:
        """Connect to NATS and lease an id slot (waiting up to ``connect_wait``); the slot.

        When NATS cannot be reached in time, a provisional slot (see the module
        docstring); the link keeps trying in its thread either way.
        """
        from .cluster_link import NatsLink  # the only import of nats, and only here

        self._fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        first = zlib.crc32(self._name_b) % m.CLUSTER_SLOTS
        self._link = link = NatsLink(
            self.url,
            self.name,
            self.incarnation,
            self._notify,
            self._heartbeat_body,
            first,
            tls=self.tls,
            credentials=self.credentials,
        )
        link.start()
        deadline = time.monotonic() + self.connect_wait
        while time.monotonic() < deadline and not self._unreachable.is_set():
            if link.lease_done.wait(0.05):
                break
        self.slot = link.fix_slot(first)
        if not link.lease_held:
            self.provisional = True
            log.warning(
                "cluster: no lease from NATS at %s yet: node %s serves its own peers with the "
                "provisional id slot %d and keeps trying; if another node holds that slot when "
                "NATS answers, this node stays out of the cluster",
                redact(self.url),
                self.name,
                self.slot,
            )
        ids = m.slot_range(self.slot)
        log.info(
            "cluster: node %s, id slot %d (ids %d..%d), NATS %s",
            self.name,
            self.slot,
            ids.start,
            ids.stop - 1,
            redact(self.url),
        )
        return self.slot

    def stop(self) -> None:
        """Tell the others (BYE), release the lease, close the link; forget the view."""
        if self._link is not None:
            self.flush()
            self._link.stop()
            self._link = None
        for peer in self.remote.values():
            peer.gone()
        self.remote.clear()
        self.nodes.clear()
        self._by_slot.clear()
        self._member = False
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    # -- the link's side (its thread) ----------------------------------------------------------

    def _notify(self, item: tuple[Any, ...]) -> None:
        if item[0] == "unreachable":
            self._unreachable.set()
        self._queue.append(item)
        fd = self._fd
        if fd >= 0:
            try:
                os.eventfd_write(fd, 1)
            except OSError:
                pass

    def _heartbeat_body(self) -> bytes:
        return orjson.dumps({"seq": self._seq, "peers": self._local_count, "shards": self.shards})

    # -- poll ---------------------------------------------------------------------------------

    def fileno(self) -> int:
        return self._fd

    @property
    def available(self) -> bool:
        """In the cluster now: connected to NATS and holding the slot lease."""
        return self._member and self._connected

    def drain(self) -> int:
        """Handle what came from NATS (inside ``poll``); how many items."""
        # Always read (reset) the eventfd: a ring that comes after its item was popped
        # would otherwise wake every later wait at once.
        try:
            os.eventfd_read(self._fd)
        except (BlockingIOError, OSError):
            pass
        queue = self._queue
        count = 0
        while queue:
            item = queue.popleft()
            count += 1
            try:
                self._handle(item)
            except Exception:
                log.exception("cluster: error handling %s", item[0])
        now = time.monotonic()
        if now >= self._next_check:
            self._next_check = now + CHECK_SECONDS
            self._check(now)
            if now >= self._next_status and self.status_sink is not None:
                self._next_status = now + 1.0
                self.status_sink({"cluster": self.status()})
        return count

    def _handle(self, item: tuple[Any, ...]) -> None:
        what = item[0]
        if what == "msg":
            self._message(item[1], item[2])
        elif what == "tick":
            pass
        elif what == "up":
            self._connected = True
            log.info("cluster: connected to NATS at %s", redact(self.url))
            self._resync_all()
        elif what == "down":
            self._connected = False
            log.warning(
                "cluster: lost NATS: this node serves its own peers; cross-node sends fail "
                "(ERR_CONNECTION_ERROR) until it returns"
            )
        elif what == "unreachable":
            log.error(
                "cluster: cannot reach NATS at %s (%s): serving this node's peers only, "
                "retrying every second",
                redact(self.url),
                item[1],
            )
        elif what == "lease_error":
            if self._every("lease_error"):
                log.error(
                    "cluster: cannot lease an id slot from NATS' key-value store (%s): is "
                    "JetStream on (nats-server -js)? This node stays out of the cluster until "
                    "it can",
                    item[1],
                )
        elif what == "lease":
            self._member = True
            if self.provisional:
                log.info("cluster: leased the provisional id slot %d: in the cluster now", item[1])
                self.provisional = False
            self._resync_all()
        elif what == "conflict":
            self._member = False
            self._conflict = True
            log.error(
                "cluster: id slot %d is leased by node %s: node %s stays out of the cluster "
                "(its peer ids would collide with that node's); restart it to lease a free slot",
                item[1],
                item[2],
                self.name,
            )
            for node in list(self.nodes.values()):
                self._node_down(node, "this node left the cluster (slot conflict)")

    def _resync_all(self) -> None:
        """Ask every known node for its peers again, and tell each ours (after a reconnect)."""
        if not self.available:
            return
        for node in self.nodes.values():
            self._request_snapshot(node, time.monotonic())
            self._queue_snapshot(node.name)

    def _message(self, arrived: float, data: bytes) -> None:
        counters = self.counters
        counters["messages_in"] += 1
        counters["bytes_in"] += len(data)
        try:
            sender, pos = w.decode_header(data)
        except w.VersionError as exc:
            counters["refused_version"] += 1
            if self._every("version"):
                log.error(
                    "cluster: refused a message of wire version %d (this node speaks %d: "
                    "upgrade the nodes to one wsfleet version); %d refused so far",
                    exc.version,
                    w.WIRE_VERSION,
                    counters["refused_version"],
                )
            return
        except w.WireError as exc:
            self._bad(f"unreadable message: {exc}")
            return
        if sender.name == self.name:
            if sender.incarnation != self.incarnation and self._every("dup"):
                log.error(
                    "cluster: another node is also named %s: give each its own name", self.name
                )
            return
        if not self._member:
            return  # not in the cluster (yet, or a slot conflict)
        if not 0 <= sender.slot < m.CLUSTER_SLOTS or sender.slot == self.slot:
            self._bad(f"node {sender.name} claims id slot {sender.slot}")
            return
        node = self._node(sender, arrived)
        if node is None:
            return
        node.messages_in += 1
        node.bytes_in += len(data)
        if sender.kind == w.HEARTBEAT:
            try:
                body = orjson.loads(data[pos:])
                node.heartbeat_seq = int(body["seq"])
            except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
                self._bad(f"bad heartbeat from {sender.name}")
        elif sender.kind == w.BYE:
            self._node_down(node, "stopped")
        elif sender.kind == w.BATCH:
            try:
                self._batch(node, data, pos)
            except (w.WireError, ValueError, struct.error) as exc:
                self._bad(f"bad batch from {sender.name}: {exc}")
        else:
            self._bad(f"unknown message kind {sender.kind} from {sender.name}")

    def _bad(self, what: str) -> None:
        self.counters["bad_messages"] += 1
        if self._every("bad"):
            log.error("cluster: %s (%d bad so far)", what, self.counters["bad_messages"])

    def _node(self, sender: w.Sender, arrived: float) -> RemoteNode | None:
        node = self.nodes.get(sender.name)
        if node is not None and node.incarnation != sender.incarnation:
            if sender.kind == w.BYE:
                return None  # the old one's farewell, late
            self._node_down(node, "restarted")
            node = None
        if node is None:
            if sender.kind == w.BYE:
                return None
            other = self._by_slot.get(sender.slot)
            if other is not None:
                self._bad(f"nodes {other.name} and {sender.name} both claim slot {sender.slot}")
                return None
            node = RemoteNode(sender.name, sender.incarnation, sender.slot, arrived)
            self.nodes[node.name] = node
            self._by_slot[node.slot] = node
            log.info("cluster: node %s joined (id slot %d)", node.name, node.slot)
            self._delivery.emit("cluster_node_joined", node.name)
            self._request_snapshot(node, arrived)
        if arrived > node.last_seen:
            node.last_seen = arrived
        return node

    def _batch(self, node: RemoteNode, data: bytes, pos: int) -> None:
        delivery = self._delivery
        counters = self.counters
        for kind, flags, peer_id, payload in w.iter_records(data, pos):
            counters["records_in"] += 1
            if kind == w.R_SEND:
                result = delivery.deliver(peer_id, bool(flags & w.FLAG_TEXT), payload)
                if result == Error.OK:
                    counters["delivered"] += 1
                elif result == Error.ERR_DOES_NOT_EXIST:
                    counters["dropped_unknown_peer"] += 1
                else:
                    counters["dropped_full"] += 1
            elif kind == w.R_JOIN:
                seq, ip, port, protocol = w.decode_join(payload)
                if self._in_order(node, seq):
                    self._add_remote(node, peer_id, ip, port, protocol)
            elif kind == w.R_LEAVE:
                if self._in_order(node, w.decode_seq(payload)):
                    self._remove_remote(node, peer_id)
            elif kind == w.R_CLOSE:
                code, reason = m.decode_close(payload)
                if delivery.close_local(peer_id, code, reason.encode()) == Error.ERR_DOES_NOT_EXIST:
                    counters["dropped_unknown_peer"] += 1
            elif kind == w.R_BROADCAST:
                excluded, message = m.decode_broadcast(payload)
                delivery.broadcast_local(bytes(message), bool(flags & w.FLAG_TEXT), excluded, None)
            elif kind == w.R_GROUP_BROADCAST:
                group, excluded, message = m.decode_group_broadcast(payload)
                delivery.broadcast_local(
                    bytes(message), bool(flags & w.FLAG_TEXT), excluded, bytes(group)
                )
            elif kind == w.R_MP_FRAME:
                # Only from a peer this node knows (so after its SYS_ADD here: the join and
                # the snapshot come in this same ordered stream), or from that node's server.
                if peer_id in node.peers or peer_id == m.SERVER_ID:
                    delivery.mp_frame(peer_id, payload)
                else:
                    counters["mp_unknown_sender"] += 1
            elif kind == w.R_SNAPSHOT_REQUEST:
                self._queue_snapshot(node.name)
            elif kind == w.R_SNAPSHOT:
                seq, peers = w.decode_snapshot(payload)
                if node.partial is not None and node.partial[0] != seq:
                    node.partial = None  # the rest of an older one was lost on the way
                if node.partial is None:
                    node.partial = (seq, [])
                node.partial[1].extend(peers)
                if not flags & w.FLAG_MORE:
                    self._apply_snapshot(node, seq, node.partial[1])
                    node.partial = None
            else:
                counters["unknown_records"] += 1

    # -- the view -------------------------------------------------------------------------------

    def _in_order(self, node: RemoteNode, seq: int) -> bool:
        """Whether an increment numbered ``seq`` applies now (a gap asks for a snapshot)."""
        if not node.synced or seq <= node.seq:
            return False  # a snapshot is on its way, or this one is in the one applied
        if seq == node.seq + 1:
            node.seq = seq
            return True
        log.info("cluster: node %s: view %d after %d: asking a snapshot", node.name, seq, node.seq)
        self._request_snapshot(node, time.monotonic())
        return False

    def _request_snapshot(self, node: RemoteNode, now: float) -> None:
        node.synced = False
        node.requested_at = now
        node.behind_since = None
        self._queue_record(node.name, w.encode_record(w.R_SNAPSHOT_REQUEST, 0, 0, b""))

    def _queue_snapshot(self, name: str) -> None:
        """Every local peer for node ``name``: records of at most half a NATS message each
        (a large snapshot in parts, ``FLAG_MORE`` on all but the last)."""
        peers = self._delivery.local_peers()
        budget = max(256, self._max_record() // 2)
        parts: list[list[tuple[int, str, int, str]]] = [[]]
        size = 0
        for entry in peers:
            cost = w.ENTRY_SIZE + len(entry[1]) + len(entry[3])
            if parts[-1] and size + cost > budget:
                parts.append([])
                size = 0
            parts[-1].append(entry)
            size += cost
        for index, part in enumerate(parts):
            flags = w.FLAG_MORE if index < len(parts) - 1 else 0
            body = w.encode_snapshot(self._seq, part)
            self._queue_record(name, w.encode_record(w.R_SNAPSHOT, flags, 0, body))

    def _apply_snapshot(
        self, node: RemoteNode, seq: int, peers: list[tuple[int, str, int, str]]
    ) -> None:
        fresh = {entry[0]: entry for entry in peers}
        for peer_id in sorted(set(node.peers) - set(fresh)):
            self._remove_remote(node, peer_id)
        for peer_id, ip, port, protocol in peers:
            if peer_id not in node.peers:
                self._add_remote(node, peer_id, ip, port, protocol)
        node.seq = seq
        node.synced = True
        node.behind_since = None

    def _add_remote(
        self, node: RemoteNode, peer_id: int, ip: str, port: int, protocol: str
    ) -> None:
        if m.slot_of(peer_id) != node.slot:
            self._bad(
                f"node {node.name} (slot {node.slot}) reported peer {peer_id} of another slot"
            )
            return
        if peer_id in node.peers:
            return
        peer = RemotePeer(self, node.name, peer_id, ip, port, protocol)
        node.peers[peer_id] = peer
        self.remote[peer_id] = peer
        self._delivery.remote_peer(peer_id, node.name, True)

    def _remove_remote(self, node: RemoteNode, peer_id: int) -> None:
        peer = node.peers.pop(peer_id, None)
        if peer is None:
            return
        self.remote.pop(peer_id, None)
        peer.gone()
        self._delivery.remote_peer(peer_id, node.name, False)

    def _node_down(self, node: RemoteNode, reason: str) -> None:
        if self.nodes.get(node.name) is not node:
            return
        del self.nodes[node.name]
        self._by_slot.pop(node.slot, None)
        self._out.pop(node.name, None)
        self.counters["nodes_lost"] += 1
        log.warning(
            "cluster: node %s left (%s): %d of its peers gone", node.name, reason, len(node.peers)
        )
        for peer_id in sorted(node.peers):
            self._remove_remote(node, peer_id)
        self._delivery.emit("cluster_node_left", node.name, reason)

    def _check(self, now: float) -> None:
        for node in list(self.nodes.values()):
            if now - node.last_seen > DEAD_AFTER:
                why = f"silent for {DEAD_AFTER:g} s"
                if not self._connected:
                    why += ": this node lost NATS"
                self._node_down(node, why)
            elif not node.synced:
                if now - node.requested_at > RESYNC_AFTER and self.available:
                    self._request_snapshot(node, now)
            elif node.heartbeat_seq > node.seq:
                if node.behind_since is None:
                    node.behind_since = now
                elif now - node.behind_since > BEHIND_GRACE:
                    log.info("cluster: node %s: view behind its heartbeat: resync", node.name)
                    self._request_snapshot(node, now)
            else:
                node.behind_since = None

    # -- this node's peers --------------------------------------------------------------------

    def local_joined(self, peer_id: int, ip: str, port: int, protocol: str) -> None:
        self._seq += 1
        self._local_count += 1
        if self.available:
            record = w.encode_record(
                w.R_JOIN, 0, peer_id, w.encode_join(self._seq, ip, port, protocol)
            )
            for name in self.nodes:
                self._queue_record(name, record)

    def local_left(self, peer_id: int, clean: bool) -> None:
        self._seq += 1
        self._local_count -= 1
        if self.available:
            record = w.encode_record(w.R_LEAVE, int(clean), peer_id, w.encode_seq(self._seq))
            for name in self.nodes:
                self._queue_record(name, record)

    # -- sending --------------------------------------------------------------------------------

    def _refuse_down(self, what: str) -> Error:
        self.counters["sends_refused_down"] += 1
        if self._every("down"):
            log.error(
                "cluster: %s refused: %s (ERR_CONNECTION_ERROR; %d refused so far)",
                what,
                "a slot conflict keeps this node out of the cluster"
                if self._conflict
                else "NATS is unreachable",
                self.counters["sends_refused_down"],
            )
        return Error.ERR_CONNECTION_ERROR

    def _refuse_backlog(self, what: str) -> Error:
        self.counters["sends_refused_backlog"] += 1
        if self._every("backlog"):
            log.error(
                "cluster: %s refused: %d bytes wait for NATS already (ERR_OUT_OF_MEMORY; %d "
                "refused so far)",
                what,
                self._link.backlog,
                self.counters["sends_refused_backlog"],
            )
        return Error.ERR_OUT_OF_MEMORY

    def room(self) -> int:
        if not self.available or self._link.backlog > MAX_BACKLOG:
            return 0
        return self._max_record()

    def _max_record(self) -> int:
        overhead = 16 + len(self._name_b) + w.RECORD_HEADER_SIZE + 64
        return max(0, int(self._link.max_payload) - overhead)

    def send(self, peer: RemotePeer, text: bool, payload: bytes) -> Error:
        """Queue a message for a remote peer (`RemotePeer.put_packet`)."""
        if not self.available:
            return self._refuse_down(f"a send to remote peer {peer.id}")
        node = self.nodes.get(peer.node)
        if node is None or node.peers.get(peer.id) is not peer:
            return Error.FAILED
        if self._link.backlog > MAX_BACKLOG:
            return self._refuse_backlog(f"a send to remote peer {peer.id}")
        if len(payload) > self._max_record():
            self.counters["sends_refused_too_large"] += 1
            if self._every("large"):
                log.error(
                    "cluster: a %d-byte packet for remote peer %d is more than a NATS message "
                    "carries (max_payload %d): refused (ERR_OUT_OF_MEMORY)",
                    len(payload),
                    peer.id,
                    self._link.max_payload,
                )
            return Error.ERR_OUT_OF_MEMORY
        flags = w.FLAG_TEXT if text else 0
        self._queue_record(node.name, w.encode_record(w.R_SEND, flags, peer.id, payload))
        return Error.OK

    def close_peer(self, peer: RemotePeer, code: int, reason: bytes) -> Error:
        if not self.available:
            return self._refuse_down(f"disconnect_peer of remote peer {peer.id}")
        if peer.node not in self.nodes:
            return Error.FAILED
        record = w.encode_record(w.R_CLOSE, 0, peer.id, m.encode_close(code, reason))
        self._queue_record(peer.node, record)
        return Error.OK

    def broadcast(
        self, payload: bytes, text: bool, exclude: Iterable[int], group: bytes | None
    ) -> Error:
        """One record to each other node (its excluded ids only): encoded once per node,
        then once per shard there.  ``group``: delivered by each node to its members."""
        exclude = list(exclude)
        if not self.nodes:
            return Error.OK
        if not self.available:
            return self._refuse_down("a broadcast to the other nodes")
        if self._link.backlog > MAX_BACKLOG:
            return self._refuse_backlog("a broadcast to the other nodes")
        if len(payload) > self._max_record() - 4 * (len(exclude) + 1) - len(group or b""):
            self.counters["sends_refused_too_large"] += 1
            return Error.ERR_OUT_OF_MEMORY
        by_slot: dict[int, list[int]] = {}
        for peer_id in exclude:
            by_slot.setdefault(m.slot_of(peer_id), []).append(peer_id)
        flags = w.FLAG_TEXT if text else 0
        for node in self.nodes.values():
            excluded = by_slot.get(node.slot, ())
            if group is None:
                body = m.encode_broadcast(payload, excluded)
                record = w.encode_record(w.R_BROADCAST, flags, 0, body)
            else:
                body = m.encode_group_broadcast(group, payload, excluded)
                record = w.encode_record(w.R_GROUP_BROADCAST, flags, 0, body)
            self._queue_record(node.name, record)
        return Error.OK

    def mp_forward(self, node: str | None, sender: int, frame: bytes) -> Error:
        """Multiplayer mode: relay a frame to node ``node``'s peers (None: every other node)."""
        if not self.available:
            return self._refuse_down("a multiplayer frame for another node")
        if self._link.backlog > MAX_BACKLOG:
            return self._refuse_backlog("a multiplayer frame for another node")
        if len(frame) > self._max_record():
            self.counters["sends_refused_too_large"] += 1
            return Error.ERR_OUT_OF_MEMORY
        record = w.encode_record(w.R_MP_FRAME, 0, sender, frame)
        for name in (node,) if node is not None else tuple(self.nodes):
            self._queue_record(name, record)
        return Error.OK

    def _queue_record(self, name: str, record: bytes) -> None:
        self._out.setdefault(name, []).append(record)
        if not self.deferred:
            self.flush()

    def flush(self) -> None:
        """Send what was queued: one NATS message per destination node (split only past
        ``max_payload``)."""
        if not self._out:
            return
        out, self._out = self._out, {}
        link = self._link
        if link is None or not self.available:
            return  # cut off: increments are rebuilt by snapshots once back
        header = w.encode_header(w.BATCH, self.slot, self.incarnation, self._name_b)
        limit = int(link.max_payload)
        items: list[tuple[str, bytes]] = []
        counters = self.counters
        for name, records in out.items():
            subject = w.inbox_subject(name)
            node = self.nodes.get(name)
            chunk = [header]
            size = len(header)
            for record in records:
                if size + len(record) > limit and len(chunk) > 1:
                    items.append((subject, b"".join(chunk)))
                    chunk, size = [header], len(header)
                chunk.append(record)
                size += len(record)
            items.append((subject, b"".join(chunk)))
            counters["records_out"] += len(records)
            if node is not None:
                node.messages_out += 1
                node.bytes_out += size
        for _subject, data in items:
            counters["messages_out"] += 1
            counters["bytes_out"] += len(data)
        link.publish(items)

    # -- questions ------------------------------------------------------------------------------

    def node_of(self, peer_id: int) -> str | None:
        """The node that owns ``peer_id`` (from its slot), None if no known node does."""
        slot = m.slot_of(peer_id)
        if slot == self.slot:
            return self.name
        node = self._by_slot.get(slot)
        return node.name if node is not None else None

    def status(self) -> dict[str, Any]:
        """The cluster section of the status (``wsfleet status``, ``get_cluster_status``)."""
        link = self._link
        now = time.monotonic()
        return {
            "node": self.name,
            "slot": self.slot,
            "provisional": self.provisional,
            "state": (
                "conflict"
                if self._conflict
                else "member"
                if self.available
                else "disconnected"
                if self._member
                else "joining"
            ),
            "nats_url": redact(self.url),
            "nats_connected": bool(link is not None and link.connected),
            "peers": self._local_count,
            "remote_peers": len(self.remote),
            "nodes": [
                {
                    "name": node.name,
                    "slot": node.slot,
                    "peers": len(node.peers),
                    "synced": node.synced,
                    "last_seen_s": round(now - node.last_seen, 2),
                    "messages_in": node.messages_in,
                    "bytes_in": node.bytes_in,
                    "messages_out": node.messages_out,
                    "bytes_out": node.bytes_out,
                }
                for node in sorted(self.nodes.values(), key=lambda n: n.name)
            ],
            **self.counters,
            "publish_failed": link.publish_failed if link is not None else 0,
            "backlog_bytes": link.backlog if link is not None else 0,
        }
