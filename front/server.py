"""``WebSocketServer``: Godot 3.2's API in the user's process, over N shard processes.

``listen()`` binds one ``SO_REUSEPORT`` socket per shard and starts the
supervisor (a fresh interpreter), which forks the shards and sends each
shard's rings back over the control channel.  ``poll()`` never blocks: it
drains every shard's events ring, keeps inbound messages per peer and emits
the signals; commands (``put_packet``, closes, broadcasts) go to the owning
shard's commands ring, found from the peer id by arithmetic.
"""

from __future__ import annotations

import bisect
import errno
import ipaddress
import logging
import os
import select
import socket
import ssl
import subprocess
import sys
import time
from collections import deque
from collections.abc import Iterable
from typing import Any

from wsfleet.ipc import Consumer, Lifeline, Producer, Record, RingFds, SharedRing, control
from wsfleet.ipc import messages as m
from wsfleet.ipc.ring import DEFAULT_MAX_MESSAGE

from .errors import Error
from .peer import WebSocketPeer, check_close
from .signals import SignalEmitter

log = logging.getLogger("wsfleet")

DEFAULT_RING_CAPACITY = 1 << 20
DEFAULT_HANDSHAKE_TIMEOUT = 5.0
DEFAULT_MAX_REQUEST_BYTES = 8192
DEFAULT_PING_INTERVAL = 20.0
DEFAULT_PING_TIMEOUT = 20.0
#: Close codes that fit a peer dropped for not reading: policy violation, try again later.
SLOW_CONSUMER_CLOSE_CODES = (1008, 1013)
_MIN_REQUEST_BYTES = 256
_LISTEN_BACKLOG = 1024
_STOP_TIMEOUT = 6.0
_STOP_DRAIN_TIMEOUT = 2.0
_YIELDS_BEFORE_SLEEP = 8


def _pow2_at_least(value: int) -> int:
    return 1 << max(0, value - 1).bit_length()


def _load_pem(value: str | bytes | None) -> str | None:
    """PEM text as given, or read from the file it names."""
    if value is None or value == "":
        return None
    if isinstance(value, bytes):
        value = value.decode()
    if "-----BEGIN" in value:
        return value
    with open(value, encoding="ascii") as f:
        return f.read()


