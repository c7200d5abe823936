"""The Godot 3.2 Variant codec against bytes captured from the real engine, and its edges."""

from __future__ import annotations

import json
import math
import struct
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wsfleet.variant import (
    AABB,
    ERR_INVALID_DATA,
    ERR_INVALID_PARAMETER,
    ERR_OUT_OF_MEMORY,
    ERR_UNAUTHORIZED,
    MAX_DEPTH,
    MAX_ENCODED_SIZE,
    RID,
    Basis,
    Color,
    EncodedObjectAsID,
    FullObject,
    NodePath,
    Plane,
    PoolColorArray,
    PoolIntArray,
    PoolRealArray,
    PoolStringArray,
    PoolVector2Array,
    PoolVector3Array,
    Quat,
    Rect2,
    Transform,
    Transform2D,
    VariantError,
    VariantType,
    Vector2,
    Vector3,
    decode_variant,
    decode_variant_at,
    encode_variant,
)

# Vectors produced by Godot 3.2 itself (docs/GODOT_VARIANT.md says what they cover). Missing
# vectors must fail the run (a collection error), never skip it.
VECTORS_PATH = Path(__file__).resolve().parent / "data" / "godot_variants.json"
if not VECTORS_PATH.is_file():
    raise FileNotFoundError(f"Godot test vectors missing: {VECTORS_PATH}")
VECTORS: list[dict[str, Any]] = json.loads(VECTORS_PATH.read_text())["vectors"]
VECTOR_IDS = [vector["name"] for vector in VECTORS]

FLOAT_STRUCTS = {
    cls.__name__: cls
    for cls in (Vector2, Rect2, Vector3, Transform2D, Plane, Quat, AABB, Basis, Transform, Color)
}
VECTOR_POOLS = {
    "PoolVector2Array": (PoolVector2Array, Vector2),
    "PoolVector3Array": (PoolVector3Array, Vector3),
    "PoolColorArray": (PoolColorArray, Color),
}


def expected_value(tagged: list) -> Any:
    """The Python value of a vector's ``[type, payload]`` (see the file's "about")."""
    kind, payload = tagged
    if kind == "Nil":
        assert payload is None
        return None
    if kind in ("bool", "String"):
        return payload
    if kind == "int":
        assert type(payload) is int
        return payload
    if kind == "float":
        return float(payload)
    if kind in FLOAT_STRUCTS:
        return FLOAT_STRUCTS[kind](*map(float, payload))
    if kind == "NodePath":
        return NodePath.from_string(payload)
    if kind == "Dictionary":
        return {expected_value(key): expected_value(value) for key, value in payload}
    if kind == "Array":
        return [expected_value(item) for item in payload]
    if kind == "PoolByteArray":
        return bytes.fromhex(payload)
    if kind == "PoolIntArray":
        return PoolIntArray(payload)
    if kind == "PoolRealArray":
        return PoolRealArray(map(float, payload))
    if kind == "PoolStringArray":
        return PoolStringArray(payload)
    if kind in VECTOR_POOLS:
        pool, item = VECTOR_POOLS[kind]
        return pool(item(*map(float, element)) for element in payload)
    raise AssertionError(f"unknown type in the vectors: {kind}")


def same(a: Any, b: Any) -> bool:
    """Equality that also requires equal types all the way down (``1 != 1.0 != True``),
    equal dict order, and tells -0.0 from 0.0 (NaN equals NaN)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        if math.isnan(a) or math.isnan(b):
            return math.isnan(a) and math.isnan(b)
        return a == b and math.copysign(1.0, a) == math.copysign(1.0, b)
    if isinstance(a, list | tuple):  # also the NamedTuple value types and Pool*Arrays
        return len(a) == len(b) and all(map(same, a, b))
    if isinstance(a, dict):
        return len(a) == len(b) and all(
            same(ka, kb) and same(va, vb)
            for (ka, va), (kb, vb) in zip(a.items(), b.items(), strict=True)
        )
    if isinstance(a, FullObject):
        return same(a.class_name, b.class_name) and same(a.properties, b.properties)
    return a == b


def zero_node_path_padding(raw: bytes) -> bytes:
    """Godot's NodePath bytes with their (uninitialised) string padding set to zero."""
    out = bytearray(raw)
    name_count, subname_count, _flags = struct.unpack_from("<III", raw, 4)
    pos = 16
    for _ in range((name_count & 0x7FFFFFFF) + subname_count):
        (length,) = struct.unpack_from("<I", raw, pos)
        pos += 4 + length
        pad = -length % 4
        out[pos : pos + pad] = bytes(pad)
        pos += pad
    assert pos == len(raw)
    return bytes(out)


