"""Godot 3.2's high-level multiplayer API on the Python side: ``server.multiplayer``.

The server is peer 1 of a ``gd_mp_api`` game.  Python objects stand at node
paths (`MultiplayerAPI.register_node`); Godot clients call their marked methods
with ``rpc_id(1, ...)`` / ``rpc(...)`` and set their marked attributes with
``rset``; the server calls the clients' ``remote func``s and sets their
``puppet var``s with `rpc`, `rpc_id`, `rset`, `rset_id`.  The rules are those
of Godot 3.2.3's ``core/io/multiplayer_api.cpp`` (``docs/GODOT_WIRE.md`` §4.4):

* the payload after the 9-byte header: ``REMOTE_CALL`` / ``REMOTE_SET`` (u32
  target, name + NUL, then the arguments or the value as Variants),
  ``SIMPLIFY_PATH`` (u32 id, path + NUL), ``CONFIRM_PATH`` (path + NUL),
  ``RAW`` (bytes);
* the path cache, both ways: a receiver keeps each sender's path ids
  (`_PathsFrom`) and confirms each; a sender (`_PathsTo`) gives every path an
  id, sends ``SIMPLIFY_PATH`` to each peer that lacks it, uses the full-path
  form (``0x80000000 | offset``, the path after the arguments) towards peers
  that have not confirmed, one unicast frame each, and the id in one frame once
  every target has confirmed;
* RPC modes (`wsfleet.rpcmode`): who may call what, and when the server's own
  call also runs locally; the network master of every node is the server
  unless `set_network_master` says otherwise.

Paths are written as Godot prints them (``"/root/Lobby"``); on the wire they
are relative to the root (``Lobby``), and both forms are accepted from peers.

Bad input costs only the sender's packet: it is dropped and counted by reason
(`stats`, in ``server.get_mp_stats()``), never raised into ``poll()``.  An
exception in a handler is logged with its path and method and counted.

Packets reach this object from the relay (`MultiplayerRelay.frame`) inside
``poll()``, so handlers run there, as Godot runs them in its ``poll``; what
they send goes out at the end of that ``poll()``.

Imports `.rpcmode`, `.variant`, `.signals`, `wsfleet.ipc.messages` only (the
relay is handed in as a `PacketPeer`).
"""

from __future__ import annotations

import inspect
import logging
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from wsfleet.ipc import messages as m

from .rpcmode import RPCMode, calls_local, can_call, rpc_mode, rset_mode
from .signals import SignalEmitter
from .variant import VariantError, decode_variant_at, encode_variant

log = logging.getLogger("wsfleet")

REMOTE_CALL, REMOTE_SET, SIMPLIFY_PATH, CONFIRM_PATH, RAW = 0, 1, 2, 3, 4
_FULL_PATH = 0x8000_0000
_U32 = struct.Struct("<I")
#: The reasons a packet for the server is dropped (keys of `MultiplayerAPI.stats`).
DROP_REASONS = (
    "rpc_malformed",  # too short, a name without its NUL, a bad path offset
    "rpc_cache",  # a path id the sender never simplified, or a path we never sent (confirm)
    "rpc_node",  # no node registered at that path
    "rpc_member",  # no such method or attribute, or not marked for rpc/rset
    "rpc_mode",  # marked, but its mode does not let this sender call or set it
    "rpc_arguments",  # the wrong number of arguments for the method
    "rpc_decode",  # arguments that are not valid Variants (or objects, when not allowed)
    "rpc_handler_error",  # the handler raised (logged with its path and method)
)


class PacketPeer(Protocol):
    """What the API sends through (the relay: peer 1 of the fleet)."""

    def set_target_peer(self, peer_id: int) -> None: ...

    def put_packet(self, data: bytes) -> Any: ...

    def peer_ids(self) -> list[int]: ...

    def peer_count(self) -> int: ...

    def has_peer(self, peer_id: int) -> bool: ...


def wire_path(path: str) -> str:
    """``/root/Lobby`` -> ``Lobby`` (how Godot 3.2 sends a node path); relative paths as is."""
    if path.startswith("/root/"):
        return path[len("/root/") :]
    if path.startswith("/"):
        raise ValueError(f"a node path outside /root: {path!r}")
    return path


