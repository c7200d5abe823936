"""The application's say on an upgrade before the ``101``: ``server.set_handshake_handler``.

With a handler set, a shard that has a valid, admitted upgrade request (Origin,
``max_peers``, draining already checked) holds it and tells the front
(`PendingHandshake`); the handler runs in the front, inside ``poll()``, and
returns `Accept` (optionally a subprotocol and extra response headers),
`Refuse` (an HTTP status, a reason, headers), or None to decide later with
``server.accept_handshake(token, ...)`` / ``refuse_handshake(token, ...)``
(an asynchronous token check).  The verdict must come within
``handshake_timeout`` of the connection, or the shard drops it.  Without a
handler nothing of this runs: the shard upgrades at once.

Imports the standard library and `.request` only.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field

from .request import HandshakeRequest

_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_BAD_VALUE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


@dataclass(frozen=True)
class Accept:
    """Upgrade: with ``subprotocol`` instead of the server's choice (None: keep it; "": none),
    and ``headers`` added to the 101."""

    subprotocol: str | None = None
    headers: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "headers", check_headers(self.headers))
        if self.subprotocol and not _TOKEN.fullmatch(self.subprotocol):
            raise ValueError(f"not a subprotocol token: {self.subprotocol!r}")


@dataclass(frozen=True)
class Refuse:
    """Answer ``status`` (4xx/5xx) with ``reason`` as its text body and ``headers``."""

    status: int = 403
    reason: str = ""
    headers: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        if not 400 <= self.status <= 599:
            raise ValueError(f"a refusal is a 4xx or 5xx status: {self.status}")
        if "\0" in self.reason:
            raise ValueError("a refusal's reason cannot hold NUL")
        object.__setattr__(self, "headers", check_headers(self.headers))


def check_headers(headers: Iterable[tuple[str, str]]) -> tuple[tuple[str, str], ...]:
    """Header pairs that cannot inject anything (a token name, no control bytes)."""
    checked = []
    for name, value in headers:
        if not _TOKEN.fullmatch(name) or _BAD_VALUE.search(value):
            raise ValueError(f"not a valid response header: {name!r}: {value!r}")
        checked.append((name, value))
    return tuple(checked)


@dataclass
class PendingHandshake:
    """An upgrade waiting for the application: what the handler is given.

    ``token`` identifies it for `accept_handshake` / `refuse_handshake`; once
    accepted it is also the peer's id.  ``address``: the client's (behind a
    trusted proxy, the forwarded one), ``proxy``: the proxy's or "".
    """

    token: int
    request: HandshakeRequest
    address: str
    port: int
    #: The subprotocols the client offered, and the one the server's rule chose.
    offered: list[str] = field(default_factory=list)
    subprotocol: str = ""
    proxy: str = ""