def godot_bytes(vector: dict[str, Any]) -> bytes:
    """The exact bytes we must produce for a vector.

    NodePath is the one type where Godot's output holds uninitialised padding
    (``encode_variant`` skips the pad bytes without writing them), so we compare against
    Godot's bytes with that padding zeroed: we write zeros, as the protocol notes say.
    """
    raw = bytes.fromhex(vector["hex"])
    if vector["value"][0] == "NodePath":
        return zero_node_path_padding(raw)
    return raw


def error_of(data: bytes, **kwargs: Any) -> int:
    with pytest.raises(VariantError) as info:
        decode_variant(data, **kwargs)
    return info.value.error


def encode_error_of(value: Any, **kwargs: Any) -> int:
    with pytest.raises(VariantError) as info:
        encode_variant(value, **kwargs)
    return info.value.error


def h(text: str) -> bytes:
    return bytes.fromhex(text.replace(" ", "").replace("|", ""))


# --------------------------------------------------------------------------- engine vectors


def test_vector_file_is_complete() -> None:
    assert len(VECTORS) == 49
    assert len(set(VECTOR_IDS)) == 49
    type_ids = {bytes.fromhex(vector["hex"])[0] for vector in VECTORS}
    missing = set(range(VariantType.VARIANT_MAX)) - type_ids
    assert missing == {VariantType.RID, VariantType.OBJECT}


@pytest.mark.parametrize("vector", VECTORS, ids=VECTOR_IDS)
def test_decode_engine_bytes(vector: dict[str, Any]) -> None:
    decoded = decode_variant(bytes.fromhex(vector["hex"]))
    assert same(decoded, expected_value(vector["value"])), decoded
    if vector["value"][0] == "NodePath":
        assert str(decoded) == vector["value"][1]


@pytest.mark.parametrize("vector", VECTORS, ids=VECTOR_IDS)
def test_encode_matches_engine_bytes(vector: dict[str, Any]) -> None:
    expected = godot_bytes(vector)
    assert encode_variant(expected_value(vector["value"])).hex() == expected.hex()
    assert encode_variant(decode_variant(bytes.fromhex(vector["hex"]))) == expected


@pytest.mark.parametrize("vector", VECTORS, ids=VECTOR_IDS)
def test_every_truncation_is_invalid_data(vector: dict[str, Any]) -> None:
    raw = bytes.fromhex(vector["hex"])
    for cut in range(len(raw)):
        with pytest.raises(VariantError) as info:
            decode_variant(raw[:cut])
        assert info.value.error == ERR_INVALID_DATA, cut


def test_node_path_padding_quirk() -> None:
    """Godot leaves NodePath padding uninitialised; we ignore it and write zeros."""
    vector = VECTORS[VECTOR_IDS.index("nodepath_rel")]
    raw = bytes.fromhex(vector["hex"])
    assert zero_node_path_padding(raw) != raw  # the capture really holds garbage there
    path = decode_variant(raw)
    assert path == NodePath(("Harness", "Child"), ("prop", "sub"), False)
    assert encode_variant(path) == zero_node_path_padding(raw)


def test_pool_string_array_counts_trailing_nul() -> None:
    encoded = encode_variant(PoolStringArray(["a", "bcd", ""]))
    assert encoded == h(
        "17000000 03000000 | 02000000 61000000 | 04000000 62636400 | 01000000 00000000"
    )
    # A NUL inside the counted bytes ends the string, as Godot's parse_utf8 does.
    assert decode_variant(h("17000000 01000000 04000000 61006200")) == ["a"]


# --------------------------------------------------------------------------- protocol §5 examples

