"""The typed contracts between the processes (wsfleet.ipc): config, control messages, kinds."""

from __future__ import annotations

import dataclasses
import os

import orjson
import pytest

from wsfleet.ipc import control
from wsfleet.ipc import messages as m
from wsfleet.ipc.config import FleetConfig, Limits, ShardConfig, TlsConfig

pytestmark = pytest.mark.timeout(30)


def limits(**changes) -> Limits:
    values = dict(
        handshake_timeout=5.0,
        max_peers=0,
        max_message_size=65536,
        max_request_bytes=8192,
        allowed_origins=("https://a.example", "https://b.example"),
        require_origin=False,
        ping_interval=20.0,
        ping_timeout=None,
    )
    values.update(changes)
    return Limits(**values)


def fleet_config(**changes) -> FleetConfig:
    values = dict(
        protocols=("godot", "chat"),
        limits=limits(),
        tls=TlsConfig(certificate="-----BEGIN CERT", private_key="-----BEGIN KEY", ca_chain=""),
        gd_mp_api=True,
        ring_capacity=1 << 16,
    )
    values.update(changes)
    return FleetConfig(**values)


MESSAGES = [
    fleet_config(),
    fleet_config(tls=None, limits=limits(allowed_origins=None, ping_interval=None)),
    control.Stop(),
    control.ShardUp(shard=3, pid=12345),
    control.ShardDown(shard=0),
    control.ShardFailed(shard=1, reason="it cannot boot"),
]


@pytest.mark.parametrize("message", MESSAGES, ids=lambda message: type(message).__name__)
def test_every_message_comes_back_equal_and_typed(message) -> None:
    data = control.encode(message)
    assert orjson.loads(data)["type"]  # a tagged JSON object on the wire
    decoded = control.decode(data)
    assert decoded == message
    assert type(decoded) is type(message)
    if isinstance(decoded, FleetConfig):
        assert isinstance(decoded.limits, Limits)
        assert isinstance(decoded.protocols, tuple)


def _wire(message) -> dict:
    return orjson.loads(control.encode(message))


@pytest.mark.parametrize(
    "change",
    [
        lambda raw: raw.update(type="no_such_message"),
        lambda raw: raw.pop("pid"),  # a field missing
        lambda raw: raw.update(extra=1),  # a field no one reads
        lambda raw: raw.update(pid="12345"),  # a string for an int
        lambda raw: raw.update(pid=True),  # a bool is not an int here
        lambda raw: raw.update(pid=1.5),
    ],
    ids=["unknown type", "missing", "extra", "str", "bool", "float"],
)
def test_a_malformed_shard_up_is_refused(change) -> None:
    raw = _wire(control.ShardUp(shard=1, pid=2))
    change(raw)
    with pytest.raises(control.ControlError):
        control.decode(orjson.dumps(raw))


@pytest.mark.parametrize(
    "change",
    [
        lambda raw: raw["limits"].update(handshake_timeout=-1),  # the class's own check
        lambda raw: raw["limits"].update(max_message_size=0),
        lambda raw: raw["limits"].update(allowed_origins="https://a.example"),  # not a list
        lambda raw: raw["limits"].pop("ping_timeout"),
        lambda raw: raw.update(protocols=[1, 2]),
        lambda raw: raw.update(ring_capacity=1000),  # not a power of two
        lambda raw: raw.update(tls={"certificate": "x"}),
    ],
)
def test_a_malformed_fleet_config_is_refused(change) -> None:
    raw = _wire(fleet_config())
    change(raw)
    with pytest.raises(control.ControlError):
        control.decode(orjson.dumps(raw))


def test_garbage_is_refused() -> None:
    for data in (b"not json", b"[1, 2]", b'"shard_up"'):
        with pytest.raises(control.ControlError):
            control.decode(data)


def test_the_classes_check_their_values() -> None:
    with pytest.raises(ValueError):
        limits(ping_interval=0.0)  # the front turns 0 into None before
    with pytest.raises(ValueError):
        limits(max_message_size=16 * 1024 * 1024 + 1)
    with pytest.raises(ValueError):
        TlsConfig(certificate="", private_key="x")
    with pytest.raises(dataclasses.FrozenInstanceError):
        limits().max_peers = 3  # type: ignore[misc]
    assert "BEGIN KEY" not in repr(fleet_config())  # a key never lands in a log


