"""Shard processes: the sockets.

Owns: one uvloop event loop per shard, its own ``SO_REUSEPORT`` listening
socket, the WebSocket protocol, and the peer ids of its range.  Everything a
peer does becomes a record in the shard's events ring; every record in its
commands ring is done here.  Imports only `wsfleet.ipc`.
"""