PROTOCOL_EXAMPLES = [
    (None, "00000000"),
    (True, "01000000 01000000"),
    (42, "02000000 2a000000"),
    (-7, "02000000 f9ffffff"),
    (2**40, "02000100 0000000000010000"),
    (1.5, "03000000 0000c03f"),
    (0.1, "03000100 9a9999999999b93f"),
    ("hé", "04000000 03000000 68c3a900"),
    ("", "04000000 00000000"),
    (Vector2(1.5, -2.0), "05000000 0000c03f 000000c0"),
    (Vector3(1.0, 2.0, 3.0), "07000000 0000803f 00000040 00004040"),
    (Color(1.0, 0.5, 0.0, 1.0), "0e000000 0000803f 0000003f 00000000 0000803f"),
    ({"k": 1}, "12000000 01000000 04000000 01000000 6b000000 02000000 01000000"),
    ([1, "a"], "13000000 02000000 02000000 01000000 04000000 01000000 61000000"),
    (b"\x01\x02\x03", "14000000 03000000 01020300"),
    (
        [1, "two", 3.0, [4]],
        "13000000 04000000 | 02000000 01000000 | 04000000 03000000 74776f00 |"
        " 03000000 00004040 | 13000000 01000000 02000000 04000000",
    ),
]


@pytest.mark.parametrize(("value", "hex_text"), PROTOCOL_EXAMPLES, ids=repr)
def test_protocol_examples(value: Any, hex_text: str) -> None:
    assert encode_variant(value) == h(hex_text)
    assert same(decode_variant(h(hex_text)), value)


# --------------------------------------------------------------------------- numbers


@pytest.mark.parametrize(
    ("value", "hex_text"),
    [
        (2**31 - 1, "02000000 ffffff7f"),
        (2**31, "02000100 0000008000000000"),
        (-(2**31), "02000000 00000080"),
        (-(2**31) - 1, "02000100 ffffff7fffffffff"),
        (2**63 - 1, "02000100 ffffffffffffff7f"),
        (-(2**63), "02000100 0000000000000080"),
    ],
)
def test_int_width(value: int, hex_text: str) -> None:
    assert encode_variant(value) == h(hex_text)
    assert decode_variant(h(hex_text)) == value


@pytest.mark.parametrize("value", [2**63, -(2**63) - 1, 10**30])
def test_int_beyond_int64_is_refused(value: int) -> None:
    assert encode_error_of(value) == ERR_INVALID_PARAMETER


@pytest.mark.parametrize(
    ("value", "is_f64"),
    [
        (1.5, False),
        (-0.0, False),
        (math.inf, False),  # (double)(float)inf == inf in Godot too
        (-math.inf, False),
        (2.0**-149, False),  # the smallest float32 subnormal
        (3.4028234663852886e38, False),  # FLT_MAX
        (3.4028235677973366e38, True),  # just above FLT_MAX: overflows float32
        (float(2**24 + 1), True),
        (0.1, True),
        (1e300, True),
        (math.nan, True),  # NaN != NaN, so Godot writes it as a double
    ],
)
def test_float_width(value: float, is_f64: bool) -> None:
    encoded = encode_variant(value)
    assert len(encoded) == (12 if is_f64 else 8)
    assert encoded[:4] == (h("03000100") if is_f64 else h("03000000"))
    assert same(decode_variant(encoded), value)


def test_bool_is_any_nonzero_u32() -> None:
    assert decode_variant(h("01000000 00010000")) is True
    assert decode_variant(h("01000000 00000000")) is False


# --------------------------------------------------------------------------- header and errors


@pytest.mark.parametrize("type_id", [27, 28, 200, 255])
def test_unknown_type_id_is_invalid_data(type_id: int) -> None:
    assert error_of(struct.pack("<II", type_id, 0)) == ERR_INVALID_DATA


def test_header_type_is_low_byte() -> None:
    # Godot 3.x decodes `header & 0xFF`; the 64-bit flag only matters to INT/REAL/OBJECT.
    assert decode_variant(h("02ff0000 2a000000")) == 42
    assert decode_variant(h("04000100 01000000 61000000")) == "a"
    assert decode_variant(h("00010000")) is None  # 0x100 & 0xFF: NIL
    assert error_of(h("1b010000")) == ERR_INVALID_DATA  # 0x11B & 0xFF == 27


def test_empty_and_short_buffers_are_invalid_data() -> None:
    assert error_of(b"") == ERR_INVALID_DATA
    assert error_of(b"\0\0\0") == ERR_INVALID_DATA


