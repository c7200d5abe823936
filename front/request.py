"""The upgrade request a peer connected with, as the application sees it.

The shard that accepted the connection sends the request's head (request line
and header lines) with the peer's arrival; nothing is parsed until the
application asks (`WebSocketPeer.get_request`), so a server that never looks
pays one bytes object per connection and nothing more.

`HandshakeRequest` gives the path, the query (``urllib.parse``), the headers
(``websockets``' case-insensitive multi-dict: repeated headers are kept) and the
cookies (``http.cookies``).  `ForwardedPolicy` decides the client's real address
behind a proxy from ``X-Forwarded-For`` or ``Forwarded``, only for connections
from an address in ``forwarded_allow_ips`` (uvicorn's name and rules: the
rightmost address that is not itself a trusted proxy).

Imports the standard library and ``websockets`` only.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from functools import cached_property
from http.cookies import CookieError, SimpleCookie
from urllib.parse import parse_qs, unquote, urlsplit

from websockets.datastructures import Headers

_Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class HandshakeRequest:
    """One upgrade request: ``method``, ``target``, ``path``, ``query``, ``headers``,
    ``cookies`` (each parsed on first use)."""

    def __init__(self, head: bytes) -> None:
        self.raw = head
        line, _, rest = head.partition(b"\r\n")
        parts = line.split(b" ")
        self.method = parts[0].decode("latin-1") if parts else ""
        #: The request target as sent (``/game?room=7``).
        self.target = parts[1].decode("latin-1") if len(parts) > 1 else ""
        self._header_block = rest

    def __repr__(self) -> str:
        return f"<HandshakeRequest {self.method} {self.target}>"

    @cached_property
    def path(self) -> str:
        """The path, percent-decoded (``/game``)."""
        return unquote(urlsplit(self.target).path)

    @cached_property
    def query(self) -> dict[str, list[str]]:
        """The query string as ``{name: [values...]}`` (``?room=7&room=8``: two values)."""
        return parse_qs(urlsplit(self.target).query, keep_blank_values=True)

    @cached_property
    def headers(self) -> Headers:
        """Every header, case-insensitive; ``get_all(name)`` for one that is repeated."""
        headers = Headers()
        for line in self._header_block.split(b"\r\n"):
            name, colon, value = line.partition(b":")
            if colon:
                headers[name.strip().decode("latin-1")] = value.strip().decode("latin-1")
        return headers

    @cached_property
    def cookies(self) -> dict[str, str]:
        """The cookies of every ``Cookie`` header, by name (a malformed one is skipped)."""
        jar: dict[str, str] = {}
        for header in self.headers.get_all("Cookie"):
            cookie = SimpleCookie()
            try:
                cookie.load(header)
            except CookieError:
                continue
            jar.update({name: morsel.value for name, morsel in cookie.items()})
        return jar


class ForwardedPolicy:
    """Which connections may say who their client is (``forwarded_allow_ips``).

    ``allowed``: addresses or networks (``"10.0.0.1"``, ``"10.0.0.0/8"``), or
    ``"*"`` for every one.  Empty: nobody (the default), and `client` is never
    asked.
    """

    def __init__(self, allowed: Iterable[str]) -> None:
        self.any = False
        self._networks: list[_Network] = []
        for entry in allowed:
            entry = entry.strip()
            if entry == "*":
                self.any = True
            elif entry:
                try:
                    self._networks.append(ipaddress.ip_network(entry, strict=False))
                except ValueError:
                    raise ValueError(f"forwarded_allow_ips: not an address: {entry!r}") from None

    def __bool__(self) -> bool:
        return self.any or bool(self._networks)

    def trusts(self, address: str) -> bool:
        if self.any:
            return True
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in network for network in self._networks)

    def addresses(self, peer: str, request: HandshakeRequest) -> tuple[str, str]:
        """``(client, proxy)`` for a connection from ``peer``: the forwarded client and
        ``peer`` when ``peer`` is a trusted proxy that forwarded one, else ``(peer, "")``."""
        client = self.client(peer, request)
        return (client, peer) if client else (peer, "")

    def client(self, proxy: str, request: HandshakeRequest) -> str | None:
        """The client's address that trusted proxy ``proxy`` forwarded, or None.

        ``X-Forwarded-For`` (else ``Forwarded``'s ``for=``), read from the right:
        the first address that is not a trusted proxy is the client.
        """
        if not self.trusts(proxy):
            return None
        hops = _forwarded_for(request)
        for hop in reversed(hops):
            if not self.trusts(hop):
                return hop
        return hops[0] if hops else None


def _forwarded_for(request: HandshakeRequest) -> list[str]:
    headers = request.headers
    values = headers.get_all("X-Forwarded-For")
    if values:
        return [hop.strip() for value in values for hop in value.split(",") if hop.strip()]
    hops: list[str] = []
    for value in headers.get_all("Forwarded"):
        for element in value.split(","):
            for pair in element.split(";"):
                name, _, hop = pair.strip().partition("=")
                if name.lower() == "for" and hop:
                    hops.append(_forwarded_node(hop.strip().strip('"')))
    return hops


def _forwarded_node(node: str) -> str:
    """RFC 7239's node: ``192.0.2.1``, ``192.0.2.1:4711``, ``[2001:db8::1]:4711``."""
    if node.startswith("["):
        return node[1:].partition("]")[0]
    if node.count(":") == 1:
        return node.partition(":")[0]
    return node
