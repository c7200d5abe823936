"""Shard processes: the sockets.

Owns: one uvloop event loop per shard, its own ``SO_REUSEPORT`` listening
socket, the WebSocket protocol, and the peer ids of its range.  Everything a
peer does becomes a record in the shard's events ring; every record in its
commands ring is done here.

Modules:

* `wire`: one connection's bytes as a Sans-I/O object (`wire.ServerWire`): the
  upgrade, frame delimiting and the fast path for data frames, ``websockets``
  for the rest, the connection's `wire.Phase`; `wire.DeflateWire` adds
  permessage-deflate (``websockets``' own extension).  Imports only ``websockets``.
* `connection`: `connection.PeerConnection`, the asyncio protocol around a
  wire: transport, deadlines, keepalive, pausing, events to the shard.
* `worker`: the shard process itself (`worker.Shard`, `worker.run`): rings,
  commands, the multiplayer relay, shutdown.
* `handoff`: ``wsfleet reload`` inside a shard: the old process hands its
  connections over (`handoff.hand_off`), the new one takes them
  (`handoff.take_over`).
* `app`: the shard handler (``shard_handler``): `app.ShardContext`, what it
  may do, how its errors are handled.
* `successor`: a shard started as a fresh interpreter by a reload
  (``python -m wsfleet.shards --boot-fd N``): boot, wait, take over.

Imports only `wsfleet.ipc` (and ``websockets``, ``uvloop``).
"""
