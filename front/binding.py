"""Where the server listens: ``bind_ip`` -> addresses -> one listening socket per shard each.

Owns the resolution of ``bind_ip`` (``"*"``, an IP address or a host name,
which resolves to every address it has: ``"localhost"`` -> 127.0.0.1 and ::1
where the machine has it), the free-port probe, the ``SO_REUSEPORT`` sockets
the shards inherit (one per shard per address) and `format_url`, which
writes a URL for any of those addresses (IPv6 in brackets).

Imports the standard library and `wsfleet.errors` only.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import re
import socket
from dataclasses import dataclass

from .errors import Error

log = logging.getLogger("wsfleet")

LISTEN_BACKLOG = 1024
#: What may be a host name: letters, digits, hyphens, underscores and dots.  Whether it
#: names anything (and the rules of each label) is the resolver's business, at listen().
_HOST_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
#: Tries to find a port free on every address when port 0 asks for any.
_PORT_TRIES = 16


class BindError(Exception):
    """``listen()`` cannot listen there: ``error`` is its `Error`; the message was logged."""

    def __init__(self, error: Error, message: str) -> None:
        super().__init__(message)
        self.error = error


@dataclass(frozen=True, slots=True)
class Address:
    """One address to listen on: its family, its text, and whether IPv6 also takes IPv4."""

    family: socket.AddressFamily
    host: str
    #: ``IPV6_V6ONLY`` for an IPv6 socket: off for ``"*"`` (one socket takes IPv4 too), on
    #: for the addresses of a host name (they never collide with its IPv4 ones), the
    #: system's default (None) for an address given as such.
    v6only: bool | None = None
    scope_id: int = 0

    def sockaddr(self, port: int) -> tuple:
        if self.family == socket.AF_INET6:
            return (self.host, port, 0, self.scope_id)
        return (self.host, port)


def check_bind_ip(value: str) -> str:
    """``value`` if it is ``"*"``, an IP address or may be a host name; else ValueError.

    ("not an address", "host:port", "" are not; whether a name resolves is
    seen by ``listen``, which returns ``ERR_CANT_RESOLVE`` if it does not.)
    """
    if not isinstance(value, str):
        raise ValueError(f"bind_ip must be a string: {value!r}")
    if value == "*" or _is_ip(value):
        return value
    if len(value) > 253 or not _HOST_NAME.fullmatch(value):
        raise ValueError(f"bind_ip must be '*', an IP address or a host name: {value!r}")
    return value


def _is_ip(value: str) -> bool:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return False
    return True


def resolve(bind_ip: str) -> list[Address]:
    """Every address ``bind_ip`` stands for, in the resolver's order, each once.

    Raises `BindError` (``ERR_CANT_RESOLVE``) for a name that does not resolve.
    """
    if bind_ip == "*":
        if socket.has_ipv6 and _ipv6_works():
            return [Address(socket.AF_INET6, "::", v6only=False)]
        return [Address(socket.AF_INET, "0.0.0.0")]
    literal = _is_ip(bind_ip)
    try:
        flags = socket.AI_NUMERICHOST if literal else 0
        infos = socket.getaddrinfo(bind_ip, None, type=socket.SOCK_STREAM, flags=flags)
    except (socket.gaierror, UnicodeError) as exc:
        # UnicodeError: Python's IDNA encoding refuses the name (a label over 63 bytes).
        reason = exc.strerror if isinstance(exc, socket.gaierror) else "not a valid host name"
        message = f"listen: cannot resolve bind_ip {bind_ip!r}: {reason or exc}"
        log.error("%s", message)
        raise BindError(Error.ERR_CANT_RESOLVE, message) from None
    addresses: list[Address] = []
    for family, _type, _proto, _name, sockaddr in infos:
        if family not in (socket.AF_INET, socket.AF_INET6):
            continue
        scope = sockaddr[3] if family == socket.AF_INET6 else 0
        v6only = None if literal or family != socket.AF_INET6 else True
        address = Address(family, sockaddr[0], v6only=v6only, scope_id=scope)
        if address not in addresses:
            addresses.append(address)
    if not addresses:
        message = f"listen: bind_ip {bind_ip!r} has no IPv4 or IPv6 address"
        log.error("%s", message)
        raise BindError(Error.ERR_CANT_RESOLVE, message)
    return addresses


def bind(addresses: list[Address], port: int, shards: int) -> tuple[int, list[list[socket.socket]]]:
    """Listening sockets for ``shards`` shards: ``(port, [one socket per address] per shard)``.

    ``port`` 0 takes a port that is free on every address.  Raises `BindError`.
    """
    port = _free_port(addresses, port)
    per_shard: list[list[socket.socket]] = []
    address = addresses[0]
    try:
        for _ in range(shards):
            socks: list[socket.socket] = []
            per_shard.append(socks)
            for address in addresses:
                sock = _socket(address, reuse_port=True)
                socks.append(sock)
                sock.bind(address.sockaddr(port))
                sock.listen(LISTEN_BACKLOG)
                sock.setblocking(False)
    except OSError as exc:
        for socks in per_shard:
            for sock in socks:
                sock.close()
        raise _bind_error(exc, address, port) from None
    return port, per_shard


def format_url(scheme: str, host: str, port: int, path: str = "") -> str:
    """``scheme://host:port`` + ``path``, with an IPv6 address in brackets (``ws://[::1]:9080``)."""
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{scheme}://{host}:{port}{path}"


def _free_port(addresses: list[Address], port: int) -> int:
    """A port no one holds on any of ``addresses`` (``port`` itself unless it is 0).

    ``SO_REUSEPORT`` alone would let us join another server's group on this
    port: each address is bound once without it first, to see whether the
    port is free.  With port 0 the first address picks one, which another
    address may have taken: then try another.
    """
    for attempt in range(_PORT_TRIES):
        probes: list[socket.socket] = []
        chosen = port
        address = addresses[0]
        try:
            for address in addresses:
                probe = _socket(address, reuse_port=False)
                probes.append(probe)
                probe.bind(address.sockaddr(chosen))
                chosen = probe.getsockname()[1]
            return chosen
        except OSError as exc:
            retry = port == 0 and exc.errno == errno.EADDRINUSE and attempt + 1 < _PORT_TRIES
            if not retry:
                raise _bind_error(exc, address, chosen) from None
        finally:
            for probe in probes:
                probe.close()
    raise AssertionError("unreachable")


def _socket(address: Address, reuse_port: bool) -> socket.socket:
    sock = socket.socket(address.family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if address.family == socket.AF_INET6 and address.v6only is not None:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, int(address.v6only))
    except OSError:
        sock.close()
        raise
    return sock


def _ipv6_works() -> bool:
    """Python may be built with IPv6 on a kernel that has it off."""
    try:
        socket.socket(socket.AF_INET6, socket.SOCK_STREAM).close()
    except OSError:
        return False
    return True


def _bind_error(exc: OSError, address: Address, port: int) -> BindError:
    message = f"listen: cannot listen on {address.host} port {port}: {exc.strerror or exc}"
    log.error("%s", message)
    if exc.errno == errno.EADDRINUSE:
        return BindError(Error.ERR_ALREADY_IN_USE, message)
    if exc.errno in (errno.EADDRNOTAVAIL, errno.EINVAL, errno.EAFNOSUPPORT):
        return BindError(Error.ERR_INVALID_PARAMETER, message)
    return BindError(Error.ERR_CANT_CREATE, message)