@pytest.mark.parametrize(
    "hex_text",
    [
        "13000000 ffffff7f 00000000",  # Array
        "12000000 ffffff7f 00000000",  # Dictionary
        "14000000 ffffff7f 00000000",  # PoolByteArray
        "15000000 ffffff7f 00000000",  # PoolIntArray
        "16000000 ffffff3f 00000000",  # PoolRealArray
        "17000000 ffffff7f 00000000",  # PoolStringArray
        "18000000 ffffff0f 00000000",  # PoolVector2Array
        "19000000 ffffff0f 00000000",  # PoolVector3Array
        "1a000000 ffffff07 00000000",  # PoolColorArray
        "04000000 ffffff7f 61000000",  # String
        "0f000000 ffffffff ffffffff 00000000",  # NodePath
        "14000000 ffffffff",  # negative PoolByteArray length
        "15000000 ffffffff",  # negative PoolIntArray count
        "17000000 ffffffff",  # negative PoolStringArray count
    ],
)
def test_huge_counts_fail_fast(hex_text: str) -> None:
    start = time.perf_counter()
    assert error_of(h(hex_text)) == ERR_INVALID_DATA
    assert time.perf_counter() - start < 0.5


def test_huge_full_object_property_count_fails_fast() -> None:
    data = h("11000000 01000000 41000000 ffffff7f")
    start = time.perf_counter()
    assert error_of(data, allow_objects=True) == ERR_INVALID_DATA
    assert time.perf_counter() - start < 0.5


def test_container_count_bit31_is_ignored() -> None:
    assert decode_variant(h("13000000 01000080 02000000 05000000")) == [5]
    assert decode_variant(h("12000000 01000080 00000000 00000000")) == {None: None}


def test_node_path_old_format_is_invalid_data() -> None:
    # The same path with bit 31 set decodes: only the missing "new format" bit is refused.
    new_format = h("0f000000 01000080 00000000 00000000 01000000 61000000")
    assert decode_variant(new_format) == NodePath(("a",))
    old_format = h("0f000000 01000000 00000000 00000000 01000000 61000000")
    assert error_of(old_format) == ERR_INVALID_DATA


def test_node_path_obsolete_property_flag_adds_a_subname() -> None:
    data = h("0f000000 01000080 00000000 02000000 01000000 61000000 01000000 70000000")
    assert decode_variant(data) == NodePath(("a",), ("p",), False)


def test_invalid_utf8_is_invalid_data() -> None:
    assert error_of(h("04000000 02000000 c3280000")) == ERR_INVALID_DATA


def test_string_decoding_follows_godot_parse_utf8() -> None:
    # Godot stops at the first NUL and drops a leading byte order mark.
    assert decode_variant(h("04000000 03000000 61006200")) == "a"
    assert decode_variant(h("04000000 04000000 efbbbf78")) == "x"


def test_trailing_bytes_are_ignored_like_get_var() -> None:
    data = h("02000000 2a000000 04000000 01000000 61000000")
    assert decode_variant(data) == 42
    assert decode_variant_at(data) == (42, 8)
    assert decode_variant_at(data, 8) == ("a", 20)
    assert decode_variant(data + b"\xff") == 42


def test_decode_accepts_bytearray_and_memoryview() -> None:
    data = h("02000000 2a000000")
    assert decode_variant(bytearray(data)) == 42
    assert decode_variant(memoryview(data)) == 42


# --------------------------------------------------------------------------- objects


def test_object_as_id() -> None:
    data = h("11000100 d2040000 00000000")
    assert encode_variant(EncodedObjectAsID(1234)) == data
    assert decode_variant(data) == EncodedObjectAsID(1234)
    assert decode_variant(h("11000100 00000000 00000000")) is None  # id 0: a null Object


# Node2D with one stored property x = 7: class name, property count, (name, value) pairs.
FULL_OBJECT = h(
    "11000000 | 06000000 4e6f64653244 0000 | 01000000 | 01000000 78000000 | 02000000 07000000"
)


def test_full_object_needs_permission() -> None:
    assert error_of(FULL_OBJECT) == ERR_UNAUTHORIZED
    assert error_of(h("13000000 01000000") + FULL_OBJECT) == ERR_UNAUTHORIZED


def test_full_object_with_permission() -> None:
    decoded = decode_variant(FULL_OBJECT, allow_objects=True)
    assert same(decoded, FullObject("Node2D", {"x": 7}))
    assert encode_variant(decoded, full_objects=True) == FULL_OBJECT
    assert decode_variant(h("11000000 00000000"), allow_objects=True) is None  # class "": null