@dataclass
class _Node:
    path: str  # as registered ("/root/Lobby")
    obj: Any
    master: int = m.SERVER_ID
    #: `rpc_config` / `rset_config` overrides, as Godot's per-node modes.
    rpc_modes: dict[str, RPCMode] = field(default_factory=dict)
    rset_modes: dict[str, RPCMode] = field(default_factory=dict)

    def rpc_mode(self, method: str) -> RPCMode:
        mode = self.rpc_modes.get(method)
        return mode if mode is not None else rpc_mode(self.obj, method)

    def rset_mode(self, prop: str) -> RPCMode:
        mode = self.rset_modes.get(prop)
        return mode if mode is not None else rset_mode(self.obj, prop)


@dataclass
class _PathTo:
    """One path the server sends on: its id and which peers have it (True: confirmed),
    with the count of those that confirmed (the common case, everyone, costs no loop)."""

    id: int
    peers: dict[int, bool] = field(default_factory=dict)
    confirmed: int = 0

    def confirm(self, peer_id: int) -> bool:
        """``peer_id`` confirmed; False if the path was never sent to it."""
        state = self.peers.get(peer_id)
        if state is None:
            return False
        if not state:
            self.peers[peer_id] = True
            self.confirmed += 1
        return True

    def forget(self, peer_id: int) -> None:
        if self.peers.pop(peer_id, False):
            self.confirmed -= 1


