"""Which peers are in which group, as the front keeps it (``server.join`` and friends).

The shards hold the membership they fan a group broadcast out with (each only
its own peers'); this is the front's copy, for the application's questions
(`members`, `groups_of`) and to send a group broadcast only to the shards
that hold members (`shards_of`: one command per such shard, whatever the
group's size).  With relay groups (``set_relay_groups``) the relay asks it
who shares a group with whom (`mates`, `share`).  A peer that leaves, or
whose shard dies, leaves its groups here when the front hears of it
(`peer_left`), and in its shard at once.

Imports the standard library only.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Set as AbstractSet

#: The longest group name, in UTF-8 bytes.
MAX_GROUP_NAME = 255
_NONE: frozenset[str] = frozenset()
_NO_IDS: frozenset[int] = frozenset()


def check_name(group: str) -> bytes:
    """The name as the shards know it; ValueError for one that is empty, too long or holds NUL."""
    if not isinstance(group, str) or not group:
        raise ValueError(f"a group name is a non-empty string: {group!r}")
    name = group.encode()
    if len(name) > MAX_GROUP_NAME or b"\0" in name:
        raise ValueError(f"a group name is at most {MAX_GROUP_NAME} bytes, without NUL")
    return name


class Groups:
    def __init__(self) -> None:
        self._members: dict[str, set[int]] = {}
        self._of_peer: dict[int, set[str]] = {}
        self._shards: dict[str, Counter[int]] = {}

    def join(self, peer_id: int, shard: int, group: str) -> bool:
        """True if ``peer_id`` was not in ``group`` yet."""
        members = self._members.setdefault(group, set())
        if peer_id in members:
            return False
        members.add(peer_id)
        self._of_peer.setdefault(peer_id, set()).add(group)
        self._shards.setdefault(group, Counter())[shard] += 1
        return True

    def leave(self, peer_id: int, shard: int, group: str) -> bool:
        """True if ``peer_id`` was in ``group``."""
        members = self._members.get(group)
        if members is None or peer_id not in members:
            return False
        members.discard(peer_id)
        self._of_peer[peer_id].discard(group)
        if not self._of_peer[peer_id]:
            del self._of_peer[peer_id]
        shards = self._shards[group]
        shards[shard] -= 1
        if shards[shard] <= 0:
            del shards[shard]
        if not members:
            del self._members[group]
            del self._shards[group]
        return True

    def peer_left(self, peer_id: int, shard: int) -> None:
        for group in list(self._of_peer.get(peer_id, ())):
            self.leave(peer_id, shard, group)

    def mates(self, peer_id: int) -> set[int]:
        """Every other peer that shares a group with ``peer_id`` (relay groups)."""
        found: set[int] = set()
        for group in self._of_peer.get(peer_id, ()):
            found |= self._members[group]
        found.discard(peer_id)
        return found

    def share(self, peer_id: int, other: int) -> bool:
        """Whether two peers are in some group together."""
        mine = self._of_peer.get(peer_id)
        theirs = self._of_peer.get(other)
        return bool(mine and theirs and not mine.isdisjoint(theirs))

    def of_peer(self, peer_id: int) -> AbstractSet[str]:
        """The groups of ``peer_id`` (the live set: do not change it)."""
        return self._of_peer.get(peer_id, _NONE)

    def members_of(self, group: str) -> AbstractSet[int]:
        """The members of ``group`` (the live set: do not change it)."""
        return self._members.get(group, _NO_IDS)

    def members(self, group: str) -> list[int]:
        return sorted(self._members.get(group, ()))

    def groups_of(self, peer_id: int) -> list[str]:
        return sorted(self._of_peer.get(peer_id, ()))

    def shards_of(self, group: str) -> list[int]:
        return sorted(self._shards.get(group, ()))

    def clear(self) -> None:
        self._members.clear()
        self._of_peer.clear()
        self._shards.clear()
