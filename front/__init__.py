"""wsfleet: Godot 3.2's WebSocketServer API, served by one worker process per core.

This folder (``front/``) is the import package ``wsfleet`` itself: the public
API that runs in the user's process (the front) and the ``wsfleet`` command.
Its parts, each a module with one job:

* `server`: ``WebSocketServer``, Godot's plain API and the checks of its settings;
* `peer`: ``WebSocketPeer``, one client's Godot API over its `channel`;
* `channel`: a peer's queues and counters, ``PeerLimits``, the server-wide
  ``OutboundBudget`` (``max_buffered_bytes``) - what a peer gets instead of
  the server's fields;
* `fleet`: the link to the processes: starting the supervisor, the control
  messages, the shards' rings, dispatch of events and command batching;
* `relay`: Godot's multiplayer relay (``gd_mp_api``), peer 1 of the
  MultiplayerAPI, and its rooms (relay groups, ``set_relay_groups``);
* `multiplayer`, `rpcmode`: Godot's RPCs and rsets on the server's side
  (``server.multiplayer``), and the ``remote``/``master``/``puppet``...
  decorators;
* `request`: a peer's upgrade request (``get_request``) and the client's address
  behind a trusted proxy (``forwarded_allow_ips``); `handshake`: the application's
  verdict on an upgrade before its 101 (``set_handshake_handler``);
* `binding`: ``bind_ip`` -> addresses -> listening sockets, and ``format_url``;
* `cluster`, `cluster_link`, `cluster_wire`, `remote_peer`: a node of a
  cluster over NATS (``cluster=``): the view of the other nodes and their
  peers, nats-py in a thread (the only module that imports nats, and only
  with ``cluster=``), the messages between nodes, ``RemotePeer``;
* `signals`, `errors`, `variant`, `aio`: Godot's signals, ``Error``, Variant
  encoding, and polling from asyncio; `cli`: the ``wsfleet`` command.

It imports `wsfleet.ipc` and starts the supervisor as a fresh interpreter;
nothing imports it except the CLI, tests and examples.

The public names load on first use: the supervisor and the shards import
``wsfleet.ipc``, which runs this file, and need none of the front.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_PUBLIC = {
    "Error": ".errors",
    "WebSocketPeer": ".peer",
    "WebSocketServer": ".server",
    "MultiplayerAPI": ".multiplayer",
    "Accept": ".handshake",
    "Refuse": ".handshake",
    "PendingHandshake": ".handshake",
    "RPCMode": ".rpcmode",
    "remote": ".rpcmode",
    "remotesync": ".rpcmode",
    "master": ".rpcmode",
    "puppet": ".rpcmode",
    "mastersync": ".rpcmode",
    "puppetsync": ".rpcmode",
}

if TYPE_CHECKING:
    from .errors import Error
    from .handshake import Accept, PendingHandshake, Refuse
    from .multiplayer import MultiplayerAPI
    from .peer import WebSocketPeer
    from .rpcmode import RPCMode, master, mastersync, puppet, puppetsync, remote, remotesync
    from .server import WebSocketServer

WRITE_MODE_TEXT = 0
WRITE_MODE_BINARY = 1


def __getattr__(name: str) -> Any:
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'wsfleet' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


__all__ = [
    "Accept",
    "Error",
    "PendingHandshake",
    "Refuse",
    "MultiplayerAPI",
    "RPCMode",
    "master",
    "mastersync",
    "puppet",
    "puppetsync",
    "remote",
    "remotesync",
    "WebSocketPeer",
    "WebSocketServer",
    "WRITE_MODE_BINARY",
    "WRITE_MODE_TEXT",
    "__version__",
]