class _ShardLink:
    """The front's end of one shard: its two rings and the peers it owns."""

    __slots__ = (
        "index",
        "pid",
        "events_ring",
        "commands_ring",
        "events",
        "commands",
        "backlog",
        "peers",
    )

    def __init__(self, index: int, pid: int, fds: list[int]) -> None:
        self.index = index
        self.pid = pid
        self.events_ring = SharedRing.attach(RingFds(*fds[:3]))
        self.commands_ring = SharedRing.attach(RingFds(*fds[3:6]))
        self.events = Consumer(self.events_ring)
        self.commands = Producer(self.commands_ring)
        # Commands not yet in the ring, in order: those of this poll() (pushed together
        # when it ends, one C loop for the batch) and those a full ring did not take
        # (bounded by the per-peer limits).
        self.backlog: list[Record] = []
        self.peers: set[int] = set()

    def close(self) -> None:
        self.events_ring.close()
        self.commands_ring.close()


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
    ``slow_consumer_close_code`` (None: off; 1008 or 1013)
        By default `WebSocketPeer.put_packet` returns ``ERR_OUT_OF_MEMORY``
        while a peer's outbound buffer (`set_buffers`) is full and the peer
        stays.  With a code, that ``put_packet`` still returns
        ``ERR_OUT_OF_MEMORY`` (the packet is not sent) and the peer is
        disconnected with that code: a close frame, then the TCP connection is
        closed (cut after 1 s if the peer does not read it), and
        ``client_disconnected(id, False)`` follows.  Packets sent in one
        `poll` tick count until the shard hands them to the kernel, so size the
        output buffer for a tick's burst.
    """

    SIGNALS = (
        "client_connected",
        "client_disconnected",
        "client_close_request",
        "data_received",
        "shard_failed",
        # Multiplayer mode (gd_mp_api=True), as WebSocketMultiplayerPeer emits them:
        "peer_connected",
        "peer_disconnected",
        "peer_packet",
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
        max_message_size: int | None = None,
        max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
        allowed_origins: Iterable[str] | None = None,
        require_origin: bool = False,
        ping_interval: float | None = DEFAULT_PING_INTERVAL,
        ping_timeout: float | None = DEFAULT_PING_TIMEOUT,
        slow_consumer_close_code: int | None = None,
    ) -> None:
        super().__init__()
        if shards is None:
            shards = len(os.sched_getaffinity(0))
        if shards < 1:
            raise ValueError(f"shards must be at least 1: {shards}")
        self.shards = shards
        self.ring_capacity = ring_capacity
        # The limits (see the class docstring); checked again by listen().
        self.handshake_timeout = handshake_timeout
        self.max_peers = max_peers
        self.max_message_size = max_message_size
        self.max_request_bytes = max_request_bytes
        if allowed_origins is not None and not isinstance(allowed_origins, (str, bytes)):
            allowed_origins = list(allowed_origins)  # an iterator would be spent by the check
        self.allowed_origins = allowed_origins
        self.require_origin = require_origin
        self.ping_interval = ping_interval
        self.ping_timeout = ping_timeout
        self.slow_consumer_close_code = slow_consumer_close_code
        self._slow_close_code: int | None = None  # the one taken by listen()
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
        self._peers: dict[int, WebSocketPeer] = {}
        self._links: list[_ShardLink | None] = []
        self._failed: dict[int, str] = {}  # shards the supervisor gave up: index -> reason
        self._id_span = m.id_span(shards)
        self._supervisor: subprocess.Popen | None = None
        self._control: socket.socket | None = None
        self._lifeline: Lifeline | None = None
        self._epoll: select.epoll | None = None
        self._select_mode = False
        self._in_poll = False
        self._refusing = False
        # Multiplayer mode: packets for the server (sender, payload), the target of
        # put_packet, what get_packet reported, and client frames dropped by reason.
        self._mp_inbox: deque[tuple[int, bytes]] = deque()
        self._target_peer = 0
        self._mp_packet_error = Error.OK
        self._mp_drops = dict.fromkeys(m.DROP_REASONS, 0)
        self._mp_ids: list[int] = []  # every welcomed peer, ascending (Godot's join order)
        self._limits_config()  # ValueError now rather than an error from listen()

    # -- properties --------------------------------------------------------------------------

    @property
    def bind_ip(self) -> str:
        """The address to listen on: ``"*"`` (every address, IPv4 and IPv6) or an IP."""
        return self._bind_ip

    @bind_ip.setter
    def bind_ip(self, value: str) -> None:
        if self._listening:
            raise RuntimeError("bind_ip cannot change while the server is listening")
        if value != "*":
            ipaddress.ip_address(value)  # ValueError for anything but an IP
        self._bind_ip = value

    @property
    def port(self) -> int:
        """The port listened on (useful after ``listen(0)``)."""
        return self._port

    # -- WebSocketServer ----------------------------------------------------------------------

    def set_buffers(
        self, input_buffer_size_kb: int, input_max_packets: int, output_buffer_size_kb: int,
        output_max_packets: int,
    ) -> Error:  # fmt: skip
        """Per-peer limits, each rounded up to a power of two (Godot's rule). Before `listen`.

        The input buffer is also the largest message a peer may send (longer:
        close 1009) unless ``max_message_size`` says otherwise.
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
        protocols = [p.strip() for p in protocols]
        try:
            limits = self._limits_config()
        except ValueError as exc:
            log.error("listen: %s", exc)
            return Error.ERR_INVALID_PARAMETER
        try:
            tls = self._tls_config()
        except (OSError, ssl.SSLError, ValueError) as exc:
            log.error("listen: cannot use the TLS certificate/key: %s", exc)
            return Error.ERR_CANT_CREATE
        sockets, error = self._bind(port)
        if error != Error.OK:
            return error
        self._gd_mp_api = gd_mp_api
        self._slow_close_code = self.slow_consumer_close_code
        try:
            self._start_supervisor(sockets, protocols, tls, limits)
        except OSError as exc:
            log.error("listen: cannot start the supervisor: %s", exc)
            self._teardown()
            return Error.ERR_CANT_CREATE
        finally:
            for sock in sockets:
                sock.close()  # the supervisor and the shards hold them now
        self._gd_mp_api = gd_mp_api
        self._listening = True
        return Error.OK

    def _limits_config(self) -> dict[str, Any]:
        """The limits as the shards take them (config ``limits``); ValueError if one is bad."""
        if not self.handshake_timeout > 0:
            raise ValueError(f"handshake_timeout must be positive: {self.handshake_timeout}")
        max_peers = self.max_peers or 0
        if max_peers < 0:
            raise ValueError(f"max_peers must be None, 0 (no limit) or positive: {max_peers}")
        max_message = self.max_message_size
        if max_message is None:
            max_message = self._in_bytes_limit
        elif not 1 <= max_message <= DEFAULT_MAX_MESSAGE:
            raise ValueError(f"max_message_size must be 1 to {DEFAULT_MAX_MESSAGE}: {max_message}")
        if self.max_request_bytes < _MIN_REQUEST_BYTES:
            raise ValueError(
                f"max_request_bytes must be at least {_MIN_REQUEST_BYTES}: {self.max_request_bytes}"
            )
        origins = self.allowed_origins
        if isinstance(origins, (str, bytes)):
            raise ValueError("allowed_origins is a list of origins, not one string")
        if origins is not None:
            origins = sorted({str(origin).strip() for origin in origins})
        ping_interval = self.ping_interval or None
        ping_timeout = self.ping_timeout or None
        for name, value in (("ping_interval", ping_interval), ("ping_timeout", ping_timeout)):
            if value is not None and value < 0:
                raise ValueError(f"{name} must be None, 0 (off) or positive: {value}")
        code = self.slow_consumer_close_code
        if code is not None and code not in SLOW_CONSUMER_CLOSE_CODES:
            raise ValueError(f"slow_consumer_close_code must be None, 1008 or 1013: {code}")
        return {
            "handshake_timeout": float(self.handshake_timeout),
            "max_peers": int(max_peers),
            "max_message": int(max_message),
            "max_request_bytes": int(self.max_request_bytes),
            "allowed_origins": origins,
            "require_origin": bool(self.require_origin),
            "ping_interval": ping_interval,
            "ping_timeout": ping_timeout,
        }

    def _tls_config(self) -> dict[str, str] | None:
        key, cert = _load_pem(self.private_key), _load_pem(self.ssl_certificate)
        if key is None and cert is None:
            return None
        if key is None or cert is None:
            raise ValueError("TLS needs both private_key and ssl_certificate")
        chain = _load_pem(self.ca_chain)
        # Check here, so that a bad file is a clear listen() error and not a shard that cannot boot.
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        for pem in (cert, key, chain):
            if pem is not None and "-----BEGIN" not in pem:
                raise ValueError("not a PEM file")
        fd_cert, fd_key = os.memfd_create("wsfleet-cert"), os.memfd_create("wsfleet-key")
        try:
            os.write(fd_cert, cert.encode())
            os.write(fd_key, key.encode())
            context.load_cert_chain(f"/proc/self/fd/{fd_cert}", f"/proc/self/fd/{fd_key}")
        finally:
            os.close(fd_cert)
            os.close(fd_key)
        return {"cert": cert, "key": key, "chain": chain or ""}

    def _address(self) -> tuple[socket.AddressFamily, str]:
        if self._bind_ip == "*":
            return (socket.AF_INET6, "::") if socket.has_ipv6 else (socket.AF_INET, "0.0.0.0")
        family = (
            socket.AF_INET6 if ipaddress.ip_address(self._bind_ip).version == 6 else socket.AF_INET
        )
        return family, self._bind_ip

    def _bind(self, port: int) -> tuple[list[socket.socket], Error]:
        family, host = self._address()
        # SO_REUSEPORT alone would let us join another server's group on this
        # port: bind once without it first, to see whether the port is free.
        probe = socket.socket(family, socket.SOCK_STREAM)
        try:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6 and host == "::":
                probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            probe.bind((host, port))
            port = probe.getsockname()[1]
        except OSError as exc:
            probe.close()
            return [], self._bind_error(exc, host, port)
        probe.close()
        sockets: list[socket.socket] = []
        try:
            for _ in range(self.shards):
                sock = socket.socket(family, socket.SOCK_STREAM)
                sockets.append(sock)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                if family == socket.AF_INET6 and host == "::":
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
                sock.bind((host, port))
                sock.listen(_LISTEN_BACKLOG)
                sock.setblocking(False)
        except OSError as exc:
            for sock in sockets:
                sock.close()
            return [], self._bind_error(exc, host, port)
        self._port = port
        return sockets, Error.OK

    @staticmethod
    def _bind_error(exc: OSError, host: str, port: int) -> Error:
        log.error("listen: cannot listen on %s port %d: %s", host, port, exc.strerror or exc)
        if exc.errno == errno.EADDRINUSE:
            return Error.ERR_ALREADY_IN_USE
        if exc.errno in (errno.EADDRNOTAVAIL, errno.EINVAL, errno.EAFNOSUPPORT):
            return Error.ERR_INVALID_PARAMETER
        return Error.ERR_CANT_CREATE

    def _start_supervisor(
        self,
        sockets: list[socket.socket],
        protocols: list[str],
        tls: dict[str, str] | None,
        limits: dict[str, Any],
    ) -> None:
        ours, theirs = control.socketpair()
        lifeline = Lifeline()  # we hold it; the supervisor watches it
        listen_fds = [sock.fileno() for sock in sockets]
        try:
            self._supervisor = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "wsfleet.supervisor",
                    "--control-fd",
                    str(theirs.fileno()),
                    "--lifeline-fd",
                    str(lifeline.watch_fd),
                    "--listen-fds",
                    ",".join(map(str, listen_fds)),
                ],  # fmt: skip
                pass_fds=(theirs.fileno(), lifeline.watch_fd, *listen_fds),
                stdin=subprocess.DEVNULL,
            )
        finally:
            theirs.close()
            os.close(lifeline.watch_fd)
            lifeline.watch_fd = -1
        self._control = ours
        self._lifeline = lifeline
        control.send(
            ours,
            {
                "type": "config",
                "protocols": protocols,
                "limits": limits,
                "ring_capacity": self.ring_capacity,
                "tls": tls,
                "gd_mp_api": self._gd_mp_api,
            },
        )
        ours.setblocking(False)
        self._links = [None] * self.shards
        self._failed = {}
        self._epoll = select.epoll()
        self._epoll.register(ours.fileno(), select.EPOLLIN)

    def stop(self) -> None:
        """Stop listening and close every peer (close 1001). No signals are emitted, as in Godot.

        Packets already sent (`WebSocketPeer.put_packet`, broadcasts) reach
        their peers before the close frame, even those of the current `poll`
        tick that the commands rings could not take yet.  Bounded: at most
        ``_STOP_DRAIN_TIMEOUT`` waiting for shards to take the queued
        commands, then ``_STOP_TIMEOUT`` for the supervisor (which gives the
        shards its own grace, then kills them) before it is killed.
        """
        if not self._listening:
            return
        self._listening = False
        self._drain_backlogs(time.monotonic() + _STOP_DRAIN_TIMEOUT)
        if self._control is not None:
            try:
                control.send(self._control, {"type": "stop"})
            except OSError:
                pass
        if self._supervisor is not None:
            try:
                self._supervisor.wait(_STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                log.error("stop: the supervisor did not exit in time; killing it")
                self._supervisor.kill()
                self._supervisor.wait()
        self._teardown()

    def _drain_backlogs(self, deadline: float) -> None:
        """Push every queued command into the rings, while the shards make room, until ``deadline``.

        One flush takes only what the rings have room for; a tick that sent
        more than a ring holds keeps the rest in ``backlog``, which the shards'
        SIGTERM would otherwise cut off.
        """
        self._flush_commands()
        while any(link is not None and link.backlog for link in self._links):
            if time.monotonic() >= deadline:
                log.error("stop: a shard did not take its queued commands in time")
                return
            time.sleep(0.001)
            self._flush_commands()

    def _teardown(self) -> None:
        for peer in self._peers.values():
            peer._connected = False
            peer._inbox.clear()
        self._peers.clear()
        self._mp_inbox.clear()
        self._mp_ids.clear()
        for link in self._links:
            if link is not None:
                link.close()
        self._links = []
        if self._epoll is not None:
            self._epoll.close()
            self._epoll = None
        if self._control is not None:
            self._control.close()
            self._control = None
        if self._lifeline is not None:
            self._lifeline.close()
            self._lifeline = None
        self._supervisor = None
        self._select_mode = False

    def is_listening(self) -> bool:
        return self._listening

    def has_peer(self, peer_id: int) -> bool:
        return peer_id in self._peers

    def get_peer(self, peer_id: int) -> WebSocketPeer | None:
        peer = self._peers.get(peer_id)
        if peer is None:
            log.error("get_peer: no peer %d", peer_id)
        return peer

    def get_peer_address(self, peer_id: int) -> str:
        peer = self._peers.get(peer_id)
        if peer is None:
            log.error("get_peer_address: no peer %d", peer_id)
            return ""
        return peer._ip

    def get_peer_port(self, peer_id: int) -> int:
        peer = self._peers.get(peer_id)
        return 0 if peer is None else peer._port

    def disconnect_peer(self, peer_id: int, code: int = 1000, reason: str = "") -> None:
        """Start the close handshake with a peer; it leaves in a later `poll`."""
        peer = self._peers.get(peer_id)
        if peer is None:
            check_close(code, reason)
            log.error("disconnect_peer: no peer %d", peer_id)
            return
        peer.close(code, reason)

    def get_peers(self) -> list[int]:
        """The ids of every connected peer."""
        return list(self._peers)

    def get_peer_shard(self, peer_id: int) -> int:
        """The index of the shard that holds the peer's connection (-1 if unknown)."""
        peer = self._peers.get(peer_id)
        return -1 if peer is None else peer._link.index

    def get_shard_status(self) -> list[dict[str, Any]]:
        """Per shard: index, pid (None while it is down), peers, state and reason.

        ``state`` is ``"running"``, ``"down"`` (not started yet, or dead and
        about to be restarted by the supervisor) or ``"failed"`` (given up for good, see the
        ``shard_failed`` signal); ``reason`` says why it failed, else None.
        """
        return [
            {
                "shard": index,
                "pid": link.pid if link else None,
                "peers": len(link.peers) if link else 0,
                "state": "running" if link else "failed" if index in self._failed else "down",
                "reason": self._failed.get(index),
            }
            for index, link in enumerate(self._links)
        ]

    def broadcast(
        self,
        data: bytes | bytearray | memoryview | str,
        text: bool = False,
        exclude: Iterable[int] = (),
    ) -> Error:
        """Send one message to every peer (but ``exclude``), encoded once per shard."""
        if not self._listening:
            return Error.ERR_UNCONFIGURED
        payload = data.encode() if isinstance(data, str) else bytes(data)
        if text:
            try:
                payload.decode()
            except UnicodeDecodeError:
                log.error("broadcast: text messages must be UTF-8")
                return Error.ERR_INVALID_PARAMETER
        by_shard: dict[int, list[int]] = {}
        for peer_id in exclude:
            by_shard.setdefault(m.owner_of(peer_id, self._id_span), []).append(peer_id)
        for link in self._links:
            if link is not None and link.peers:
                body = m.encode_broadcast(payload, by_shard.get(link.index, ()))
                self._command(link, m.CMD_BROADCAST, 0, m.FLAG_TEXT if text else 0, body)
        return Error.OK

    # -- polling ------------------------------------------------------------------------------

    def fileno(self) -> int:
        """A descriptor that becomes readable when `poll` has something to do (for select)."""
        if self._epoll is None:
            raise RuntimeError("fileno: the server is not listening")
        self._select_mode = True
        self._arm_all()
        return self._epoll.fileno()

    def poll(self, timeout: float | None = None) -> None:
        """Take every event the shards have and emit the signals; never blocks by default.

        With ``timeout`` (seconds), wait up to that long for something to
        happen when nothing is pending.
        """
        if not self._listening:
            return
        self._in_poll = True
        try:
            if self._select_mode:
                self._disarm_all()
            self._flush_commands()
            handled = self._read_control() + self._drain_events()
            if not handled and timeout and self._epoll is not None:
                if not self._yield_for_events() and not self._arm_all():
                    self._epoll.poll(timeout)
                self._disarm_all()
                self._read_control()
                self._drain_events()
            self._flush_commands()
            if self._select_mode:
                self._arm_all()
        finally:
            self._in_poll = False

    def _yield_for_events(self) -> bool:
        """Let the shards run a moment before sleeping; True if events came meanwhile.

        Sleeping costs each shard a doorbell (an eventfd write and a wake-up)
        for its next batch.  A busy shard usually publishes within a few
        scheduler yields, on another core or on this one (where the yield is
        what lets it run).
        """
        links = [link for link in self._links if link is not None]
        for _ in range(_YIELDS_BEFORE_SLEEP):
            os.sched_yield()
            for link in links:
                if link.events.has_records():
                    return True
        return False

    def _arm_all(self) -> bool:
        """Ask every shard to ring when it publishes; True if one already has (self-rung)."""
        pending = False
        for link in self._links:
            if link is not None and link.events.arm():
                pending = True
                if self._select_mode:
                    os.eventfd_write(link.events.fileno(), 1)  # so select() sees it
        return pending

    def _disarm_all(self) -> None:
        for link in self._links:
            if link is not None:
                link.events.disarm()

    def _drain_events(self) -> int:
        count = 0
        for link in self._links:
            if not self._listening:
                break  # a handler called stop(): the other links are closed now
            if link is not None:
                records = link.events.pop_all()
                if records:
                    count += len(records)
                    self._dispatch(link, records)
        return count

    def _dispatch(self, link: _ShardLink, records: list[Record]) -> None:
        # The per-message path of every application: names are bound to locals once.
        peers = self._peers
        on_data = self._handlers["data_received"]
        in_packets_limit = self._in_packets_limit
        in_bytes_limit = self._in_bytes_limit
        ev_binary, ev_text = m.EV_BINARY, m.EV_TEXT
        for kind, peer_id, flags, payload in records:
            if kind == ev_binary or kind == ev_text:
                peer = peers.get(peer_id)
                if peer is None:
                    continue
                inbox = peer._inbox
                inbox.append((payload, kind == ev_text))
                peer._inbox_bytes += len(payload)
                if not peer._reading_paused and (
                    len(inbox) >= in_packets_limit or peer._inbox_bytes >= in_bytes_limit
                ):
                    peer._reading_paused = True
                    self._command(link, m.CMD_PAUSE_READING, peer_id, 0, b"")
                for handler in on_data:
                    try:
                        handler(peer_id)
                    except Exception:
                        log.exception("error in a 'data_received' handler")
            elif kind == m.EV_CREDITS:
                for credited_id, packets, size in m.decode_credits(payload):
                    peer = peers.get(credited_id)
                    if peer is not None:
                        peer._out_packets -= packets
                        peer._out_bytes -= size
            elif kind == m.EV_MP_FRAME:
                self._mp_frame(link, peer_id, payload)
            elif kind == m.EV_CONNECTED:
                if not self._listening:
                    continue  # stop() from a handler of this batch: the peer is being closed
                ip, port, protocol = m.decode_connected(payload)
                peers[peer_id] = WebSocketPeer(self, peer_id, link, ip, port, protocol)
                link.peers.add(peer_id)
                if self._gd_mp_api:
                    self._mp_welcome(link, peer_id)
                    self.emit_signal("peer_connected", peer_id)
                else:
                    self.emit_signal("client_connected", peer_id, protocol)
            elif kind == m.EV_CLOSE_REQUEST:
                if peer_id in peers:
                    code, reason = m.decode_close(payload)
                    self.emit_signal("client_close_request", peer_id, code, reason)
            elif kind == m.EV_DISCONNECTED:
                self._peer_left(link, peer_id, bool(flags & m.FLAG_CLEAN))
            elif kind == m.EV_MP_DROPS:
                for reason, count in zip(m.DROP_REASONS, m.decode_drops(payload), strict=True):
                    self._mp_drops[reason] += count
            else:
                log.error("unknown event kind %d from shard %d", kind, link.index)

    def _peer_left(self, link: _ShardLink, peer_id: int, clean: bool) -> None:
        peer = self._peers.pop(peer_id, None)
        if peer is None:
            return
        link.peers.discard(peer_id)
        peer._connected = False
        peer._inbox.clear()
        if self._gd_mp_api:
            index = bisect.bisect_left(self._mp_ids, peer_id)
            if index < len(self._mp_ids) and self._mp_ids[index] == peer_id:
                del self._mp_ids[index]
            self._mp_sys_all(m.SYS_DEL, peer_id)
            self.emit_signal("peer_disconnected", peer_id)
        else:
            self.emit_signal("client_disconnected", peer_id, clean)

    def _maybe_resume_reading(self, peer: WebSocketPeer) -> None:
        if (
            len(peer._inbox) <= self._in_packets_limit // 2
            and peer._inbox_bytes <= self._in_bytes_limit // 2
        ):
            peer._reading_paused = False
            self._command(peer._link, m.CMD_RESUME_READING, peer._id, 0, b"")

    # -- commands -----------------------------------------------------------------------------

    def _command(
        self, link: _ShardLink, kind: int, peer_id: int, flags: int, payload: bytes
    ) -> None:
        link.backlog.append((kind, peer_id, flags, payload))
        if not self._in_poll:
            # Outside poll() (a timer, another task): send now rather than at the next poll.
            self._flush_link(link)

    def _flush_commands(self) -> None:
        for link in self._links:
            if link is not None:
                self._flush_link(link)

    @staticmethod
    def _flush_link(link: _ShardLink) -> None:
        if link.backlog:
            taken = link.commands.push_many(link.backlog)
            del link.backlog[:taken]
        link.commands.flush()

    # -- multiplayer mode (WebSocketMultiplayerPeer / NetworkedMultiplayerPeer) -----------------

    def _mp_welcome(self, link: _ShardLink, peer_id: int) -> None:
        """Godot's join: the new peer learns its id and every peer; every peer learns of it."""
        self._command(link, m.CMD_MP_WELCOME, peer_id, 0, m.encode_ids(self._mp_ids))
        bisect.insort(self._mp_ids, peer_id)
        self._mp_sys_all(m.SYS_ADD, peer_id)

    def _mp_sys_all(self, kind: int, subject: int) -> None:
        # One record per shard: the shard writes the message to each of its peers.
        for link in self._links:
            if link is not None and link.peers:
                self._command(link, m.CMD_MP_SYS_ALL, subject, kind, b"")

    def _mp_frame(self, source: _ShardLink, sender: int, frame: bytes) -> None:
        """A client frame the shard could not relay alone: for the server and/or other shards."""
        to = m.MP_HEADER.unpack_from(frame)[2]
        if to > 1:
            target = self._peers.get(to)
            if target is None:
                self._mp_drops["target"] += 1
            else:
                self._command(target._link, m.CMD_MP_FORWARD, sender, 0, frame)
            return
        if to != 1:  # 0 or -n: the peers of the other shards (the source shard did its own)
            for link in self._links:
                if link is not None and link is not source and link.peers:
                    self._command(link, m.CMD_MP_FORWARD, sender, 0, frame)
        if to == -1:
            return  # "everyone but the server" (Godot 3.2 delivers it to itself too: a bug)
        self._mp_inbox.append((sender, frame[m.MP_HEADER_SIZE :]))
        self.emit_signal("peer_packet", sender)

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
        self._target_peer = peer_id

    def put_packet(self, data: bytes | bytearray | memoryview) -> Error:
        """Send a multiplayer packet from the server (``from`` = 1) to the target peer(s)."""
        if not self._require_mp("put_packet"):
            return Error.ERR_UNCONFIGURED
        target = self._target_peer
        frame = m.MP_HEADER.pack(m.SYS_NONE, m.SERVER_ID, target) + bytes(data)
        if target > 1:
            peer = self._peers.get(target)
            if peer is None:
                log.error("put_packet: no peer %d", target)
                return Error.FAILED
            return peer._send(frame, m.CMD_SEND_BINARY)
        if target == m.SERVER_ID:
            return Error.OK  # as Godot: the server does not send to itself
        for link in self._links:
            if link is not None and link.peers:
                self._command(link, m.CMD_MP_FORWARD, m.SERVER_ID, 0, frame)
        return Error.OK

    def get_available_packet_count(self) -> int:
        return len(self._mp_inbox) if self._gd_mp_api else 0

    def get_packet_peer(self) -> int:
        """The sender of the next packet `get_packet` returns."""
        if not self._require_mp("get_packet_peer") or not self._mp_inbox:
            return 1
        return self._mp_inbox[0][0]

    def get_packet(self) -> bytes:
        """The next multiplayer packet for the server (after the 9-byte header)."""
        if not self._require_mp("get_packet"):
            self._mp_packet_error = Error.ERR_UNCONFIGURED
            return b""
        if not self._mp_inbox:
            self._mp_packet_error = Error.ERR_UNAVAILABLE
            return b""
        self._mp_packet_error = Error.OK
        return self._mp_inbox.popleft()[1]

    def get_packet_error(self) -> Error:
        return self._mp_packet_error

    def set_refuse_new_connections(self, enable: bool) -> None:
        """Drop new connections at once (as Godot does) while ``enable``."""
        self._refusing = bool(enable)
        for link in self._links:
            if link is not None:
                self._command(link, m.CMD_REFUSE, 0, int(self._refusing), b"")

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
        return self._out_bytes_limit - m.MP_HEADER_SIZE

    def get_mp_stats(self) -> dict[str, int]:
        """Client frames the relay dropped, by reason: short, type, from, target."""
        return dict(self._mp_drops)

    # -- the supervisor's notices -------------------------------------------------------------

    def _read_control(self) -> int:
        handled = 0
        while self._control is not None:
            try:
                received = control.receive(self._control)
            except BlockingIOError:
                break
            except OSError as exc:
                received = None
                log.error("lost the control channel to the supervisor: %s", exc)
            if received is None:
                self._supervisor_gone()
                break
            handled += 1
            message, fds = received
            kind = message.get("type")
            if kind == "shard_up":
                self._shard_up(message["shard"], message["pid"], fds)
            elif kind == "shard_down":
                self._shard_down(message["shard"])
            elif kind == "shard_failed":
                self._shard_failed(message["shard"], str(message.get("reason", "")))
            else:
                log.error("unknown message from the supervisor: %r", message)
            if kind != "shard_up":
                for fd in fds:
                    os.close(fd)
        return handled

    def _shard_up(self, index: int, pid: int, fds: list[int]) -> None:
        if self._links[index] is not None:
            self._shard_down(index)
        link = _ShardLink(index, pid, fds)
        self._links[index] = link
        if self._refusing:
            self._command(link, m.CMD_REFUSE, 0, 1, b"")
        if self._epoll is not None:
            self._epoll.register(link.events.fileno(), select.EPOLLIN)
        if self._select_mode:
            self._arm_all()

    def _shard_down(self, index: int) -> None:
        """A shard died: what it published still counts, then each of its peers is gone."""
        link = self._links[index]
        if link is None:
            return
        while True:
            records = link.events.pop_all()
            if not records:
                break
            self._dispatch(link, records)
        for peer_id in sorted(link.peers):
            self._peer_left(link, peer_id, False)
        if self._epoll is not None:
            self._epoll.unregister(link.events.fileno())
        self._links[index] = None
        link.close()

    def _shard_failed(self, index: int, reason: str) -> None:
        """The supervisor gave the shard up (its death, ``shard_down``, came first)."""
        log.error("shard %d was given up: %s", index, reason)
        self._failed[index] = reason
        self.emit_signal("shard_failed", index, reason)

    def _supervisor_gone(self) -> None:
        log.error("the supervisor exited: every shard is gone")
        for index, link in enumerate(self._links):
            if link is not None:
                self._shard_down(index)
        if self._control is not None:
            if self._epoll is not None:
                self._epoll.unregister(self._control.fileno())
            self._control.close()
            self._control = None

    def __del__(self) -> None:
        # An abandoned server still ends its processes (the lifeline would too, at exit).
        if getattr(self, "_listening", False):
            try:
                self.stop()
            except Exception:
                pass
