"""Per-shard words that outlive a shard: its next peer id, how many peers it holds, its heartbeat.

The supervisor creates this block (an anonymous ``memfd``) before it forks the
shards, so every shard, and each shard's replacement, sees the same words; a
successor started as a fresh interpreter (``wsfleet reload``) maps it from
the descriptor it is handed (`ShardState.attach`).
Each shard owns one 64-byte line, so that shards do not bounce a cache line
between cores:

* word 0, the next peer-id offset: written only by that shard, read back by
  its successor so that a restarted shard does not hand out its
  predecessor's ids again (plain reads and writes: one process at a time);
* word 1, the number of peers the shard holds: written only by that shard,
  read by every shard to enforce the server-wide ``max_peers``, and reset to
  0 by the supervisor when the shard dies (its connections died with it), so
  a crash never leaks slots;
* word 2, the heartbeat: ``CLOCK_MONOTONIC`` in milliseconds (one clock for
  every process of the machine), stored by the shard's loop once a second
  and by the supervisor when it forks the shard (so a shard that has not
  ticked yet is not stale); the supervisor reads it to find a hung shard
  (its loop stuck, the process alive) and replace it.

A count per shard rather than one shared counter is what makes the reset
possible: nobody has to know how many of a global total a dead shard held.

After the lines, the per-address connection counts (``max_peers_per_address``),
kept the same way: each shard owns a table, only it writes to it, every shard
reads every table, and the supervisor clears a dead shard's.  A table is open
addressing with linear probing over `ADDRESS_SLOTS` entries ``[key, count]``;
the key is a keyed 64-bit BLAKE2b of the address (the secret drawn by the
process that made the block, so nobody outside can aim at a victim's entries;
two addresses share a key with odds of 2^-64).  An entry whose count fell to 0
keeps its key until its writer reuses it for another address, so a probe
never stops early at a hole.  A table holds at most `ADDRESS_SLOTS` distinct
addresses at a time; beyond that an upgrade is refused as a full server.
The memory is sparse: pages a shard never touched cost nothing.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import time

from .atomic import AtomicWord, AtomicWords

SLOT_BYTES = 64
_NEXT_ID_OFF = 0
_PEERS_OFF = 8
_HEARTBEAT_OFF = 16
#: How often a shard's loop beats.
HEARTBEAT_SECONDS = 1.0
#: Entries of each shard's address table (a power of two).
ADDRESS_SLOTS = 1 << 16
_KEY_BYTES = 16
_TABLE_WORDS = 2 * ADDRESS_SLOTS


class AddressTableFull(Exception):
    """A shard's address table holds `ADDRESS_SLOTS` distinct addresses already."""


def _block_size(shards: int) -> tuple[int, int]:
    """(size of the block, offset of the first address table) for ``shards`` shards."""
    tables = SLOT_BYTES * max(1, shards) + SLOT_BYTES  # the lines, then the hash key's line
    return tables + 8 * _TABLE_WORDS * max(1, shards), tables