def test_each_shard_gets_its_own_id_range() -> None:
    config = fleet_config()
    shards = [config.for_shard(index, 3) for index in range(3)]
    assert all(isinstance(shard, ShardConfig) for shard in shards)
    assert [shard.id_base for shard in shards] == [m.id_range(i, 3).start for i in range(3)]
    assert all(shard.limits is config.limits and shard.gd_mp_api for shard in shards)
    for shard in shards:
        assert m.owner_of(shard.id_base, m.id_span(3)) == shard.index
        assert m.owner_of(shard.id_base + shard.id_span - 1, m.id_span(3)) == shard.index


def test_a_cluster_node_s_shards_split_its_slot() -> None:
    """Cluster slots cover valid Godot ids only, never overlap, and a node's shards carve
    their ranges from its slot (the owner shard and slot computed from an id)."""
    slots = [m.slot_range(slot) for slot in range(m.CLUSTER_SLOTS)]
    assert slots[0].start == m.FIRST_PEER_ID and slots[-1].stop <= m.ID_LIMIT
    assert all(a.stop == b.start for a, b in zip(slots, slots[1:], strict=False))
    assert m.slot_of(1) == -1 and m.slot_of(m.ID_LIMIT) == -1
    with pytest.raises(ValueError):
        m.slot_range(m.CLUSTER_SLOTS)
    for slot in (0, 77, m.CLUSTER_SLOTS - 1):
        ids = m.slot_range(slot)
        config = dataclasses.replace(fleet_config(), id_base=ids.start, id_total=len(ids))
        shards = [config.for_shard(index, 3) for index in range(3)]
        span = m.id_span(3, len(ids))
        for shard in shards:
            first, last = shard.id_base, shard.id_base + shard.id_span - 1
            assert ids.start <= first and last < ids.stop
            assert m.slot_of(first) == m.slot_of(last) == slot
            assert m.owner_of(first, span, ids.start) == shard.index
            assert m.owner_of(last, span, ids.start) == shard.index
        assert [s.id_base + s.id_span for s in shards[:-1]] == [s.id_base for s in shards[1:]]
    with pytest.raises(ValueError):
        dataclasses.replace(fleet_config(), id_base=1)


def test_only_shard_up_carries_descriptors_over_a_real_socket() -> None:
    front, supervisor = control.socketpair()
    try:
        fds = [os.eventfd(0, os.EFD_CLOEXEC) for _ in range(control.SHARD_UP_FDS)]
        control.send(supervisor, control.ShardUp(shard=0, pid=os.getpid()), fds)
        message, received = control.receive(front)
        assert message == control.ShardUp(shard=0, pid=os.getpid())
        assert len(received) == control.SHARD_UP_FDS
        for fd in fds + received:
            os.close(fd)
        # A message that must come alone but brings a descriptor: refused, descriptor closed.
        stray = os.eventfd(0, os.EFD_CLOEXEC)
        control.send(supervisor, control.ShardDown(shard=0), [stray])
        os.close(stray)
        before = set(os.listdir("/proc/self/fd"))
        with pytest.raises(control.ControlError):
            control.receive(front)
        assert set(os.listdir("/proc/self/fd")) <= before
        supervisor.close()
        assert control.receive(front) is None  # the other end closed
    finally:
        front.close()
        supervisor.close()


def test_the_kinds_are_enums_and_the_constants_plain_ints() -> None:
    assert m.EV_BINARY == m.Event.BINARY and type(m.EV_BINARY) is int
    assert m.CMD_MP_FORWARD == m.Command.MP_FORWARD and type(m.CMD_MP_FORWARD) is int
    assert len({kind.value for kind in m.Event}) == len(m.Event)
    assert len({kind.value for kind in m.Command}) == len(m.Command)
    assert m.DROP_REASONS == ("short", "type", "from", "target", "group")
    assert [reason.value for reason in m.DropReason] == list(range(len(m.DROP_REASONS)))
    counts = [5, 0, 7, 1, 3]
    assert m.decode_drops(m.encode_drops(counts)) == tuple(counts)
    payload = m.encode_group_frame([b"red", "bl\u00fce".encode(), b""], b"\0frame")
    names, frame = m.decode_group_frame(payload)
    assert names == [b"red", "bl\u00fce".encode(), b""] and bytes(frame) == b"\0frame"
    assert m.decode_mp_group(m.encode_mp_group(b"room", [7, 2, 9])) == (b"room", (7, 2, 9))
    assert m.decode_mp_group(m.encode_mp_group(b"", [])) == (b"", ())
