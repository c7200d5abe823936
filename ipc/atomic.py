"""One 64-bit word of shared memory, read and written with explicit memory order.

The ring's indexes and flags are shared between processes that may run on
different cores of a weakly ordered CPU (aarch64), so plain Python reads and
writes of a buffer are not enough: they carry no ordering, and
``struct.pack_into`` even clears its bytes before writing them (another core
can see a zero in between).  Every shared word therefore goes through
`AtomicWord`, a small C extension (``_atomic.c``) over the C11 ``__atomic``
builtins: ``ldar``/``stlr`` on aarch64, ``mov``/``xchg`` on x86-64.

The `atomics` package does the same operations, but its Python wrapper costs
about 5.5 us per call (measured here); with 3-5 such calls per batch it made
the 2,000,000-record stress test take 48 s instead of a few.  A call here
costs about 40 ns.

Methods: ``load_acquire()``, ``store_release(v)``, ``load()`` and
``store(v)`` (sequentially consistent), ``close()`` (release the buffer
export before unmapping).  The buffer must be 8 bytes, 8-byte aligned and
writable.

`AtomicWords` is the same for a table of words too large for an object a
word (the per-address connection counts, `wsfleet.ipc.shardstate`):
``load(i)``, ``store(i, v)``, ``add(i, delta)`` (a sequentially consistent
fetch-and-add that returns the new value), ``find(base, slots, key)`` (the
lookup of an open-addressing table of ``[key, count]`` entries, see
``_atomic.c``), ``total(base, stride, tables, slots, key)`` (the sum of a
key's counts over several such tables), ``clear(start, count)``, ``close()``
and ``len()``; the buffer must be 8-byte aligned, writable and a whole number
of words.
"""

from ._atomic import AtomicWord, AtomicWords

__all__ = ["AtomicWord", "AtomicWords"]
