"""The echo as a shard handler: ``wsfleet serve --shard-handler wsfleet.loadtest.shard_echo:echo``.

Every message is answered inside its shard (`wsfleet.shards.app`) and consumed:
the front's ``poll()`` sees connects and departures only.  The benchmarks' name
for it is ``wsfleet-K-sh`` (`catalog.server_catalog`), to set against the echo
in the front (``wsfleet-K``).

Imports nothing of the project (the shard hands in its context).
"""

from __future__ import annotations

from typing import Any


class _Echo:
    __slots__ = ("put_packet",)

    def __init__(self, ctx: Any) -> None:
        self.put_packet = ctx.put_packet

    def on_message(self, peer_id: int, data: bytes, is_text: bool) -> bool:
        self.put_packet(peer_id, data, is_text)
        return False


def echo(ctx: Any) -> _Echo:
    """The factory: one echo handler per shard."""
    return _Echo(ctx)
