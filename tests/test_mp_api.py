"""``wsfleet.multiplayer.MultiplayerAPI`` and ``wsfleet.rpcmode`` on their own, without
processes: the API sends through `Wire`, an in-memory ``PacketPeer`` (what the relay is
to it in a server) that records each packet with its target. The wire-level behaviour
with real clients and shards is tests/test_mp_rpc.py; here are the rules themselves
(Godot 3.2.3's ``core/io/multiplayer_api.cpp``, written out as tables), the caches
when a peer id comes back, and the API's argument checks.
"""

from __future__ import annotations

from typing import Any

import pytest

import wsfleet
from wsfleet import RPCMode
from wsfleet.multiplayer import DROP_REASONS, MultiplayerAPI, wire_path
from wsfleet.rpcmode import calls_local, can_call, rpc_mode, rset_mode
from wsfleet.variant import FullObject, encode_variant

from .test_mp_rpc import call_by_id, call_full, confirm, set_by_id, set_full, simplify

SERVER = 1


class Wire:
    """The peers the API sees, and every packet it sends as (target, payload)."""

    def __init__(self, ids: list[int]) -> None:
        self.ids = sorted(ids)
        self.sent: list[tuple[int, bytes]] = []
        self._target = 0

    def set_target_peer(self, peer_id: int) -> None:
        self._target = peer_id

    def put_packet(self, data: bytes) -> None:
        self.sent.append((self._target, bytes(data)))

    def peer_ids(self) -> list[int]:
        return self.ids

    def peer_count(self) -> int:
        return len(self.ids)

    def has_peer(self, peer_id: int) -> bool:
        return peer_id in self.ids

    def take(self) -> list[tuple[int, bytes]]:
        sent, self.sent = self.sent, []
        return sent


class Node:
    hp = wsfleet.remote(100)

    def __init__(self, mp: MultiplayerAPI) -> None:
        self.mp = mp
        self.calls: list[tuple[str, int, tuple[Any, ...]]] = []

    @wsfleet.remote
    def call(self, *args: Any) -> None:
        self.calls.append(("call", self.mp.get_rpc_sender_id(), args))

    @wsfleet.remote
    def some(self, a: Any, b: Any = 2) -> None:
        self.calls.append(("some", self.mp.get_rpc_sender_id(), (a, b)))

    @wsfleet.remote
    def nested(self) -> None:
        """A handler whose own local call runs as the server, then back to the caller."""
        before = self.mp.get_rpc_sender_id()
        self.mp.rpc("/root/Node", "synced", "inner")
        self.calls.append(("nested", before, (self.mp.get_rpc_sender_id(),)))

    @wsfleet.remotesync
    def synced(self, x: Any) -> None:
        self.calls.append(("synced", self.mp.get_rpc_sender_id(), (x,)))


def api(peers: list[int]) -> tuple[MultiplayerAPI, Wire, Node]:
    wire = Wire(peers)
    mp = MultiplayerAPI(wire)
    node = Node(mp)
    mp.register_node("/root/Node", node)
    for peer_id in peers:
        mp.peer_connected(peer_id)
    return mp, wire, node


# -- the modes: Godot 3.2.3's rules as tables -------------------------------------------------

M = RPCMode
# (mode, this side is the master) -> may a remote peer call it (the sender is not the master).
CAN_CALL = {
    (M.DISABLED, True): False, (M.DISABLED, False): False,
    (M.REMOTE, True): True, (M.REMOTE, False): True,
    (M.REMOTESYNC, True): True, (M.REMOTESYNC, False): True,
    (M.MASTER, True): True, (M.MASTER, False): False,
    (M.MASTERSYNC, True): True, (M.MASTERSYNC, False): False,
    (M.PUPPET, True): False, (M.PUPPET, False): False,
    (M.PUPPETSYNC, True): False, (M.PUPPETSYNC, False): False,
}  # fmt: skip
# _should_call_local: (mode, is master) -> (call it here too, skip sending it).
CALLS_LOCAL = {
    (M.DISABLED, True): (False, False), (M.DISABLED, False): (False, False),
    (M.REMOTE, True): (False, False), (M.REMOTE, False): (False, False),
    (M.REMOTESYNC, True): (True, False), (M.REMOTESYNC, False): (True, False),
    (M.PUPPETSYNC, True): (True, False), (M.PUPPETSYNC, False): (True, False),
    (M.MASTERSYNC, True): (True, True), (M.MASTERSYNC, False): (True, False),
    (M.MASTER, True): (True, True), (M.MASTER, False): (False, False),
    (M.PUPPET, True): (False, False), (M.PUPPET, False): (True, False),
}  # fmt: skip