class _Dropped(Exception):
    """A packet for the server that is dropped (its reason is one of `DROP_REASONS`)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


class MultiplayerAPI(SignalEmitter):
    """``server.multiplayer``: the server's side of Godot's RPCs (see the module docstring).

    Signals (Godot's ``MultiplayerAPI`` / ``SceneTree``): ``network_peer_connected(id)``,
    ``network_peer_disconnected(id)``, ``network_peer_packet(id, data)`` (``send_bytes``).
    """

    SIGNALS = ("network_peer_connected", "network_peer_disconnected", "network_peer_packet")

    def __init__(self, peer: PacketPeer) -> None:
        super().__init__()
        self._peer = peer
        self._nodes: dict[str, _Node] = {}  # by wire path ("Lobby")
        self._paths_from: dict[int, dict[int, str]] = {}  # sender -> its ids -> wire path
        self._paths_to: dict[str, _PathTo] = {}  # wire path -> our id and its confirmations
        self._next_path_id = 1
        self._sender = 0
        self._drops = dict.fromkeys(DROP_REASONS, 0)
        self._arity: dict[tuple[type, str], tuple[int, int | None]] = {}
        #: Decode Objects in arguments (Godot's ``allow_object_decoding``; off: dropped).
        self.allow_object_decoding = False

    # -- nodes -------------------------------------------------------------------------------

    def register_node(self, path: str, obj: Any) -> None:
        """Stand ``obj`` at node ``path`` (``"/root/Lobby"``); its marked members are reachable."""
        key = wire_path(path)
        if not key:
            raise ValueError("the root itself cannot be a node here")
        self._nodes[key] = _Node(path if path.startswith("/") else "/root/" + path, obj)

    def unregister_node(self, path: str) -> None:
        self._nodes.pop(wire_path(path), None)

    def has_nodes(self) -> bool:
        return bool(self._nodes)

    def set_network_master(self, path: str, peer_id: int) -> None:
        """Who is the master of the node at ``path`` (the server, 1, by default)."""
        self._node(path).master = int(peer_id)

    def get_network_master(self, path: str) -> int:
        return self._node(path).master

    def is_network_master(self, path: str) -> bool:
        return self._node(path).master == m.SERVER_ID

    def rpc_config(self, path: str, method: str, mode: RPCMode) -> None:
        """Set a method's mode on this node, as Godot's ``Node.rpc_config``."""
        self._node(path).rpc_modes[method] = RPCMode(mode)

    def rset_config(self, path: str, prop: str, mode: RPCMode) -> None:
        self._node(path).rset_modes[prop] = RPCMode(mode)

    def _node(self, path: str) -> _Node:
        node = self._nodes.get(wire_path(path))
        if node is None:
            raise KeyError(f"no node registered at {path!r}")
        return node

    # -- who is there ------------------------------------------------------------------------

    def get_rpc_sender_id(self) -> int:
        """Inside a handler: the peer that called it (1 for the server's own local call)."""
        return self._sender

    def get_network_unique_id(self) -> int:
        return m.SERVER_ID

    def is_network_server(self) -> bool:
        return True

    def get_network_connected_peers(self) -> list[int]:
        return list(self._peer.peer_ids())

    def stats(self) -> dict[str, int]:
        """Packets for the server dropped, by reason (`DROP_REASONS`)."""
        return dict(self._drops)

    def clear(self) -> None:
        """The server stopped: every path cache goes (Godot's ``clear``); nodes stay."""
        self._paths_from.clear()
        self._paths_to.clear()
        self._next_path_id = 1

    # -- from the relay ------------------------------------------------------------------------

    def peer_connected(self, peer_id: int) -> None:
        self._paths_from[peer_id] = {}
        self.emit_signal("network_peer_connected", peer_id)

    def peer_left(self, peer_id: int) -> None:
        self._paths_from.pop(peer_id, None)
        for sent in self._paths_to.values():
            sent.forget(peer_id)
        self.emit_signal("network_peer_disconnected", peer_id)

    def takes(self, payload: bytes) -> bool:
        """Whether a packet for the server is this API's (RPC traffic, once a node exists)."""
        return bool(self._nodes) and bool(payload) and payload[0] < RAW

    def raw(self, sender: int, payload: bytes) -> None:
        """A ``send_bytes`` packet (command RAW): ``network_peer_packet(sender, data)``."""
        if len(payload) >= 2 and payload[0] == RAW:
            self.emit_signal("network_peer_packet", sender, payload[1:])

    def process(self, sender: int, payload: bytes) -> None:
        """One RPC-traffic packet from ``sender`` (`takes` said so)."""
        try:
            command = payload[0]
            if command == SIMPLIFY_PATH:
                self._simplify_path(sender, payload)
            elif command == CONFIRM_PATH:
                self._confirm_path(sender, payload)
            else:
                self._remote(sender, payload, command == REMOTE_SET)
        except _Dropped as dropped:
            self._drops[dropped.reason] += 1
            log.debug("multiplayer: dropped a packet from peer %d: %s", sender, dropped)
        except Exception:  # a bug here must cost that packet only, never poll()
            self._drops["rpc_malformed"] += 1
            log.exception("multiplayer: a packet from peer %d could not be processed", sender)

    def _simplify_path(self, sender: int, payload: bytes) -> None:
        if len(payload) < 5:
            raise _Dropped("rpc_malformed", "SIMPLIFY_PATH shorter than 5 bytes")
        path_id = _U32.unpack_from(payload, 1)[0]
        path = _cstring(payload, 5)
        self._paths_from.setdefault(sender, {})[path_id] = path
        self._send(sender, bytes([CONFIRM_PATH]) + path.encode() + b"\0")

    def _confirm_path(self, sender: int, payload: bytes) -> None:
        if len(payload) < 2:
            raise _Dropped("rpc_malformed", "CONFIRM_PATH shorter than 2 bytes")
        sent = self._paths_to.get(_cstring(payload, 1))
        if sent is None or not sent.confirm(sender):
            raise _Dropped("rpc_cache", "CONFIRM_PATH of a path not sent to this peer")

    def _remote(self, sender: int, payload: bytes, is_set: bool) -> None:
        if len(payload) < 6:
            raise _Dropped("rpc_malformed", "REMOTE_CALL/SET shorter than 6 bytes")
        node = self._target_node(sender, payload)
        end = payload.find(b"\0", 5)
        if end < 0:
            raise _Dropped("rpc_malformed", "a member name without its NUL")
        name = payload[5:end].decode("utf-8", "replace")
        offset = end + 1
        if offset >= len(payload):
            raise _Dropped("rpc_malformed", "no arguments after the member name")
        mode = node.rset_mode(name) if is_set else node.rpc_mode(name)
        if mode is RPCMode.DISABLED:
            raise _Dropped("rpc_member", f"{node.path}: {name!r} is not marked for rpc/rset")
        if not can_call(mode, node.master == m.SERVER_ID, sender, node.master):
            raise _Dropped("rpc_mode", f"{node.path}: {name!r} ({mode.name}) from peer {sender}")
        if is_set:
            if not hasattr(node.obj, name):  # a mode from rset_config, but no such attribute
                raise _Dropped("rpc_member", f"{node.path} has no attribute {name!r}")
            value, _ = self._decode(payload, offset)
            self._run(node, name, sender, lambda: setattr(node.obj, name, value))
            return
        argc = payload[offset]
        offset += 1
        args = []
        for _ in range(argc):
            value, offset = self._decode(payload, offset)
            args.append(value)
        method = getattr(node.obj, name, None)
        if not callable(method):  # a mode from rpc_config, but no such method
            raise _Dropped("rpc_member", f"{node.path} has no method {name!r}")
        self._check_arity(node, name, method, argc)
        self._run(node, name, sender, lambda: method(*args))

    def _target_node(self, sender: int, payload: bytes) -> _Node:
        target = _U32.unpack_from(payload, 1)[0]
        if target & _FULL_PATH:
            offset = target & ~_FULL_PATH
            if offset >= len(payload):
                raise _Dropped("rpc_malformed", "a full-path offset past the packet")
            path = _cstring(payload, offset)
        else:
            path = self._paths_from.get(sender, {}).get(target)
            if path is None:
                raise _Dropped("rpc_cache", f"path id {target} was never simplified")
        try:
            node = self._nodes.get(wire_path(path))
        except ValueError:
            node = None
        if node is None:
            raise _Dropped("rpc_node", f"no node at {path!r}")
        return node

    def _decode(self, payload: bytes, offset: int) -> tuple[Any, int]:
        if offset >= len(payload):
            raise _Dropped("rpc_decode", "fewer arguments than the count says")
        try:
            return decode_variant_at(payload, offset, self.allow_object_decoding)
        except VariantError as exc:
            raise _Dropped("rpc_decode", f"an undecodable argument: {exc}") from None

    def _check_arity(self, node: _Node, name: str, method: Callable, argc: int) -> None:
        key = (type(node.obj), name)
        arity = self._arity.get(key)
        if arity is None:
            arity = self._arity[key] = _arity_of(method)
        low, high = arity
        if argc < low or (high is not None and argc > high):
            raise _Dropped("rpc_arguments", f"{node.path}: {name} got {argc} argument(s)")

    def _run(self, node: _Node, name: str, sender: int, call: Callable[[], Any]) -> None:
        previous, self._sender = self._sender, sender
        try:
            call()
        except Exception:
            self._drops["rpc_handler_error"] += 1
            log.exception("multiplayer: %s.%s (from peer %d) raised", node.path, name, sender)
        finally:
            self._sender = previous

    # -- sending -----------------------------------------------------------------------------

    def rpc(self, path: str, method: str, *args: Any) -> None:
        """Call ``method`` on the node at ``path`` on every peer (and here, if its mode says)."""
        self._rpcp(0, path, method, args)

    def rpc_id(self, peer_id: int, path: str, method: str, *args: Any) -> None:
        """Call ``method`` on the node at ``path`` on peer ``peer_id`` (-n: all but n)."""
        self._rpcp(int(peer_id), path, method, args)

    # WebSocket is reliable: the unreliable forms are the same calls (as in Godot over it).
    def rpc_unreliable(self, path: str, method: str, *args: Any) -> None:
        self._rpcp(0, path, method, args)

    def rpc_unreliable_id(self, peer_id: int, path: str, method: str, *args: Any) -> None:
        self._rpcp(int(peer_id), path, method, args)

    def rset(self, path: str, prop: str, value: Any) -> None:
        """Set ``prop`` of the node at ``path`` on every peer (and here, if its mode says)."""
        self._rsetp(0, path, prop, value)

    def rset_id(self, peer_id: int, path: str, prop: str, value: Any) -> None:
        self._rsetp(int(peer_id), path, prop, value)

    def rset_unreliable(self, path: str, prop: str, value: Any) -> None:
        self._rsetp(0, path, prop, value)

    def rset_unreliable_id(self, peer_id: int, path: str, prop: str, value: Any) -> None:
        self._rsetp(int(peer_id), path, prop, value)

    def send_bytes(self, data: bytes | bytearray | memoryview, peer: int = 0) -> None:
        """Raw bytes to ``peer`` (0: every peer); they arrive as ``network_peer_packet``."""
        if not data:
            raise ValueError("send_bytes: an empty packet")
        self._send(int(peer), bytes([RAW]) + bytes(data))

    def _rpcp(self, to: int, path: str, method: str, args: tuple[Any, ...]) -> None:
        if len(args) > 255:
            raise ValueError("an RPC takes at most 255 arguments")
        body = bytearray(method.encode() + b"\0")
        body.append(len(args))
        for arg in args:
            body += encode_variant(arg, self.allow_object_decoding, max_size=None)
        local = self._local(to, path, lambda node: node.rpc_mode(method))
        run_here, skip = local
        if not skip:
            self._send_call(to, wire_path(path), REMOTE_CALL, bytes(body))
        if run_here:
            node = self._node(path)
            self._run(node, method, m.SERVER_ID, lambda: getattr(node.obj, method)(*args))

    def _rsetp(self, to: int, path: str, prop: str, value: Any) -> None:
        body = (
            prop.encode() + b"\0" + encode_variant(value, self.allow_object_decoding, max_size=None)
        )
        run_here, skip = self._local(to, path, lambda node: node.rset_mode(prop))
        if run_here:
            node = self._node(path)
            self._run(node, prop, m.SERVER_ID, lambda: setattr(node.obj, prop, value))
        if not skip:
            self._send_call(to, wire_path(path), REMOTE_SET, body)

    def _local(self, to: int, path: str, mode_of: Callable[[_Node], RPCMode]) -> tuple[bool, bool]:
        """Godot's ``rpcp``: (call here too, do not send) for a call towards ``to``.

        Towards the server itself (1), as Godot: only the local call, if the mode has
        one (``remotesync``...); else nothing, with an error.
        """
        if to > m.SERVER_ID or to == -m.SERVER_ID:
            return False, False  # one peer, or "all but the server": never local
        node = self._nodes.get(wire_path(path))
        local = (False, False)  # a path only the clients have
        if node is not None:
            local = calls_local(mode_of(node), node.master == m.SERVER_ID)
        if to != m.SERVER_ID:
            return local
        if not local[0]:
            log.error("multiplayer: an RPC/rset on the server itself, not allowed by its mode")
        return local[0], True

    def _send_call(self, to: int, path: str, command: int, body: bytes) -> None:
        """A REMOTE_CALL/SET by path id where every target confirmed it, else per peer."""
        sent = self._paths_to.get(path)
        if sent is None:
            sent = self._paths_to[path] = _PathTo(self._next_path_id)
            self._next_path_id += 1
        by_id = bytes([command]) + _U32.pack(sent.id) + body
        if to > 1:
            if not self._peer.has_peer(to):
                log.error("multiplayer: an RPC to peer %d, which is not connected", to)
                return
            targets = [to]
        elif to == 0 and sent.confirmed == self._peer.peer_count():
            self._send(0, by_id)  # every peer has the id: one frame (the usual case)
            return
        else:
            targets = [p for p in self._peer.peer_ids() if to == 0 or p != -to]
        everyone_confirmed = True
        for peer_id in targets:
            if peer_id not in sent.peers:
                simplify = bytes([SIMPLIFY_PATH]) + _U32.pack(sent.id) + path.encode() + b"\0"
                self._send(peer_id, simplify)
                sent.peers[peer_id] = False
            if not sent.peers[peer_id]:
                everyone_confirmed = False
        if everyone_confirmed:
            self._send(to, by_id)
            return
        offset = 5 + len(body)
        full = bytes([command]) + _U32.pack(_FULL_PATH | offset) + body + path.encode() + b"\0"
        for peer_id in targets:
            self._send(peer_id, by_id if sent.peers[peer_id] else full)

    def _send(self, to: int, payload: bytes) -> None:
        self._peer.set_target_peer(to)
        error = self._peer.put_packet(payload)
        if error:  # Error.OK is 0; the relay logged why (not listening, no such peer...)
            log.error("multiplayer: a packet to %d was not sent: %s", to, error)


def _cstring(payload: bytes, start: int) -> str:
    """A UTF-8 string from ``start`` to its NUL (or the end), as Godot's ``parse_utf8``."""
    end = payload.find(b"\0", start)
    return payload[start : end if end >= 0 else len(payload)].decode("utf-8", "replace")


def _arity_of(method: Callable) -> tuple[int, int | None]:
    """The fewest and most positional arguments ``method`` takes (None: any number)."""
    try:
        parameters = inspect.signature(method).parameters.values()
    except (TypeError, ValueError):
        return 0, None
    low, high = 0, 0
    for parameter in parameters:
        if parameter.kind is parameter.VAR_POSITIONAL:
            return low, None
        if parameter.kind in (parameter.POSITIONAL_ONLY, parameter.POSITIONAL_OR_KEYWORD):
            high += 1
            if parameter.default is parameter.empty:
                low += 1
    return low, high