class ShardState:
    """The shared words of ``shards`` shards (see the module docstring)."""

    def __init__(self, shards: int, fd: int | None = None) -> None:
        """A new zeroed block for ``shards`` shards, or (``fd``) the one another process made."""
        self.shards = shards
        size, tables = _block_size(shards)
        key_offset = tables - SLOT_BYTES
        new = fd is None
        if fd is None:
            fd = os.memfd_create("wsfleet-shardstate", os.MFD_CLOEXEC)
            os.ftruncate(fd, size)
        elif os.fstat(fd).st_size != size:
            raise ValueError(f"shard state of {os.fstat(fd).st_size} bytes, not {size}")
        #: The memfd (close-on-exec): what a successor is handed to `attach`.
        self.fd = fd
        self._map = mmap.mmap(fd, size)
        view = memoryview(self._map)
        self._peers = [AtomicWord(view[i * SLOT_BYTES + _PEERS_OFF :][:8]) for i in range(shards)]
        self._beats = [
            AtomicWord(view[i * SLOT_BYTES + _HEARTBEAT_OFF :][:8]) for i in range(shards)
        ]
        if new:
            self._map[key_offset : key_offset + _KEY_BYTES] = os.urandom(_KEY_BYTES)
        self._secret = bytes(self._map[key_offset : key_offset + _KEY_BYTES])
        self._addresses = AtomicWords(view[tables:])

    @classmethod
    def attach(cls, fd: int, shards: int) -> ShardState:
        """Map the block whose memfd this process was handed (it owns ``fd`` from now on)."""
        return cls(shards, fd)

    def next_id_word(self, index: int) -> memoryview:
        """Shard ``index``'s next-id word, as a one-element ``Q`` view (its own process only)."""
        offset = index * SLOT_BYTES + _NEXT_ID_OFF
        return memoryview(self._map)[offset : offset + 8].cast("Q")

    def total_peers(self) -> int:
        """Peers held by every shard together (each count read sequentially consistent)."""
        return sum(word.load() for word in self._peers)

    def peers(self, index: int) -> int:
        return self._peers[index].load()

    def set_peers(self, index: int, held: int) -> None:
        """Publish how many peers shard ``index`` holds (it, or the supervisor once it died)."""
        self._peers[index].store(held)

    def beat(self, index: int) -> None:
        """Shard ``index`` is alive now (its loop, once a second; the supervisor at fork)."""
        self._beats[index].store_release(time.monotonic_ns() // 1_000_000)

    def heartbeat_age(self, index: int) -> float:
        """Seconds since shard ``index`` last beat."""
        return time.monotonic() - self._beats[index].load_acquire() / 1000

    def forget(self, index: int) -> None:
        """Shard ``index`` died, and its connections with it: its peers and addresses count
        no more (the supervisor, before anyone hears of the death)."""
        self._peers[index].store(0)
        self._addresses.clear(index * _TABLE_WORDS, _TABLE_WORDS)

    # -- per-address connection counts -----------------------------------------------------

    def _key(self, address: str) -> int:
        digest = hashlib.blake2b(address.encode(), digest_size=8, key=self._secret).digest()
        return int.from_bytes(digest, "little") | 1  # 0 marks an empty entry

    def _total(self, key: int) -> int:
        return self._addresses.total(0, _TABLE_WORDS, self.shards, ADDRESS_SLOTS, key)

    def address_count(self, address: str) -> int:
        """Connections counted for ``address`` by every shard."""
        return self._total(self._key(address))

    def claim_address(self, index: int, address: str, limit: int) -> bool:
        """Count one more connection from ``address`` for shard ``index`` if that keeps the
        address within ``limit`` (0: no limit) over every shard; False (nothing counted)
        otherwise.  `AddressTableFull` when the shard's table has no room for it.

        As `admit`: the shard adds its claim *before* it reads the other tables,
        every access sequentially consistent, so of two shards racing for an
        address's last connection at least one sees the other's claim.
        """
        key = self._key(address)
        words, base = self._addresses, index * _TABLE_WORDS
        entry, free = words.find(base, ADDRESS_SLOTS, key)
        if entry < 0:
            if free < 0:
                raise AddressTableFull(f"{ADDRESS_SLOTS} addresses in shard {index}'s table")
            entry = free
            words.store(base + 2 * entry, key)  # before its count: see the module docstring
        count = base + 2 * entry + 1
        words.add(count, 1)
        if limit and self._total(key) > limit:
            words.add(count, -1)
            return False
        return True

    def release_address(self, index: int, address: str) -> None:
        """A connection `claim_address` counted for shard ``index`` is gone."""
        words, base = self._addresses, index * _TABLE_WORDS
        entry = words.find(base, ADDRESS_SLOTS, self._key(address))[0]
        if entry >= 0 and words.load(base + 2 * entry + 1) > 0:
            words.add(base + 2 * entry + 1, -1)

    def admit(self, index: int, held: int, limit: int) -> bool:
        """Count a new peer for shard ``index`` (which holds ``held``) if the server has room.

        With ``limit`` 0 there is no limit.  Otherwise the shard publishes
        ``held + 1`` *before* it reads the other shards' counts, both
        sequentially consistent (Dekker's pattern): of two shards racing for
        the last slot at least one sees the other's claim, so the total never
        exceeds ``limit``.  At worst both refuse that once.  On refusal the
        count goes back to ``held``.
        """
        word = self._peers[index]
        word.store(held + 1)
        if limit and self.total_peers() > limit:
            word.store(held)
            return False
        return True