def test_full_object_encoding_needs_full_objects() -> None:
    assert encode_error_of(FullObject("Node", {})) == ERR_INVALID_PARAMETER


def test_rid_is_header_only() -> None:
    assert encode_variant(RID()) == h("10000000")
    assert decode_variant(h("10000000")) == RID()


# --------------------------------------------------------------------------- depth and size


def nested_lists(levels: int) -> list:
    value: list = []
    for _ in range(levels - 1):
        value = [value]
    return value


def test_depth_limit() -> None:
    deepest = nested_lists(MAX_DEPTH)
    encoded = encode_variant(deepest)
    assert decode_variant(encoded) == deepest
    too_deep = [deepest]
    assert encode_error_of(too_deep) == ERR_OUT_OF_MEMORY
    assert error_of(h("13000000 01000000") + encoded) == ERR_INVALID_DATA
    dict_chain = h("12000000 01000000 00000000") * (MAX_DEPTH + 1) + h("00000000")
    assert error_of(dict_chain) == ERR_INVALID_DATA


def test_hostile_nesting_does_not_reach_the_python_stack() -> None:
    data = h("13000000 01000000") * 200_000
    start = time.perf_counter()
    assert error_of(data) == ERR_INVALID_DATA
    assert time.perf_counter() - start < 0.5


def test_self_referencing_list_is_refused() -> None:
    loop: list = []
    loop.append(loop)
    assert encode_error_of(loop) == ERR_OUT_OF_MEMORY


def test_encoded_size_limit() -> None:
    fits = bytes(MAX_ENCODED_SIZE - 8)  # header + length + data: exactly the limit
    assert len(encode_variant(fits)) == MAX_ENCODED_SIZE
    assert encode_error_of(bytes(MAX_ENCODED_SIZE - 4)) == ERR_OUT_OF_MEMORY
    assert encode_variant(b"", max_size=8) == h("14000000 00000000")
    assert encode_error_of(b"", max_size=7) == ERR_OUT_OF_MEMORY
    assert len(encode_variant(bytes(MAX_ENCODED_SIZE), max_size=None)) == MAX_ENCODED_SIZE + 8


# --------------------------------------------------------------------------- Python mapping


@pytest.mark.parametrize(
    "value",
    [
        {1, 2},
        object(),
        1j,
        "\ud800",  # a lone surrogate has no UTF-8 form
        PoolIntArray([2**31]),
        PoolIntArray([1.5]),
        PoolRealArray([1e39]),
        Vector2(1e39, 0.0),
        PoolVector2Array([(1.0, 2.0, 3.0)]),
        PoolStringArray([b"bytes"]),
        EncodedObjectAsID(-1),
    ],
    ids=[
        "set",
        "object",
        "complex",
        "lone-surrogate",
        "pool-int-overflow",
        "pool-int-float",
        "pool-real-overflow",
        "vector2-overflow",
        "pool-vector2-arity",
        "pool-string-bytes",
        "negative-object-id",
    ],
)
def test_unencodable_values(value: Any) -> None:
    assert encode_error_of(value) == ERR_INVALID_PARAMETER


def test_python_aliases_encode_like_their_godot_type() -> None:
    assert encode_variant((1, "a")) == encode_variant([1, "a"])
    assert encode_variant(bytearray(b"\x01\x02")) == encode_variant(b"\x01\x02")
    assert encode_variant(memoryview(b"\x01\x02")) == encode_variant(b"\x01\x02")
    assert encode_variant(PoolVector2Array([(1.0, 2.0)])) == encode_variant(
        PoolVector2Array([Vector2(1.0, 2.0)])
    )


def test_subclasses_encode_as_their_base() -> None:
    from collections import OrderedDict
    from enum import IntEnum

    class Level(IntEnum):
        HIGH = 3

    assert encode_variant(Level.HIGH) == encode_variant(3)
    assert encode_variant(OrderedDict(a=1)) == encode_variant({"a": 1})
    assert encode_variant(True) == h("01000000 01000000")  # bool is not encoded as int


def test_array_dictionary_keys_decode_as_tuples() -> None:
    encoded = encode_variant({(1, (2,)): "v"})
    assert decode_variant(encoded) == {(1, (2,)): "v"}
    assert encode_variant(decode_variant(encoded)) == encoded