@pytest.mark.parametrize(("mode", "is_master"), sorted(CAN_CALL))
def test_the_mode_rules_are_godots(mode: RPCMode, is_master: bool) -> None:
    master = SERVER if is_master else 7
    assert can_call(mode, is_master, 9, master) is CAN_CALL[mode, is_master]
    assert calls_local(mode, is_master) == CALLS_LOCAL[mode, is_master]
    # Puppet modes: the one peer allowed is the node's master, and only when it is not us.
    allowed = mode in (M.PUPPET, M.PUPPETSYNC) and not is_master
    if mode in (M.PUPPET, M.PUPPETSYNC):
        assert can_call(mode, is_master, master, master) is allowed


def test_the_decorators_mark_methods_attributes_and_properties() -> None:
    def upper(thing: Any, value: str) -> None:
        thing._name = value.upper()

    class Thing:
        hp = wsfleet.puppet(10)
        plain = 3
        name = wsfleet.remotesync(property(lambda self: self._name, upper))

        @wsfleet.mastersync
        def act(self) -> None: ...

        def unmarked(self) -> None: ...

    a, b = Thing(), Thing()
    assert rpc_mode(a, "act") is M.MASTERSYNC
    assert [rpc_mode(a, n) for n in ("unmarked", "nope", "hp", "plain", "__init__")] == [
        M.DISABLED
    ] * 5
    assert (rset_mode(a, "hp"), rset_mode(a, "name")) == (M.PUPPET, M.REMOTESYNC)
    assert [rset_mode(a, n) for n in ("plain", "act", "nope")] == [M.DISABLED] * 3
    a.hp = 1
    assert (a.hp, b.hp) == (1, 10)  # the default is per instance
    a.name = "x"
    assert a.name == "X"  # the property's setter ran
    assert wsfleet.remote.__name__ == "remote" and "rset" in (wsfleet.puppet.__doc__ or "")


def test_a_marked_property_keeps_its_mode_when_its_setter_is_added() -> None:
    """Python's usual way to write a property with a setter: the mode on the getter."""

    class Thing:
        @wsfleet.remote
        @property
        def name(self) -> str:
            return "x"

        @name.setter
        def name(self, value: str) -> None: ...

    mp, _, _ = api([5])
    mp.register_node("/root/Thing", Thing())
    assert rset_mode(Thing(), "name") is M.REMOTE
    mp.process(5, set_full("Thing", "name", "y"))  # must never raise


def test_paths_as_godot_prints_them_and_as_they_travel() -> None:
    assert wire_path("/root/Lobby") == "Lobby"
    assert wire_path("/root/World/Player") == "World/Player"
    assert wire_path("Lobby") == "Lobby"
    for outside in ("/root", "/Lobby", "/other/Lobby"):
        with pytest.raises(ValueError):
            wire_path(outside)
    mp, wire, node = api([5])
    mp.register_node("Other", node)  # relative: under /root
    mp.process(5, call_full("Other", "call", 1))
    with pytest.raises(ValueError):
        mp.register_node("/root/", node)
    assert node.calls == [("call", 5, (1,))]


# -- the caches ---------------------------------------------------------------------------------


def test_a_departed_peer_is_forgotten_by_both_caches_even_if_its_id_comes_back() -> None:
    mp, wire, node = api([5, 6])
    # Its path ids (receive cache) and its confirmations (send cache).
    mp.process(5, simplify(1, "Node"))
    assert wire.take() == [(5, confirm("Node"))]
    mp.rpc_id(5, "/root/Node", "call", "x")
    mp.process(5, confirm("Node"))
    mp.rpc_id(5, "/root/Node", "call", "y")
    assert wire.take()[-1] == (5, call_by_id(1, "call", "y"))
    mp.peer_left(5)
    mp.peer_connected(5)  # a peer id may be given again (Godot draws them at random)
    mp.process(5, call_by_id(1, "call", "stale"))
    assert mp.stats()["rpc_cache"] == 1
    mp.process(5, confirm("Node"))  # nor may it confirm what was sent before it left
    assert mp.stats()["rpc_cache"] == 2
    mp.rpc_id(5, "/root/Node", "call", "z")
    assert wire.take() == [(5, simplify(1, "Node")), (5, call_full("Node", "call", "z"))]
    assert node.calls == []


