"""Shard handlers for tests/test_shard_handler.py (``--shard-handler tests.apps.shard_apps:X``).

Every answer starts with ``PID:INDEX:`` (the shard process's pid and index), so
a test sees which process answered: a new one after a reload or a restart.
"""

from __future__ import annotations

import os
from typing import Any


class _Echo:
    def __init__(self, ctx: Any) -> None:
        self.ctx = ctx
        self.prefix = f"{os.getpid()}:{ctx.index}:".encode()

    def answer(self, peer_id: int, data: bytes, is_text: bool) -> None:
        self.ctx.put_packet(peer_id, self.prefix + data, is_text)

    def on_message(self, peer_id: int, data: bytes, is_text: bool) -> bool:
        self.answer(peer_id, data, is_text)
        return False  # consumed: nothing reaches the front


class _Filter(_Echo):
    def on_message(self, peer_id: int, data: bytes, is_text: bool) -> bool:
        if data.startswith(b"front"):
            return True  # the front's echo answers it
        self.answer(peer_id, data, is_text)
        return False


class _Raising(_Echo):
    def on_message(self, peer_id: int, data: bytes, is_text: bool) -> bool:
        if data == b"boom":
            raise RuntimeError("the test handler's boom")
        return super().on_message(peer_id, data, is_text)


class _Rooms:
    """``join:ROOM`` joins, ``say:ROOM:TEXT`` reaches the room's other members on this shard,
    ``members:ROOM`` answers them; anything else goes to the front."""

    def __init__(self, ctx: Any) -> None:
        self.ctx = ctx

    def on_message(self, peer_id: int, data: bytes, is_text: bool) -> bool:
        verb, _, rest = data.decode().partition(":")
        if verb == "join":
            self.ctx.join(peer_id, rest)
            self.ctx.put_packet(peer_id, f"joined:{rest}".encode(), True)
        elif verb == "say":
            room, _, text = rest.partition(":")
            sent = self.ctx.broadcast(text.encode(), True, group=room, exclude=(peer_id,))
            self.ctx.put_packet(peer_id, f"sent:{sent}".encode(), True)
        elif verb == "members":
            members = ",".join(map(str, self.ctx.group_members(rest)))
            self.ctx.put_packet(peer_id, f"members:{members}".encode(), True)
        else:
            return True
        return False


def rooms(ctx: Any) -> _Rooms:
    return _Rooms(ctx)


def echo(ctx: Any) -> _Echo:
    return _Echo(ctx)


def filtering(ctx: Any) -> _Filter:
    return _Filter(ctx)


def raising(ctx: Any) -> _Raising:
    return _Raising(ctx)


def broken(ctx: Any) -> None:
    raise RuntimeError("this factory cannot make its handler")


not_a_factory = 42