def test_unhashable_dictionary_key_is_invalid_data() -> None:
    # {{}: 1} in Godot; Python dicts cannot hold a dict key.
    assert error_of(h("12000000 01000000 12000000 00000000 02000000 01000000")) == (
        ERR_INVALID_DATA
    )


def test_value_types_compare_by_type() -> None:
    assert Color(1.0, 2.0, 3.0, 4.0) != Quat(1.0, 2.0, 3.0, 4.0)
    assert Vector2(1.0, 2.0) != (1.0, 2.0)
    assert (1.0, 2.0) != Vector2(1.0, 2.0)
    assert Vector2(1, 2) == Vector2(1.0, 2.0)
    keys = {Color(1.0, 2.0, 3.0, 4.0): "c", Quat(1.0, 2.0, 3.0, 4.0): "q", (1.0, 2.0): "t"}
    assert len(keys) == 3
    assert Color(0.5, 0.5, 0.5).a == 1.0


@pytest.mark.parametrize(
    ("text", "names", "subnames", "absolute"),
    [
        ("", (), (), False),
        ("/root/Main", ("root", "Main"), (), True),
        ("Harness/Child:prop:sub", ("Harness", "Child"), ("prop", "sub"), False),
        (":position:x", (), ("position", "x"), False),
        ("../Sibling", ("..", "Sibling"), (), False),
        ("/", (), (), True),
    ],
)
def test_node_path_text_form(
    text: str, names: tuple[str, ...], subnames: tuple[str, ...], absolute: bool
) -> None:
    path = NodePath.from_string(text)
    assert path == NodePath(names, subnames, absolute)
    assert str(path) == text
    assert decode_variant(encode_variant(path)) == path


def test_node_path_accepts_lists_and_rejects_empty_subnames() -> None:
    assert NodePath(["a"], ["b"]) == NodePath(("a",), ("b",))
    assert hash(NodePath(["a"])) == hash(NodePath(("a",)))
    with pytest.raises(ValueError):
        NodePath.from_string("a::b")


# --------------------------------------------------------------------------- round trips

f32 = st.floats(width=32, allow_nan=False)
text = st.text(
    st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=12
).filter(lambda s: not s.startswith("\ufeff"))  # Godot drops NULs onwards and a leading BOM
float_structs = st.one_of(
    [
        st.tuples(*[f32] * len(cls._fields)).map(cls._make)  # type: ignore[attr-defined]
        for cls in FLOAT_STRUCTS.values()
    ]
)
hashable = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(allow_nan=False),
    text,
    st.binary(max_size=9),
    float_structs,
    st.builds(NodePath, st.lists(text, max_size=3), st.lists(text, max_size=3), st.booleans()),
    st.just(RID()),
    st.integers(min_value=1, max_value=2**64 - 1).map(EncodedObjectAsID),
)
pools = st.one_of(
    st.lists(st.integers(-(2**31), 2**31 - 1), max_size=5).map(PoolIntArray),
    st.lists(f32, max_size=5).map(PoolRealArray),
    st.lists(text, max_size=5).map(PoolStringArray),
    st.lists(st.tuples(f32, f32).map(Vector2._make), max_size=4).map(PoolVector2Array),
    st.lists(st.tuples(f32, f32, f32).map(Vector3._make), max_size=4).map(PoolVector3Array),
    st.lists(st.tuples(f32, f32, f32, f32).map(Color._make), max_size=4).map(PoolColorArray),
)
variants = st.recursive(
    hashable | pools,
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(hashable, children, max_size=5)
    ),
    max_leaves=25,
)


@settings(max_examples=300, deadline=None)
@given(variants)
def test_round_trip(value: Any) -> None:
    encoded = encode_variant(value)
    assert len(encoded) % 4 == 0
    decoded = decode_variant(encoded)
    assert same(decoded, value), (decoded, value)
    assert encode_variant(decoded) == encoded


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=64))
def test_random_bytes_decode_or_raise_variant_error(data: bytes) -> None:
    try:
        value = decode_variant(data, allow_objects=True)
    except VariantError as exc:
        assert exc.error == ERR_INVALID_DATA
    else:
        again, end = decode_variant_at(data, allow_objects=True)
        assert same(again, value)
        assert 4 <= end <= len(data)
        assert end % 4 == 0
