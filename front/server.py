"""``WebSocketServer``: Godot 3.2's API in the user's process, over N shard processes.

Owns the plain Godot API (listen, poll, peers, signals, broadcast) and the
checks of the user's settings: limits, TLS (`wsfleet.ipc.tls`, the loader
the shards use too) and ``bind_ip`` (`.binding`).  ``listen()`` turns them
into a `FleetConfig` and starts a `Fleet` (`.fleet`: the supervisor, the
rings, dispatch and command batching); each peer is a `WebSocketPeer`
(`.peer`) over the `PeerChannel` the fleet made for it; with
``gd_mp_api=True`` the `MultiplayerRelay` (`.relay`) is peer 1 and the
NetworkedMultiplayerPeer members below go to it.

Imports `wsfleet.ipc` (config, tls, messages) and the front's modules;
nothing imports it but the package, the CLI, tests and applications.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import ssl
import sys
from collections.abc import Callable, Iterable
from typing import Any

from wsfleet.ipc import messages as m
from wsfleet.ipc.config import (
    DEFAULT_COMPRESSION_LEVEL,
    DEFAULT_COMPRESSION_MEM_LEVEL,
    DEFAULT_COMPRESSION_WINDOW_BITS,
    DEFAULT_SHARD_TIMEOUT,
    MAX_MESSAGE_SIZE,
    MIN_SHARD_TIMEOUT,
    FleetConfig,
    Limits,
)
from wsfleet.ipc.handlerspec import resolve as resolve_handler
from wsfleet.ipc.logconfig import LogConfig
from wsfleet.ipc.tls import TlsError, load_tls

from . import binding
from .binding import BindError, format_url
from .channel import OutboundBudget, PeerChannel, PeerLimits
from .cluster import check_cluster_url, check_node_name, credentials_problem
from .errors import Error
from .fleet import STOP_DRAIN_TIMEOUT, STOP_TIMEOUT, Fleet, FleetListener
from .groups import Groups
from .groups import check_name as check_group_name
from .handshake import Accept, PendingHandshake, Refuse
from .multiplayer import MultiplayerAPI
from .ops import bind_ops_sockets
from .peer import WebSocketPeer, check_close
from .relay import MultiplayerRelay
from .remote_peer import RemotePeer
from .request import ForwardedPolicy, HandshakeRequest
from .signals import SignalEmitter

log = logging.getLogger("wsfleet")

DEFAULT_RING_CAPACITY = 1 << 20
DEFAULT_HANDSHAKE_TIMEOUT = 5.0
DEFAULT_MAX_REQUEST_BYTES = 8192
DEFAULT_PING_INTERVAL = 20.0
DEFAULT_PING_TIMEOUT = 20.0
DEFAULT_HEALTH_PATH = "/healthz"
#: How ``data_received`` is emitted (``data_received_mode``): per message (Godot) or per peer.
DATA_RECEIVED_MODES = ("message", "peer")

#: The server-wide cap on outbound bytes not yet handed to the kernel: 256 MiB holds
#: 4,096 peers with a full default (64 KiB) buffer, or 16 peers with a 16 MiB message
#: each, and stays a small part of a server's memory however many peers connect.
DEFAULT_MAX_BUFFERED_BYTES = 256 * 1024 * 1024
#: Close codes that fit a peer dropped for not reading: policy violation, try again later.
SLOW_CONSUMER_CLOSE_CODES = (1008, 1013)
# The bounds of stop() (tests check them under these names).
_STOP_TIMEOUT = STOP_TIMEOUT
_STOP_DRAIN_TIMEOUT = STOP_DRAIN_TIMEOUT
#: No cap (max_buffered_bytes=None).
_UNLIMITED = sys.maxsize

__all__ = [
    "DEFAULT_HANDSHAKE_TIMEOUT",
    "DEFAULT_MAX_BUFFERED_BYTES",
    "DEFAULT_MAX_REQUEST_BYTES",
    "DEFAULT_PING_INTERVAL",
    "DEFAULT_PING_TIMEOUT",
    "DEFAULT_RING_CAPACITY",
    "SLOW_CONSUMER_CLOSE_CODES",
    "WebSocketServer",
    "format_url",
]


def _int_option(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an int: {value!r}")
    return value


def _pow2_at_least(value: int) -> int:
    return 1 << max(0, value - 1).bit_length()


def check_data_received_mode(mode: str) -> None:
    """ValueError unless ``mode`` is one of `DATA_RECEIVED_MODES`."""
    if mode not in DATA_RECEIVED_MODES:
        raise ValueError(
            f"data_received_mode must be one of {', '.join(DATA_RECEIVED_MODES)}: {mode!r}"
        )


class WebSocketServer(SignalEmitter):
    """A WebSocket server with Godot 3.2's ``WebSocketServer`` API.

    ``shards`` worker processes hold the sockets (default: one per CPU this
    process may run on).  Signals: ``client_connected(id, protocol)``,
    ``client_disconnected(id, was_clean_close)``,
    ``client_close_request(id, code, reason)``, ``data_received(id)``; they
    fire inside `poll`.  Beyond Godot, ``shard_failed(shard_index, reason)``
    (in both modes): the supervisor gave a shard up, because it kept dying
    (more than 5 deaths within 10 s) or cannot boot.  It is not restarted
    again: its share of the connections goes to the other shards, and
    `get_shard_status` reports it ``"failed"``.  Its peers were reported by
    ``client_disconnected(id, False)`` when it died.

    Limits and protections: keyword arguments, or attributes of the same
    name set before `listen` (which returns ``ERR_INVALID_PARAMETER`` for a
    bad value; the constructor raises ``ValueError``):

    ``max_peers`` (None or 0: no limit)
        Peers the whole server holds, over every shard.  Further upgrade
        requests are answered ``503 Service Unavailable``; slots free up as
        peers leave, and a crashed shard's slots as soon as it is reaped.
        Two shards racing for the last slot may both refuse once; the total
        never goes over.
    ``max_peers_per_address`` (0: no limit)
        Connections from one IP address (the TCP peer's: behind a proxy, the
        proxy's), open peers and upgrades waiting for a handshake handler's
        verdict, over every shard.  Further upgrade requests from it are
        answered ``429 Too Many Requests`` (counted as ``refused_429``).  As
        for ``max_peers``, two shards racing for an address's last slot may
        both refuse once and the count never goes over.  A shard tracks up
        to 65,536 distinct addresses at a time; past that it answers 503
        (and logs it).
    ``max_message_size`` (None: the input buffer of `set_buffers`, 64 KiB)
        Bytes of one received message (fragments together); a longer one
        closes the connection with 1009.  At most 16 MiB.
    ``handshake_timeout`` (5 s)
        From TCP accept (or the end of the TLS handshake, which has the same
        bound) to a complete upgrade; a slower client is dropped.
    ``max_request_bytes`` (8192)
        Bytes of the upgrade request up to the blank line; more is answered
        ``431 Request Header Fields Too Large``.  Whatever this says, one line
        over 8190 bytes or more than 128 header lines also get 431
        (websockets' own limits).
    ``allowed_origins`` (None: no check) and ``require_origin`` (False)
        When set, a request whose ``Origin`` is not in the list (compared
        exactly, e.g. ``"https://game.example"``) is answered ``403
        Forbidden`` (several Origin headers: 400, websockets' rule for any
        request).  A request without ``Origin`` passes unless
        ``require_origin``: browsers always send one, native clients (Godot's)
        send none.
    ``ping_interval`` (20 s) and ``ping_timeout`` (20 s); None or 0: off
        Every ``ping_interval`` each peer gets a ping, whatever its traffic;
        one that has not answered with a pong within ``ping_timeout`` is
        closed with 1011 and reported by ``client_disconnected(id, False)``.
        Godot's clients and browsers answer pings by themselves.  A close
        handshake the server starts that the peer does not finish within
        ``ping_timeout`` ends with the connection cut, too.  One timer per
        shard sweeps its connections.
    ``max_message_rate`` (None: off) and ``message_burst`` (0: one second's worth)
        A token bucket per peer: messages a second on average, and at once.  A
        peer over it is closed with 1008 (the messages of that read are
        dropped), counted as ``rate_limited``.  Checked once per socket read.
    ``slow_consumer_close_code`` (None: off; 1008 or 1013)
        By default `WebSocketPeer.put_packet` returns ``ERR_OUT_OF_MEMORY``
        while a peer's outbound buffer (`set_buffers`) is full and the peer
        stays.  With a code, that ``put_packet`` still returns
        ``ERR_OUT_OF_MEMORY`` (the packet is not sent) and the peer is
        disconnected with that code: a close frame, then the TCP connection is
        closed (cut after 1 s if the peer does not read it), and
        ``client_disconnected(id, False)`` follows.  Packets sent in one
        `poll` tick count until the shard hands them to the kernel, so size the
        output buffer for a tick's burst.  (Refusals for ``max_buffered_bytes``
        never close a peer: the server, not the peer, is full then.)
    ``max_buffered_bytes`` (`DEFAULT_MAX_BUFFERED_BYTES`, 256 MiB; None: no cap)
        Bytes sent with ``put_packet`` that no shard has handed to the kernel
        yet, over every peer.  Beyond it ``put_packet`` returns
        ``ERR_OUT_OF_MEMORY`` whatever the peer's own room.  Each peer's
        outbound buffer is at least the largest message the server accepts
        (``max_message_size``), so that an echo always fits an empty buffer;
        with 10,000 peers and 16 MiB messages that alone could hold 160 GB,
        which this cap turns into refusals.  At least one peer's outbound
        buffer.  Refusals are counted (`get_outbound_stats`)
        and logged, at most every 10 s.

    A cluster (README "Cluster"):

    ``cluster`` (None: a lone server; ``"nats://host:4222"``, several comma-separated)
        Join the other wsfleet nodes that use this NATS server (with JetStream
        on): each node leases an id slot (so peer ids are unique across the
        cluster), keeps its own ``poll()`` stream for its own peers, and
        reaches every peer of the cluster: `has_peer`, `get_peer` (a
        `wsfleet.remote_peer.RemotePeer` for a peer of another node),
        `disconnect_peer`, `broadcast` (groups too), ``get_peers(cluster=True)``.
        Signals: ``remote_peer_connected(id, node)``,
        ``remote_peer_disconnected(id, node)`` (it left, or its node died: within
        5 s), ``cluster_node_joined(node)``, ``cluster_node_left(node, reason)``.
        Needs ``pip install wsfleet[cluster]`` (nats-py); without ``cluster``
        nothing of it is imported.  `get_cluster_status` says how it stands.
    ``node_name`` (None: ``hostname-pid``)
        This node's name in the cluster: letters, digits, ``_``, ``-``.
    ``cluster_tls_ca`` (None: the system's CAs)
        A PEM file of the CA(s) that signed the NATS server's certificate, for a
        ``tls://`` URL (or a server that requires TLS).
    ``cluster_credentials`` (None)
        A NATS credentials file (``.creds``: a user JWT and its nkey seed, as
        ``nsc`` writes them) for a NATS server in operator (JWT) mode; nats-py
        reads it with ``nkeys`` (part of ``wsfleet[cluster]``).  A user and a
        password can go in the URL instead (``nats://user:pass@host:4222``).

    Operations (README "Operations", docs/METRICS.md):

    ``control`` (None: on, at the default path for the port; a path; False: off)
        The operator's control socket (``wsfleet status|stop|drain``), served
        by the supervisor: mode 0600 in a 0700 folder,
        ``$XDG_RUNTIME_DIR/wsfleet/PORT.sock`` by default.  ``wsfleet stop``
        makes `poll` emit ``stop_requested``: the application saves what it
        must and calls `stop`.
    ``metrics`` (None: off; ``(host, port)``)
        Serve Prometheus' ``/metrics`` and ``/healthz`` there (supervisor).
    ``shard_timeout`` (30 s, at least 2)
        A shard whose loop has not beaten its heartbeat (once a second) for
        this long is hung: the supervisor SIGKILLs it and replaces it as a
        crashed one (its peers get ``client_disconnected(id, False)``).
    ``log_config`` (None: INFO, text, no access log)
        A `wsfleet.ipc.logconfig.LogConfig`: how the supervisor and the
        shards log (the application's own process is the application's).

    The handshake:

    ``forwarded_allow_ips`` (None: nobody; addresses or networks, a list or a
    comma-separated string; ``"*"``: every one)
        Connections from these addresses (a proxy, a load balancer) may say
        who their client is (``X-Forwarded-For``, else ``Forwarded``):
        `get_peer_address` is then the client's and
        ``get_peer(id).get_proxy_address()`` the proxy's.  Never trusted by
        default.  Every peer's upgrade request is ``get_peer(id).get_request()``
        (path, query, headers, cookies; `wsfleet.request`).
    ``health_path`` ("/healthz"; None: off)
        A plain ``GET`` of this path on the WebSocket port (no ``Upgrade``)
        is answered by the shard that accepted it: ``200 ok``, or ``503``
        while draining or stopping, with ``X-Wsfleet-Shard: N``: the
        per-port probe of a load balancer (the metrics port's ``/healthz`` is
        the fleet-wide one).  Any other plain request gets ``426 Upgrade
        Required``.

    Application code in the shards (README "Application code in the shards"):

    ``shard_handler`` (None)
        ``"module:attr"``: a factory called once in every shard process (at
        its start, after a restart, after ``wsfleet reload``) with a
        `wsfleet.shards.app.ShardContext`; the handler it returns sees every
        message of that shard's peers first (``on_message(peer_id, data,
        is_text)``: False consumes it, True/None forwards it to `poll` in
        order) and may answer, close and fan out within its shard with the
        same peer ids.  Imported here too, so a bad name is a ValueError now
        (``ERR_INVALID_PARAMETER`` from `listen` when set later).  Not with
        ``gd_mp_api`` (`listen` refuses it: the relay owns every message).

    Compression (permessage-deflate, RFC 7692; README "Compression"):

    ``compression`` (False)
        Negotiate permessage-deflate with clients that offer it (browsers do;
        Godot 3.2's client cannot compress, and never offers it).  Off by
        default: each compressing connection keeps zlib contexts in its shard
        (tens of KiB with context takeover, see ``loadtest/RESULTS.md``) and
        every message costs a deflate or inflate.  A client that does not
        offer it gets the plain fast path, as with compression off.  What a
        compressing client sends is checked against ``max_message_size``
        after inflation (a larger message closes it with 1009, however small
        it was compressed).  Messages the server sends to it are deflated
        (broadcasts per peer, or once per shard for peers without server
        context takeover); the multiplayer relay's frames are sent
        uncompressed, which RFC 7692 allows.
    ``compression_context_takeover`` (True)
        True: the zlib contexts live as long as the connection (better
        ratio, more memory). False: the server asks for
        ``server_no_context_takeover`` and ``client_no_context_takeover``: a
        fresh context per message and none kept in between.  ``wsfleet
        reload`` moves a connection only without context takeover both ways
        (a client may ask for it itself); any other compressing connection is
        closed with 1012 ("service restart") during the reload.
    ``compression_window_bits`` (12; 9 to 15)
        ``server_max_window_bits`` (and ``client_max_window_bits`` for a
        client that offers it): the LZ77 window, 2**bits bytes each way.
    ``compression_mem_level`` (5; 1 to 9) and ``compression_level`` (6; 0 to 9)
        zlib's ``memLevel`` and level for what the server deflates.
    """

    SIGNALS = (
        "client_connected",
        "client_disconnected",
        "client_close_request",
        "data_received",
        "shard_failed",
        "stop_requested",
        # Multiplayer mode (gd_mp_api=True), as WebSocketMultiplayerPeer emits them:
        "peer_connected",
        "peer_disconnected",
        "peer_packet",
        # A cluster (cluster=): peers of other nodes, and the nodes.
        "remote_peer_connected",
        "remote_peer_disconnected",
        "cluster_node_joined",
        "cluster_node_left",
    )

    # NetworkedMultiplayerPeer's constants.
    TARGET_PEER_BROADCAST = 0
    TARGET_PEER_SERVER = 1
    CONNECTION_DISCONNECTED, CONNECTION_CONNECTING, CONNECTION_CONNECTED = 0, 1, 2
    TRANSFER_MODE_UNRELIABLE, TRANSFER_MODE_UNRELIABLE_ORDERED, TRANSFER_MODE_RELIABLE = 0, 1, 2

    def __init__(
        self,
        shards: int | None = None,
        *,
        ring_capacity: int = DEFAULT_RING_CAPACITY,
        handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
        max_peers: int | None = None,
        max_peers_per_address: int = 0,
        max_message_size: int | None = None,
        max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
        allowed_origins: Iterable[str] | None = None,
        require_origin: bool = False,
        ping_interval: float | None = DEFAULT_PING_INTERVAL,
        ping_timeout: float | None = DEFAULT_PING_TIMEOUT,
        slow_consumer_close_code: int | None = None,
        max_buffered_bytes: int | None = DEFAULT_MAX_BUFFERED_BYTES,
        control: str | bool | None = None,
        metrics: tuple[str, int] | None = None,
        shard_timeout: float = DEFAULT_SHARD_TIMEOUT,
        log_config: LogConfig | None = None,
        forwarded_allow_ips: Iterable[str] | str | None = None,
        health_path: str | None = DEFAULT_HEALTH_PATH,
        max_message_rate: float | None = None,
        message_burst: int = 0,
        cluster: str | None = None,
        node_name: str | None = None,
        cluster_tls_ca: str | None = None,
        cluster_credentials: str | None = None,
        compression: bool = False,
        compression_context_takeover: bool = True,
        compression_window_bits: int = DEFAULT_COMPRESSION_WINDOW_BITS,
        compression_mem_level: int = DEFAULT_COMPRESSION_MEM_LEVEL,
        compression_level: int = DEFAULT_COMPRESSION_LEVEL,
        shard_handler: str | None = None,
        data_received_mode: str = "message",
    ) -> None:
        super().__init__()
        check_data_received_mode(data_received_mode)
        #: ``"message"``: ``data_received(id)`` per message, as Godot; ``"peer"``: once per
        #: peer per batch of its shard, with all its new messages waiting (`get_packets`).
        self.data_received_mode = data_received_mode
        if shard_handler is not None:
            resolve_handler(shard_handler)  # ValueError now rather than a shard that cannot boot
        #: ``module:attr`` of the application code every shard runs (None: none).
        self.shard_handler = shard_handler
        if cluster is not None:
            check_cluster_url(cluster)
        if node_name is not None:
            check_node_name(node_name)
        #: The NATS URL of the cluster (None: a lone server) and this node's name in it.
        self.cluster = cluster
        self.node_name = node_name
        #: A PEM file of the CA(s) that signed NATS' certificate (``tls://``); None: the
        #: system's CAs.
        self.cluster_tls_ca = cluster_tls_ca
        #: A NATS credentials file (``.creds``) for a NATS server in operator mode.
        self.cluster_credentials = cluster_credentials
        self._cluster: Any = None
        if shards is None:
            shards = len(os.sched_getaffinity(0))
        if shards < 1:
            raise ValueError(f"shards must be at least 1: {shards}")
        self.shards = shards
        self.ring_capacity = ring_capacity
        # The limits (see the class docstring); checked again by listen().
        self.handshake_timeout = handshake_timeout
        self.max_peers = max_peers
        self.max_peers_per_address = max_peers_per_address
        self.max_message_size = max_message_size
        self.max_request_bytes = max_request_bytes
        if allowed_origins is not None and not isinstance(allowed_origins, (str, bytes)):
            allowed_origins = list(allowed_origins)  # an iterator would be spent by the check
        self.allowed_origins = allowed_origins
        self.require_origin = require_origin
        self.ping_interval = ping_interval
        self.ping_timeout = ping_timeout
        self.slow_consumer_close_code = slow_consumer_close_code
        self.max_buffered_bytes = max_buffered_bytes
        self.control = control
        self.metrics = metrics
        self.shard_timeout = shard_timeout
        #: How the supervisor and the shards log (None: INFO, text, no access log).
        self.log_config = log_config
        self._handshake_handler: Callable[[PendingHandshake], Accept | Refuse | None] | None = None
        #: Upgrades waiting for a verdict (token -> shard link and what the peer will be
        #: made with: the request's head, the client's and the proxy's addresses), and
        #: those accepted whose arrival has not come yet (token -> head, client, proxy).
        self._waiting: dict[int, tuple[Any, tuple[bytes, str, str]]] = {}
        self._accepted: dict[int, tuple[bytes, str, str]] = {}
        self._groups = Groups()
        self.forwarded_allow_ips = forwarded_allow_ips
        self.health_path = health_path
        self.max_message_rate = max_message_rate
        self.message_burst = message_burst
        self.compression = compression
        self.compression_context_takeover = compression_context_takeover
        self.compression_window_bits = compression_window_bits
        self.compression_mem_level = compression_mem_level
        self.compression_level = compression_level
        self._bind_ip = "*"
        #: PEM text or a path to a PEM file. TLS is on when both are set.
        self.private_key: str | None = None
        self.ssl_certificate: str | None = None
        #: Extra certificates sent in the TLS handshake (PEM text or path).
        self.ca_chain: str | None = None
        self._in_bytes_limit = 64 * 1024
        self._in_packets_limit = 1024
        self._out_bytes_limit = 64 * 1024
        self._out_packets_limit = 1024
        self._listening = False
        self._gd_mp_api = False
        self._port = 0
        self._addresses: list[tuple[str, int]] = []
        self._peers: dict[int, WebSocketPeer] = {}
        self._fleet: Fleet | None = None
        self._budget = OutboundBudget(_UNLIMITED)
        self._relay = MultiplayerRelay(self.emit_signal, self._groups)
        self._refusing = False
        self._check_limits()  # ValueError now rather than an error from listen()

    # -- properties --------------------------------------------------------------------------

    @property
    def bind_ip(self) -> str:
        """Where to listen: ``"*"`` (every address, IPv4 and IPv6), an IP, or a host name.

        A host name is resolved by ``listen`` (``ERR_CANT_RESOLVE`` if it does
        not resolve), which listens on every address it has
        (`get_bound_addresses`).  A value that is none of these: ValueError.
        """
        return self._bind_ip

    @bind_ip.setter
    def bind_ip(self, value: str) -> None:
        if self._listening:
            raise RuntimeError("bind_ip cannot change while the server is listening")
        self._bind_ip = binding.check_bind_ip(value)

    @property
    def forwarded_allow_ips(self) -> list[str]:
        """Proxies trusted to say who their client is (see the class docstring)."""
        return list(self._forwarded_allow_ips)

    @forwarded_allow_ips.setter
    def forwarded_allow_ips(self, value: Iterable[str] | str | None) -> None:
        if isinstance(value, str):
            value = value.split(",")
        entries = [entry.strip() for entry in value or () if entry.strip()]
        self._forwarded = ForwardedPolicy(entries)  # ValueError for a bad entry
        self._forwarded_allow_ips = entries

    @property
    def port(self) -> int:
        """The port listened on (useful after ``listen(0)``)."""
        return self._port

    def get_bound_addresses(self) -> list[tuple[str, int]]:
        """``(address, port)`` for every address listened on; [] when not listening.

        ``bind_ip="*"`` gives ``("::", port)`` (one socket for every IPv6 and
        IPv4 address) or, without IPv6, ``("0.0.0.0", port)``; a host name
        gives each of its addresses.  `format_url` writes a URL for one.
        """
        return list(self._addresses) if self._listening else []

    # -- WebSocketServer ----------------------------------------------------------------------

    def set_buffers(
        self, input_buffer_size_kb: int, input_max_packets: int, output_buffer_size_kb: int,
        output_max_packets: int,
    ) -> Error:  # fmt: skip
        """Per-peer limits, each rounded up to a power of two (Godot's rule). Before `listen`.

        The input buffer is also the largest message a peer may send (longer:
        close 1009) unless ``max_message_size`` says otherwise.  The output
        buffer is raised to that largest message where it is smaller, so that
        the echo of any accepted message fits (`WebSocketPeer.get_outbound_limit`),
        and capped at 16 MiB.
        """
        if self._listening:
            log.error("set_buffers: the server is already listening")
            return Error.FAILED
        values = (
            input_buffer_size_kb,
            input_max_packets,
            output_buffer_size_kb,
            output_max_packets,
        )
        if min(values) < 1:
            log.error("set_buffers: every value must be at least 1: %s", values)
            return Error.ERR_INVALID_PARAMETER
        self._in_bytes_limit = _pow2_at_least(input_buffer_size_kb) * 1024
        self._in_packets_limit = _pow2_at_least(input_max_packets)
        self._out_bytes_limit = _pow2_at_least(output_buffer_size_kb) * 1024
        self._out_packets_limit = _pow2_at_least(output_max_packets)
        return Error.OK

    def listen(self, port: int, protocols: Iterable[str] = (), gd_mp_api: bool = False) -> Error:
        """Start listening on ``bind_ip:port`` with N shards; returns an `Error`."""
        if self._listening:
            log.error("listen: the server is already listening")
            return Error.ERR_ALREADY_IN_USE
        if not 0 <= port <= 65535:
            log.error("listen: port %d is out of range", port)
            return Error.ERR_INVALID_PARAMETER
        try:
            limits, peer_limits, budget_limit = self._check_limits()
            check_data_received_mode(self.data_received_mode)  # may be set after __init__
            protocols = tuple(str(p).strip() for p in protocols)
            if self.shard_handler is not None:
                if gd_mp_api:
                    raise ValueError(
                        "shard_handler cannot be used with gd_mp_api: the relay owns every message"
                    )
                resolve_handler(self.shard_handler)
        except ValueError as exc:
            log.error("listen: %s", exc)
            return Error.ERR_INVALID_PARAMETER
        try:
            tls = load_tls(self.ssl_certificate, self.private_key, self.ca_chain)
        except TlsError as exc:
            log.error("listen: cannot use the TLS certificate/key: %s", exc)
            return Error.ERR_CANT_CREATE
        if tls is None and self.ca_chain:
            log.warning("listen: ca_chain is set but TLS is off (no certificate and key)")
        id_range = range(m.FIRST_PEER_ID, m.ID_LIMIT)
        if self.cluster:
            error = self._join_cluster()
            if error != Error.OK:
                return error
            id_range = m.slot_range(self._cluster.slot)
        try:
            config = FleetConfig(
                protocols,
                limits,
                tls,
                bool(gd_mp_api),
                self.ring_capacity,
                log=self.log_config or LogConfig(),
                shard_timeout=self.shard_timeout,
                id_base=id_range.start,
                id_total=len(id_range),
                shard_handler=self.shard_handler or None,
            )
        except ValueError as exc:
            log.error("listen: %s", exc)
            self._leave_cluster()
            return Error.ERR_INVALID_PARAMETER
        try:
            addresses = binding.resolve(self._bind_ip)
            port, sockets = binding.bind(addresses, port, self.shards)
        except BindError as exc:
            self._leave_cluster()
            return exc.error  # logged
        config = dataclasses.replace(config, port=port)  # the port bound (listen(0))
        self._budget = OutboundBudget(budget_limit)
        listener = FleetListener(
            peer_connected=self._on_peer_connected,
            handshake=self._on_handshake,
            handshake_ended=self._on_handshake_ended,
            peer_left=self._on_peer_left,
            close_requested=self._on_close_requested,
            shard_failed=self._on_shard_failed,
            stop_requested=lambda: self.emit_signal("stop_requested"),
        )
        fleet = Fleet(
            self.shards,
            listener,
            self._handlers["data_received"],
            peer_limits,
            self._budget,
            per_peer=self.data_received_mode == "peer",
        )
        fleet.refusing = self._refusing
        if gd_mp_api:
            self._relay.attach(fleet)
        try:
            ops = bind_ops_sockets(self.control, self.metrics, port)
        except OSError as exc:
            log.error("listen: %s", exc)
            for socks in sockets:
                for sock in socks:
                    sock.close()
            self._relay.detach()
            self._leave_cluster()
            return Error.ERR_ALREADY_IN_USE if exc.errno == 98 else Error.ERR_CANT_CREATE
        try:
            fleet.start(sockets, config, ops)
        except OSError as exc:
            log.error("listen: cannot start the supervisor: %s", exc)
            fleet.close()
            ops.unlink()
            self._relay.detach()
            self._leave_cluster()
            return Error.ERR_CANT_CREATE
        finally:
            for socks in sockets:
                for sock in socks:
                    sock.close()  # the supervisor and the shards hold them now
            ops.close()
        if self._cluster is not None:
            fleet.attach_cluster(self._cluster)
            self._cluster.status_sink = fleet.publish_front
            if gd_mp_api:
                self._relay.cluster = self._cluster
        self._fleet = fleet
        self._port = port
        self._addresses = [(address.host, port) for address in addresses]
        self._gd_mp_api = bool(gd_mp_api)
        self._listening = True
        return Error.OK

    def _join_cluster(self) -> Error:
        """Start the cluster link (nats-py) and lease an id slot (``cluster=``)."""
        try:
            import nats  # noqa: F401  (only to say what is missing)

            from .cluster import Cluster
        except ImportError:
            log.error("listen: cluster= needs nats-py: pip install 'wsfleet[cluster]'")
            return Error.ERR_UNAVAILABLE
        try:
            check_cluster_url(self.cluster)  # set as an attribute after the constructor?
            if self.node_name is not None:
                check_node_name(self.node_name)
        except ValueError as exc:
            log.error("listen: %s", exc)
            return Error.ERR_INVALID_PARAMETER
        tls = None
        if self.cluster_tls_ca:
            try:
                tls = ssl.create_default_context(cafile=self.cluster_tls_ca)
            except (OSError, ssl.SSLError) as exc:
                log.error("listen: cluster_tls_ca %s: %s", self.cluster_tls_ca, exc)
                return Error.ERR_CANT_CREATE
        credentials = self.cluster_credentials
        if credentials:
            problem = credentials_problem(credentials)
            if problem:
                log.error("listen: cluster_credentials %s: %s", credentials, problem)
                return Error.ERR_CANT_OPEN
        try:
            cluster = Cluster(
                str(self.cluster),
                self.node_name,
                self.shards,
                _ClusterDelivery(self),
                tls=tls,
                credentials=credentials or None,
            )
            cluster.start()
        except (ValueError, OSError) as exc:
            log.error("listen: cannot start the cluster link: %s", exc)
            return Error.ERR_CANT_CREATE
        self._cluster = cluster
        return Error.OK

    def _leave_cluster(self) -> None:
        if self._cluster is not None:
            self._cluster.stop()
            self._cluster = None

    def _check_limits(self) -> tuple[Limits, PeerLimits, int]:
        """The limits as the shards take them, the peers' and the buffered-bytes cap.

        ValueError for a bad value (the constructor raises it; listen() logs it).
        """
        timeout = self.shard_timeout
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
            raise ValueError(f"shard_timeout must be a number of seconds: {timeout!r}")
        if not timeout >= MIN_SHARD_TIMEOUT:
            raise ValueError(f"shard_timeout must be at least {MIN_SHARD_TIMEOUT:g} s: {timeout}")
        max_message = self.max_message_size
        if max_message is None:
            max_message = self._in_bytes_limit
        if isinstance(max_message, bool) or not isinstance(max_message, int):
            raise ValueError(f"max_message_size must be an int: {max_message!r}")
        origins = self.allowed_origins
        if isinstance(origins, (str, bytes)):
            raise ValueError("allowed_origins is a list of origins, not one string")
        if origins is not None:
            origins = tuple(sorted({str(origin).strip() for origin in origins}))
        code = self.slow_consumer_close_code
        if code is not None and code not in SLOW_CONSUMER_CLOSE_CODES:
            raise ValueError(f"slow_consumer_close_code must be None, 1008 or 1013: {code}")
        limits = Limits(
            handshake_timeout=float(self.handshake_timeout),
            max_peers=int(self.max_peers or 0),
            max_peers_per_address=int(self.max_peers_per_address or 0),
            max_message_size=max_message,
            max_request_bytes=int(self.max_request_bytes),
            allowed_origins=origins,
            require_origin=bool(self.require_origin),
            ping_interval=float(self.ping_interval) if self.ping_interval else None,
            ping_timeout=float(self.ping_timeout) if self.ping_timeout else None,
            health_path=self.health_path or None,
            max_message_rate=float(self.max_message_rate) if self.max_message_rate else None,
            message_burst=int(self.message_burst or 0),
            hold_upgrades=self._handshake_handler is not None,
            compression=bool(self.compression),
            compression_context_takeover=bool(self.compression_context_takeover),
            compression_window_bits=_int_option(
                "compression_window_bits", self.compression_window_bits
            ),
            compression_mem_level=_int_option("compression_mem_level", self.compression_mem_level),
            compression_level=_int_option("compression_level", self.compression_level),
        )
        peer_limits = PeerLimits(
            in_packets=self._in_packets_limit,
            in_bytes=self._in_bytes_limit,
            out_packets=self._out_packets_limit,
            out_bytes=self._outbound_limit(max_message),
            slow_close_code=code,
        )
        cap = self.max_buffered_bytes
        if cap is None:
            cap = _UNLIMITED
        elif isinstance(cap, bool) or not isinstance(cap, int):
            raise ValueError(f"max_buffered_bytes must be None or an int: {cap!r}")
        elif cap < peer_limits.out_bytes:
            raise ValueError(
                f"max_buffered_bytes must be None or at least one peer's outbound buffer "
                f"({peer_limits.out_bytes} bytes): {cap}"
            )
        return limits, peer_limits, cap

    def _outbound_limit(self, max_message: int) -> int:
        """The output buffer, raised to hold the largest accepted message, within one record.

        The outbound counters count payload bytes (the shard adds the frame
        header), so a buffer of ``max_message`` bytes takes the echo of the
        largest message a peer may send, even in multiplayer mode (where the
        9-byte header is part of the message both ways).
        """
        return min(max(self._out_bytes_limit, max_message), MAX_MESSAGE_SIZE)

    def stop(self) -> None:
        """Stop listening and close every peer (close 1001). No signals are emitted, as in Godot.

        Packets already sent (`WebSocketPeer.put_packet`, broadcasts) reach
        their peers before the close frame, even those of the current `poll`
        tick that the commands rings could not take yet.  Bounded: at most
        ``_STOP_DRAIN_TIMEOUT`` waiting for shards to take the queued
        commands, then ``_STOP_TIMEOUT`` for the supervisor (which gives the
        shards its own grace, then kills them) before it is killed.  In a
        cluster, then the goodbye to the other nodes (they drop this node's
        peers at once) and the slot's release: at most 3 s more.
        """
        if not self._listening:
            return
        self._listening = False
        fleet = self._fleet
        if fleet is not None:
            fleet.stop()
        self._leave_cluster()  # BYE: the other nodes drop this node's peers at once
        self._peers.clear()
        self._groups.clear()
        self._waiting.clear()
        self._accepted.clear()
        self._relay.detach()
        self._fleet = None

    @property
    def _supervisor(self) -> Any:
        """The supervisor's ``Popen`` while listening (tests kill it to play a crash)."""
        return self._fleet.supervisor if self._fleet is not None else None

    def is_listening(self) -> bool:
        return self._listening

    def has_peer(self, peer_id: int) -> bool:
        """Whether the peer is connected: to this node, or (in a cluster) to another."""
        if peer_id in self._peers:
            return True
        cluster = self._cluster
        return cluster is not None and peer_id in cluster.remote

    def _any_peer(self, peer_id: int) -> WebSocketPeer | RemotePeer | None:
        peer = self._peers.get(peer_id)
        if peer is None and self._cluster is not None:
            return self._cluster.remote.get(peer_id)
        return peer

    def get_peer(self, peer_id: int) -> WebSocketPeer | RemotePeer | None:
        """The peer: a `WebSocketPeer` for one of this node's, a
        `wsfleet.remote_peer.RemotePeer` for a peer of another node of the cluster
        (same method names); None (logged) for an unknown id."""
        # The front's per-message path: one dict lookup for a local peer (`_any_peer`
        # inlined: a call is a quarter of this method's cost).
        peer = self._peers.get(peer_id)
        if peer is None:
            peer = self._any_peer(peer_id)
            if peer is None:
                log.error("get_peer: no peer %d", peer_id)
        return peer

    def get_peer_address(self, peer_id: int) -> str:
        peer = self._any_peer(peer_id)
        if peer is None:
            log.error("get_peer_address: no peer %d", peer_id)
            return ""
        return peer.get_connected_host()

    def get_peer_port(self, peer_id: int) -> int:
        peer = self._any_peer(peer_id)
        return 0 if peer is None else peer.get_connected_port()

    def disconnect_peer(self, peer_id: int, code: int = 1000, reason: str = "") -> None:
        """Start the close handshake with a peer; it leaves in a later `poll`.

        A peer of another node: its node closes it (the client sees ``code``
        and ``reason``) and ``remote_peer_disconnected`` follows here; while
        NATS is unreachable nothing is sent (counted and logged).
        """
        peer = self._any_peer(peer_id)
        if peer is None:
            check_close(code, reason)
            log.error("disconnect_peer: no peer %d", peer_id)
            return
        peer.close(code, reason)

    def get_peers(self, cluster: bool = False) -> list[int]:
        """The ids of this node's connected peers; ``cluster=True``: of every node's."""
        if cluster and self._cluster is not None:
            return [*self._peers, *self._cluster.remote]
        return list(self._peers)

    def get_cluster_status(self) -> dict[str, Any]:
        """The cluster as this node sees it ({} without ``cluster=``), read live: ``node``,
        ``slot``, ``provisional``, ``state`` (``member``, ``joining``, ``disconnected``:
        NATS is away, ``conflict``: out of the cluster), ``nats_url`` (credentials
        hidden), ``nats_connected``, ``peers``, ``remote_peers``, ``nodes`` (name, slot,
        peers, synced, last seen, traffic to and from it) and the cross-node counters
        (docs/METRICS.md: messages and bytes in and out, refusals by reason, drops)."""
        return self._cluster.status() if self._cluster is not None else {}

    def get_peer_shard(self, peer_id: int) -> int:
        """The index of the shard that holds the peer's connection (-1 if unknown)."""
        channel = self._fleet.channels.get(peer_id) if self._fleet is not None else None
        return -1 if channel is None else channel.link.index

    def get_shard_status(self) -> list[dict[str, Any]]:
        """Per shard: index, pid (None while it is down), peers, state and reason.

        ``state`` is ``"running"``, ``"down"`` (not started yet, or dead and
        about to be restarted by the supervisor) or ``"failed"`` (given up for good, see the
        ``shard_failed`` signal); ``reason`` says why it failed, else None.
        """
        return self._fleet.shard_status() if self._fleet is not None else []

    def get_stats(self) -> dict[str, Any]:
        """The figures of ``wsfleet status --json`` (docs/METRICS.md), read in this process.

        Per shard (``shards``) and summed (``totals``): peers, handshakes
        accepted and refused by reason, messages and bytes in and out, closes
        by code, events-ring fill, paused sockets, restarts, CPU % and RSS.
        The shards publish their counters every 0.1 s.  {} when not listening.
        """
        return self._fleet.stats_document() if self._fleet is not None else {}

    def is_supervisor_alive(self) -> bool:
        """False once the supervisor (and with it every shard) is gone while listening."""
        return self._fleet is not None and not self._fleet.supervisor_lost

    def get_outbound_stats(self) -> dict[str, int]:
        """The outbound buffers over every peer, and the packets ``put_packet`` refused.

        ``buffered_bytes``: sent and not yet handed to the kernel;
        ``max_buffered_bytes``: the cap (``sys.maxsize`` for None);
        ``refused_peer_full``: refused because that peer's outbound buffer was
        full; ``refused_server_full``: because ``max_buffered_bytes`` was reached.
        Counted since ``listen``.
        """
        return self._budget.stats()

    # -- groups (wsfleet.groups) -------------------------------------------------------------

    def join(self, peer_id: int, group: str) -> Error:
        """Put a peer in a group (any non-empty name); `broadcast` ``group=`` reaches it.

        The peer leaves every group when it leaves (or its shard dies).  With relay
        groups (`set_relay_groups`) it is also a room: the peer and each peer it now
        shares a group with are told of each other (``SYS_ADD``).
        """
        return self._membership(peer_id, group, True)

    def leave(self, peer_id: int, group: str) -> Error:
        """Take a peer out of a group (OK if it was not in it).  With relay groups, it and
        each peer it no longer shares any group with get ``SYS_DEL`` of each other."""
        return self._membership(peer_id, group, False)

    def get_groups(self, peer_id: int) -> list[str]:
        return self._groups.groups_of(peer_id)

    def get_group_members(self, group: str) -> list[int]:
        return self._groups.members(group)

    def _membership(self, peer_id: int, group: str, join: bool) -> Error:
        name = check_group_name(group)
        peer = self._peers.get(peer_id)
        if peer is None:
            log.error("%s: no peer %d", "join" if join else "leave", peer_id)
            return Error.ERR_DOES_NOT_EXIST
        shard = peer.shard_index()
        if self._gd_mp_api and self._relay.rooms:  # the change and its SYS_ADD / SYS_DEL
            self._relay.membership(peer_id, shard, group, name, join)
            return Error.OK
        changed = (
            self._groups.join(peer_id, shard, group)
            if join
            else self._groups.leave(peer_id, shard, group)
        )
        if changed:
            peer.command(m.CMD_GROUP, int(join), name)
        return Error.OK

    def set_relay_groups(self, enabled: bool) -> Error:
        """Relay groups ("rooms") in multiplayer mode (``gd_mp_api``); off by default.

        On, a client is told (``SYS_ADD``) only of the server and of the peers it
        shares a group with, and its frames reach only those: ``to`` = n is dropped
        (counted as ``group`` in `get_mp_stats`) unless n shares a group with the
        sender, ``to`` = 0 or -n reach the sender's room mates (and the server), ``to``
        = 1 the server always.  A new peer is in no group, so it knows no one until
        the application joins it (`join`, e.g. in ``peer_connected``): then it and
        each peer it now shares a group with get ``SYS_ADD`` of each other, before any
        frame between them can arrive; `leave` sends ``SYS_DEL`` both ways to the
        peers it no longer shares any group with, and a departure sends ``SYS_DEL``
        to its room mates only.  The server's own packets (`put_packet`,
        `multiplayer`) reach their targets whatever the groups.  Without
        ``gd_mp_api`` it changes nothing.

        Set it before `listen`, or while no peer is connected: with peers it
        returns ``ERR_BUSY`` (logged) and nothing changes, since what each peer was
        told would not match.
        """
        enabled = bool(enabled)
        if enabled == self._relay.rooms:
            return Error.OK
        if self._peers:
            log.error(
                "set_relay_groups: not while peers are connected (%d): set it before "
                "listen() or while none is",
                len(self._peers),
            )
            return Error.ERR_BUSY
        self._relay.rooms = enabled
        return Error.OK

    def is_relay_groups(self) -> bool:
        """Whether relay groups are on (`set_relay_groups`)."""
        return self._relay.rooms

    def broadcast(
        self,
        data: bytes | bytearray | memoryview | str,
        text: bool = False,
        exclude: Iterable[int] = (),
        group: str | None = None,
    ) -> Error:
        """Send one message to every peer, or to the members of ``group``, but ``exclude``:
        one command per shard (that holds members), encoded once there.

        In a cluster it reaches every node's peers once: one record per other
        node (encoded once there, then once per shard); a group's members are
        found by the node that holds each.  ``ERR_CONNECTION_ERROR`` when NATS
        is unreachable (this node's peers got it all the same).
        """
        if not self._listening or self._fleet is None:
            return Error.ERR_UNCONFIGURED
        payload = data.encode() if isinstance(data, str) else bytes(data)
        if text:
            try:
                payload.decode()
            except UnicodeDecodeError:
                log.error("broadcast: text messages must be UTF-8")
                return Error.ERR_INVALID_PARAMETER
        excluded = list(exclude)
        if len(payload) + 4 * (1 + len(excluded)) > MAX_MESSAGE_SIZE:
            log.error("broadcast: %d bytes is more than a message may hold", len(payload))
            return Error.ERR_OUT_OF_MEMORY
        flags = m.FLAG_TEXT if text else 0
        name = None
        if group is None:
            self._fleet.broadcast(payload, flags, excluded)
        else:
            name = check_group_name(group)
            shards = self._groups.shards_of(group)
            self._fleet.broadcast_group(name, payload, flags, excluded, shards)
        if self._cluster is not None:
            return self._cluster.broadcast(payload, text, excluded, name)
        return Error.OK

    # -- polling ------------------------------------------------------------------------------

    def fileno(self) -> int:
        """A descriptor that becomes readable when `poll` has something to do (for select)."""
        if self._fleet is None:
            raise RuntimeError("fileno: the server is not listening")
        return self._fleet.fileno()

    def poll(self, timeout: float | None = None) -> None:
        """Take every event the shards have and emit the signals; never blocks by default.

        With ``timeout`` (seconds), wait up to that long for something to
        happen when nothing is pending.
        """
        if self._listening and self._fleet is not None:
            self._fleet.poll(timeout)

    # -- the fleet's reports (handed to it as a FleetListener) ----------------------------------

    # -- the application's verdict on upgrades (wsfleet.handshake) -----------------------------

    def set_handshake_handler(
        self, handler: Callable[[PendingHandshake], Accept | Refuse | None] | None
    ) -> Error:
        """Decide each upgrade before its 101 (before `listen`; None: no handler).

        ``handler(pending)`` gets a `wsfleet.handshake.PendingHandshake`
        (``token``, ``request``, ``address``, ``offered``, ``subprotocol``) inside
        `poll` and returns ``wsfleet.Accept(...)``, ``wsfleet.Refuse(status,
        reason, headers)``, or None to answer later with `accept_handshake` /
        `refuse_handshake`, within ``handshake_timeout`` (else the connection
        is dropped).  A handler that raises refuses with 500 (logged).
        """
        if self._listening:
            log.error("set_handshake_handler: before listen() only")
            return Error.ERR_ALREADY_IN_USE
        self._handshake_handler = handler
        return Error.OK

    def accept_handshake(
        self,
        token: int,
        subprotocol: str | None = None,
        headers: Iterable[tuple[str, str]] = (),
    ) -> Error:
        """Let a waiting upgrade in (its id will be ``token``); ERR_DOES_NOT_EXIST when it
        is not waiting (decided already, or dropped at its deadline).  A verdict that
        crosses the deadline (the drop not yet polled) returns OK and does nothing."""
        return self._verdict(token, Accept(subprotocol, tuple(headers)))

    def refuse_handshake(
        self,
        token: int,
        status: int = 403,
        reason: str = "",
        headers: Iterable[tuple[str, str]] = (),
    ) -> Error:
        """Refuse a waiting upgrade with that HTTP answer; ERR_DOES_NOT_EXIST as above."""
        return self._verdict(token, Refuse(status, reason, tuple(headers)))

    def is_handshake_waiting(self, token: int) -> bool:
        """Whether the upgrade ``token`` still waits for a verdict (False once decided, or
        ended: the client left, or its ``handshake_timeout`` passed, as polled so far)."""
        return token in self._waiting

    def _verdict(self, token: int, verdict: Accept | Refuse) -> Error:
        waiting = self._waiting.pop(token, None)
        if waiting is None:
            log.error("handshake verdict for %d, which is not waiting (late?)", token)
            return Error.ERR_DOES_NOT_EXIST
        link, peer = waiting
        if isinstance(verdict, Accept):
            self._accepted[token] = peer
            payload = m.encode_verdict(0, verdict.subprotocol, "", verdict.headers)
            link.command(m.CMD_VERDICT, token, 1, payload)
        else:
            payload = m.encode_verdict(verdict.status, None, verdict.reason, verdict.headers)
            link.command(m.CMD_VERDICT, token, 0, payload)
        return Error.OK

    def _on_handshake(
        self,
        link: Any,
        token: int,
        ip: str,
        port: int,
        protocol: str,
        offered: list[str],
        head: bytes,
    ) -> None:
        request = HandshakeRequest(head)
        proxy = ""
        if self._forwarded:
            ip, proxy = self._forwarded.addresses(ip, request)
        self._waiting[token] = (link, (head, ip, proxy))
        pending = PendingHandshake(token, request, ip, port, offered, protocol, proxy)
        handler = self._handshake_handler
        try:
            verdict = handler(pending) if handler is not None else Accept()
        except Exception:
            log.exception("the handshake handler raised: refusing with 500")
            verdict = Refuse(500, "Internal Server Error\n")
        if verdict is not None and token in self._waiting:
            if not isinstance(verdict, (Accept, Refuse)):
                log.error("the handshake handler returned %r: refusing with 500", verdict)
                verdict = Refuse(500, "Internal Server Error\n")
            self._verdict(token, verdict)

    def _on_handshake_ended(self, token: int) -> None:
        self._waiting.pop(token, None)
        self._accepted.pop(token, None)

    def _on_peer_connected(
        self, channel: PeerChannel, ip: str, port: int, protocol: str, head: bytes
    ) -> None:
        peer_id = channel.id
        accepted = self._accepted.pop(peer_id, None) if self._accepted else None
        proxy = ""
        if accepted is not None:  # it waited for a verdict: all was known then
            head, ip, proxy = accepted
        elif self._forwarded:  # only then is the request parsed here
            ip, proxy = self._forwarded.addresses(ip, HandshakeRequest(head))
        self._peers[peer_id] = WebSocketPeer(channel, ip, port, protocol, head, proxy)
        if self._cluster is not None:
            self._cluster.local_joined(peer_id, ip, port, protocol)
        if self._gd_mp_api:
            self._relay.welcome(channel)
            self.emit_signal("peer_connected", peer_id)
        else:
            self.emit_signal("client_connected", peer_id, protocol)

    def _on_peer_left(self, channel: PeerChannel, clean: bool) -> None:
        peer_id = channel.id
        peer = self._peers.pop(peer_id, None)
        if peer is None:
            return
        mates = (
            self._groups.mates(peer_id) if self._gd_mp_api and self._relay.rooms else frozenset()
        )
        self._groups.peer_left(peer_id, peer.shard_index())
        if self._cluster is not None:
            self._cluster.local_left(peer_id, clean)
        if self._gd_mp_api:
            self._relay.peer_left(peer_id, mates)
            self.emit_signal("peer_disconnected", peer_id)
        else:
            self.emit_signal("client_disconnected", peer_id, clean)

    def _on_close_requested(self, peer_id: int, code: int, reason: str) -> None:
        self.emit_signal("client_close_request", peer_id, code, reason)

    def _on_shard_failed(self, index: int, reason: str) -> None:
        self.emit_signal("shard_failed", index, reason)

    # -- multiplayer mode (WebSocketMultiplayerPeer / NetworkedMultiplayerPeer) -----------------

    def _require_mp(self, member: str) -> bool:
        if not self._gd_mp_api or not self._listening:
            log.error("%s: only in multiplayer mode (listen with gd_mp_api=True)", member)
            return False
        return True

    def get_unique_id(self) -> int:
        """The server is always peer 1."""
        return m.SERVER_ID

    def set_target_peer(self, peer_id: int) -> None:
        """Where `put_packet` sends: 0 every peer, n one peer, -n every peer but n."""
        self._relay.set_target_peer(peer_id)

    def put_packet(self, data: bytes | bytearray | memoryview) -> Error:
        """Send a multiplayer packet from the server (``from`` = 1) to the target peer(s)."""
        if not self._require_mp("put_packet"):
            return Error.ERR_UNCONFIGURED
        return self._relay.put_packet(data)

    def get_available_packet_count(self) -> int:
        return self._relay.get_available_packet_count() if self._gd_mp_api else 0

    def get_packet_peer(self) -> int:
        """The sender of the next packet `get_packet` returns."""
        if not self._require_mp("get_packet_peer"):
            return m.SERVER_ID
        return self._relay.get_packet_peer()

    def get_packet(self) -> bytes:
        """The next multiplayer packet for the server (after the 9-byte header)."""
        if not self._require_mp("get_packet"):
            self._relay.set_packet_error(Error.ERR_UNCONFIGURED)
            return b""
        return self._relay.get_packet()

    def get_packet_error(self) -> Error:
        return self._relay.get_packet_error()

    def set_refuse_new_connections(self, enable: bool) -> None:
        """Drop new connections at once (as Godot does) while ``enable``."""
        self._refusing = bool(enable)
        if self._fleet is not None:
            self._fleet.set_refusing(self._refusing)

    def is_refusing_new_connections(self) -> bool:
        return self._refusing

    refuse_new_connections = property(is_refusing_new_connections, set_refuse_new_connections)

    def get_connection_status(self) -> int:
        return self.CONNECTION_CONNECTED if self._listening else self.CONNECTION_DISCONNECTED

    def get_transfer_mode(self) -> int:
        return self.TRANSFER_MODE_RELIABLE  # WebSocket is always reliable and ordered

    def set_transfer_mode(self, mode: int) -> None:
        """Accepted and ignored, as in Godot: WebSocket is always reliable."""

    def get_max_packet_size(self) -> int:
        """The outbound buffer less the 9-byte multiplayer header."""
        max_message = self.max_message_size or self._in_bytes_limit
        return self._outbound_limit(max_message) - m.MP_HEADER_SIZE

    def get_mp_stats(self) -> dict[str, int]:
        """Client frames the relay dropped, by reason: short, type, from, target, group (relay
        groups: to a peer the sender shares no group with); and packets
        for the server that `multiplayer` dropped, by reason (``rpc_*``,
        `wsfleet.multiplayer.DROP_REASONS`)."""
        return self._relay.stats()

    @property
    def multiplayer(self) -> MultiplayerAPI:
        """Godot's high-level multiplayer API on the server's side (``gd_mp_api`` mode):
        nodes, RPCs, rsets (`wsfleet.multiplayer`)."""
        return self._relay.api

    def __del__(self) -> None:
        # An abandoned server still ends its processes (the lifeline would too, at exit).
        if getattr(self, "_listening", False):
            try:
                self.stop()
            except Exception:
                pass


class _ClusterDelivery:
    """What the cluster (`wsfleet.cluster`) asks of the server: other nodes' sends,
    closes and broadcasts for this node's peers, the snapshot of them, the signals."""

    __slots__ = ("_server",)

    def __init__(self, server: WebSocketServer) -> None:
        self._server = server

    def deliver(self, peer_id: int, text: bool, payload: bytes) -> Error:
        peer = self._server._peers.get(peer_id)
        if peer is None:
            return Error.ERR_DOES_NOT_EXIST
        return peer.put_message(payload, text)

    def close_local(self, peer_id: int, code: int, reason: bytes) -> Error:
        peer = self._server._peers.get(peer_id)
        if peer is None:
            return Error.ERR_DOES_NOT_EXIST
        try:
            peer.close(code, reason.decode(errors="replace"))
        except ValueError as exc:
            log.error("cluster: a close of peer %d from another node: %s", peer_id, exc)
            return Error.ERR_INVALID_PARAMETER
        return Error.OK

    def broadcast_local(
        self, payload: bytes, text: bool, exclude: frozenset[int], group: bytes | None
    ) -> None:
        server = self._server
        fleet = server._fleet
        if fleet is None:
            return
        flags = m.FLAG_TEXT if text else 0
        if group is None:
            fleet.broadcast(payload, flags, list(exclude))
        else:
            shards = server._groups.shards_of(group.decode(errors="replace"))
            if shards:
                fleet.broadcast_group(group, payload, flags, list(exclude), shards)

    def local_peers(self) -> list[tuple[int, str, int, str]]:
        return [
            (peer_id, peer.get_connected_host(), peer.get_connected_port(), peer.protocol)
            for peer_id, peer in self._server._peers.items()
        ]

    def remote_peer(self, peer_id: int, node: str, connected: bool) -> None:
        server = self._server
        if server._gd_mp_api:
            server._relay.remote_peer(peer_id, connected)
        signal = "remote_peer_connected" if connected else "remote_peer_disconnected"
        server.emit_signal(signal, peer_id, node)

    def mp_frame(self, sender: int, frame: bytes) -> None:
        server = self._server
        if server._gd_mp_api:
            server._relay.remote_frame(sender, frame)

    def emit(self, signal: str, *args: Any) -> None:
        self._server.emit_signal(signal, *args)