def test_clear_drops_the_caches_and_keeps_the_nodes() -> None:
    mp, wire, node = api([5])
    mp.process(5, simplify(3, "Node"))
    mp.rpc("/root/Node", "call")
    mp.rpc("/root/Else", "call")
    wire.take()
    mp.clear()
    mp.process(5, call_by_id(3, "call"))
    assert mp.stats()["rpc_cache"] == 1
    mp.rpc("/root/Else", "call")  # ids start again at 1
    assert wire.take() == [(5, simplify(1, "Else")), (5, call_full("Else", "call"))]
    mp.process(5, call_full("Node", "call", "still here"))
    assert node.calls == [("call", 5, ("still here",))]


def test_rset_and_the_unreliable_forms_go_by_id_once_confirmed() -> None:
    mp, wire, _ = api([5, 6])
    mp.rset_id(5, "/root/Node", "hp", 1)
    assert wire.take() == [(5, simplify(1, "Node")), (5, set_full("Node", "hp", 1))]
    mp.process(5, confirm("Node"))
    mp.rset_unreliable_id(5, "/root/Node", "hp", 2)
    mp.rpc_unreliable_id(5, "/root/Node", "call", 3)
    assert wire.take() == [(5, set_by_id(1, "hp", 2)), (5, call_by_id(1, "call", 3))]
    mp.rset_unreliable("/root/Node", "hp", 4)  # 6 has not had the path: per peer
    assert wire.take() == [
        (6, simplify(1, "Node")),
        (5, set_by_id(1, "hp", 4)),
        (6, set_full("Node", "hp", 4)),
    ]


# -- handlers -------------------------------------------------------------------------------------


def test_the_sender_id_inside_nested_calls_and_arity_with_defaults() -> None:
    mp, _, node = api([5])
    assert mp.get_rpc_sender_id() == 0
    mp.process(5, call_full("Node", "nested"))
    assert node.calls == [("synced", SERVER, ("inner",)), ("nested", 5, (5,))]
    assert mp.get_rpc_sender_id() == 0
    node.calls.clear()
    for args in ((), (1,), (1, 2), (1, 2, 3)):
        mp.process(5, call_full("Node", "some", *args))
        mp.process(5, call_full("Node", "call", *args))  # *args: any count
    assert mp.stats()["rpc_arguments"] == 2
    assert [c for c in node.calls if c[0] == "some"] == [("some", 5, (1, 2)), ("some", 5, (1, 2))]
    assert len([c for c in node.calls if c[0] == "call"]) == 4


def test_objects_are_decoded_only_when_allowed() -> None:
    mp, _, node = api([5])
    raw = encode_variant(FullObject("Node2D", {"a": 1}), True)
    body = b"call\x00\x01" + raw
    packet = b"\x00" + (0x8000_0000 | (5 + len(body))).to_bytes(4, "little") + body + b"Node\0"
    mp.process(5, packet)
    assert mp.stats()["rpc_decode"] == 1 and node.calls == []
    mp.allow_object_decoding = True
    mp.process(5, packet)
    assert node.calls == [("call", 5, (FullObject("Node2D", {"a": 1}),))]


def test_what_the_api_refuses_from_its_own_user() -> None:
    mp, wire, node = api([5])
    mp.rpc_id(SERVER, "/root/Node", "call")  # as Godot: "not allowed by its mode", nothing sent
    assert wire.sent == [] and node.calls == []
    with pytest.raises(ValueError):
        mp.rpc("/root/Node", "call", *range(256))
    with pytest.raises(ValueError):
        mp.send_bytes(b"")
    with pytest.raises(KeyError):
        mp.set_network_master("/root/Nobody", 5)
    mp.rpc_id(77, "/root/Node", "call")  # not connected: logged, nothing sent
    assert wire.take() == []
    mp.unregister_node("/root/Node")
    assert not mp.has_nodes() and not mp.takes(call_full("Node", "call"))
    mp.register_node("/root/Node", Node(mp))
    mp.unregister_node("/root/Node")
    mp.register_node("/root/Other", Node(mp))
    mp.process(5, call_full("Node", "call"))
    assert mp.stats() == dict.fromkeys(DROP_REASONS, 0) | {"rpc_node": 1}


def test_which_packets_are_the_apis() -> None:
    mp, _, _ = api([5])
    assert [mp.takes(bytes([c]) + b"x") for c in range(8)] == [True] * 4 + [False] * 4
    assert not mp.takes(b"")  # an empty payload stays the relay's (get_packet)
    assert not MultiplayerAPI(Wire([])).takes(b"\x00xxxxx")  # no node: everything is raw
    got: list[tuple[int, bytes]] = []
    mp.connect("network_peer_packet", lambda i, d: got.append((i, bytes(d))))
    mp.raw(5, b"\x04data")
    mp.raw(5, b"\x04")  # nothing after the command: no signal (Godot: too short)
    assert got == [(5, b"data")]
