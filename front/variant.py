"""Godot 3.2 Variant binary codec (``var2bytes``/``bytes2var``, ``put_var``/``get_var``).

Layout (all little-endian, every item padded to a multiple of 4 bytes): a u32 header whose
low byte is the type id (Godot 3.x decodes ``header & 0xFF``; the other bits are ignored
except bit 16, the 64-bit flag of INT/REAL and the "object as id" flag of OBJECT), then the
payload. See ``docs/GODOT_VARIANT.md`` (the format, its quirks and the test vectors).

Python mapping:

========================  =========================================================
Godot                     Python
========================  =========================================================
NIL, BOOL, INT, REAL      ``None``, ``bool``, ``int``, ``float``
STRING                    ``str``
DICTIONARY, ARRAY         ``dict`` (insertion order), ``list`` (``tuple`` encodes too)
POOL_BYTE_ARRAY           ``bytes`` (``bytearray``/``memoryview`` encode too)
vectors, NodePath, ...    the value types defined here (`Vector2`, `NodePath`, ...)
========================  =========================================================

Behaviour copied from Godot 3.2.3 (``core/io/marshalls.cpp``):

* INT is written as i32, or as i64 with the 64-bit flag outside the int32 range; REAL as
  f32 when float32 holds the value exactly, else as f64 with the flag (NaN is therefore f64).
* Decoding a string stops at its first NUL byte and skips a leading UTF-8 byte order mark
  (Godot's ``String::parse_utf8``). PoolStringArray lengths count a trailing NUL.
* NodePath pads its strings with uninitialised bytes: their content is ignored here and
  zeros are written. A NodePath whose first count lacks bit 31 (the pre-3.0 format) is
  ``ERR_INVALID_DATA``; flag bit 1 (obsolete separate property) adds one subname.
* Bit 31 of a Dictionary/Array count (the old "shared" flag) is ignored.
* Bytes after the first value are ignored, as ``get_var``/``bytes2var`` do
  (`decode_variant_at` reports where the value ended).

Deliberate differences, all on malformed input or on values Godot cannot hold:

* Every decoding error is ``ERR_INVALID_DATA`` (Godot reports a truncated string as
  ``ERR_FILE_EOF``); a missing pad after the last PoolByteArray of a buffer, or a negative
  PoolStringArray/Object property count, is an error rather than accepted.
* Containers may nest `MAX_DEPTH` deep (Godot 3.2.3 has no limit and overflows its stack):
  deeper data is ``ERR_INVALID_DATA`` when decoding and ``ERR_OUT_OF_MEMORY`` when encoding
  (what later 3.x releases return), which also stops self-referencing lists.
* Python dictionaries cannot hold unhashable keys: an Array key decodes as a ``tuple``
  (which encodes back as an Array); a Dictionary or Pool*Array key is ``ERR_INVALID_DATA``.
  Keys Godot keeps apart but Python merges (``1``, ``1.0``, ``True``) keep the last value.
* Values a Godot type cannot hold (an int outside int64, an element outside int32 in a
  PoolIntArray, a float beyond float32 in a vector, a str with lone surrogates, an unknown
  Python type) raise `VariantError` with ``ERR_INVALID_PARAMETER``.
"""

from __future__ import annotations

import struct
import sys
from array import array
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any, NamedTuple, TypeVar

__all__ = [
    "AABB",
    "ERR_INVALID_DATA",
    "ERR_INVALID_PARAMETER",
    "ERR_OUT_OF_MEMORY",
    "ERR_UNAUTHORIZED",
    "MAX_DEPTH",
    "MAX_ENCODED_SIZE",
    "RID",
    "Basis",
    "Color",
    "EncodedObjectAsID",
    "FullObject",
    "NodePath",
    "Plane",
    "PoolColorArray",
    "PoolIntArray",
    "PoolRealArray",
    "PoolStringArray",
    "PoolVector2Array",
    "PoolVector3Array",
    "Quat",
    "Rect2",
    "Transform",
    "Transform2D",
    "VariantError",
    "VariantType",
    "Vector2",
    "Vector3",
    "decode_variant",
    "decode_variant_at",
    "encode_variant",
]

# Godot 3.2 `Error` numbers used here (core/error_list.h).
ERR_UNAUTHORIZED = 4
ERR_OUT_OF_MEMORY = 6
ERR_INVALID_DATA = 30
ERR_INVALID_PARAMETER = 31

MAX_ENCODED_SIZE = 8 * 1024 * 1024
"""``PacketPeer.encode_buffer_max_size`` default: `encode_variant` refuses longer output."""

MAX_DEPTH = 512
"""Most Array/Dictionary/Object levels nested inside each other (the outermost counts)."""


class VariantError(ValueError):
    """A value that cannot be encoded or bytes that cannot be decoded.

    ``error`` holds Godot's ``Error`` number: `ERR_INVALID_DATA` (malformed or truncated
    data, unknown type id), `ERR_UNAUTHORIZED` (a full Object while objects are not
    allowed), `ERR_OUT_OF_MEMORY` (encoding too large or too deep) or
    `ERR_INVALID_PARAMETER` (a Python value Godot cannot represent).
    """

    def __init__(self, error: int, message: str) -> None:
        super().__init__(message)
        self.error = error


class VariantType(IntEnum):
    """Godot 3.2 ``Variant::Type`` ids (Godot 4 renumbers them)."""

    NIL = 0
    BOOL = 1
    INT = 2
    REAL = 3
    STRING = 4
    VECTOR2 = 5
    RECT2 = 6
    VECTOR3 = 7
    TRANSFORM2D = 8
    PLANE = 9
    QUAT = 10
    AABB = 11
    BASIS = 12
    TRANSFORM = 13
    COLOR = 14
    NODE_PATH = 15
    RID = 16
    OBJECT = 17
    DICTIONARY = 18
    ARRAY = 19
    POOL_BYTE_ARRAY = 20
    POOL_INT_ARRAY = 21
    POOL_REAL_ARRAY = 22
    POOL_STRING_ARRAY = 23
    POOL_VECTOR2_ARRAY = 24
    POOL_VECTOR3_ARRAY = 25
    POOL_COLOR_ARRAY = 26
    VARIANT_MAX = 27


# --------------------------------------------------------------------------- value types


_T = TypeVar("_T")


def _strict_equality(cls: type[_T]) -> type[_T]:
    """Make a NamedTuple equal only to the same type: ``Color(1, 2, 3, 4) != Quat(1, 2, 3, 4)``
    and ``Vector2(1, 2) != (1, 2)``, so that different Godot types stay apart as dict keys."""

    def __eq__(self: tuple, other: object) -> bool:
        return type(self) is type(other) and tuple.__eq__(self, other)

    def __ne__(self: tuple, other: object) -> bool:
        return not __eq__(self, other)

    cls.__eq__ = __eq__  # type: ignore[method-assign, assignment]
    cls.__ne__ = __ne__  # type: ignore[method-assign, assignment]
    cls.__hash__ = tuple.__hash__  # type: ignore[method-assign, assignment]
    return cls


@_strict_equality
class Vector2(NamedTuple):
    """Godot ``Vector2`` (float32 components)."""

    x: float
    y: float


@_strict_equality
class Rect2(NamedTuple):
    """Godot ``Rect2``: position then size."""

    x: float
    y: float
    w: float
    h: float


@_strict_equality
class Vector3(NamedTuple):
    """Godot ``Vector3``."""

    x: float
    y: float
    z: float


@_strict_equality
class Transform2D(NamedTuple):
    """Godot ``Transform2D`` in ``elements[i][j]`` order: x axis, y axis, origin."""

    xx: float
    xy: float
    yx: float
    yy: float
    ox: float
    oy: float


@_strict_equality
class Plane(NamedTuple):
    """Godot ``Plane``: normal x, y, z, then distance d."""

    x: float
    y: float
    z: float
    d: float


@_strict_equality
class Quat(NamedTuple):
    """Godot ``Quat``."""

    x: float
    y: float
    z: float
    w: float


@_strict_equality
class AABB(NamedTuple):
    """Godot ``AABB``: position x, y, z, then size x, y, z."""

    x: float
    y: float
    z: float
    size_x: float
    size_y: float
    size_z: float


@_strict_equality
class Basis(NamedTuple):
    """Godot ``Basis``, row-major: ``mIJ`` is ``elements[I][J]`` (row I, column J)."""

    m00: float
    m01: float
    m02: float
    m10: float
    m11: float
    m12: float
    m20: float
    m21: float
    m22: float


@_strict_equality
class Transform(NamedTuple):
    """Godot ``Transform``: the row-major basis (as in `Basis`), then the origin."""

    m00: float
    m01: float
    m02: float
    m10: float
    m11: float
    m12: float
    m20: float
    m21: float
    m22: float
    ox: float
    oy: float
    oz: float


@_strict_equality
class Color(NamedTuple):
    """Godot ``Color`` (r, g, b, a; alpha defaults to 1 as in Godot)."""

    r: float
    g: float
    b: float
    a: float = 1.0


@dataclass(frozen=True, slots=True)
class NodePath:
    """Godot ``NodePath``: node names, then subnames (properties), and whether it is absolute.

    ``str()`` gives Godot's text form (``"/root/Main"``, ``"Child:prop:sub"``);
    `NodePath.from_string` parses it.
    """

    names: tuple[str, ...] = ()
    subnames: tuple[str, ...] = ()
    absolute: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "names", tuple(self.names))
        object.__setattr__(self, "subnames", tuple(self.subnames))
        object.__setattr__(self, "absolute", bool(self.absolute))

    @classmethod
    def from_string(cls, text: str) -> NodePath:
        """Parse Godot's text form as ``NodePath(String)`` does.

        Empty names (``a//b``) are dropped and a trailing ``:`` is allowed; an empty subname
        in the middle (``a::b``) raises ``ValueError``.
        """
        path, colon, sub = text.partition(":")
        subnames = sub.split(":") if colon else []
        if subnames and subnames[-1] == "":
            subnames.pop()
        if "" in subnames:
            raise ValueError(f"invalid NodePath {text!r}")
        names = [name for name in path.split("/") if name]
        return cls(tuple(names), tuple(subnames), text.startswith("/"))

    def __str__(self) -> str:
        text = "/".join(self.names)
        if self.absolute:
            text = "/" + text
        return text + "".join(":" + sub for sub in self.subnames)


@dataclass(frozen=True, slots=True)
class RID:
    """Godot ``RID``: the encoding carries no data, so it always decodes empty."""


@dataclass(frozen=True, slots=True)
class EncodedObjectAsID:
    """An Object sent as its instance id (an Object encoded without full objects).

    Id 0 means a null Object: it decodes to ``None``.
    """

    object_id: int


@dataclass(slots=True)
class FullObject:
    """An Object encoded with full objects: its class name and stored properties.

    Decoded only with ``allow_objects=True`` and encoded only with ``full_objects=True``.
    """

    class_name: str
    properties: dict[str, Any] = field(default_factory=dict)


class _PoolArray(list):
    __slots__ = ()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({list.__repr__(self)})"


class PoolIntArray(_PoolArray):
    """Godot ``PoolIntArray`` (int32 elements)."""

    __slots__ = ()


class PoolRealArray(_PoolArray):
    """Godot ``PoolRealArray`` (float32 elements)."""

    __slots__ = ()


class PoolStringArray(_PoolArray):
    """Godot ``PoolStringArray``."""

    __slots__ = ()


class PoolVector2Array(_PoolArray):
    """Godot ``PoolVector2Array``: `Vector2` elements (any pair of floats encodes)."""

    __slots__ = ()


class PoolVector3Array(_PoolArray):
    """Godot ``PoolVector3Array``: `Vector3` elements (any triple of floats encodes)."""

    __slots__ = ()


class PoolColorArray(_PoolArray):
    """Godot ``PoolColorArray``: `Color` elements (any 4 floats encode)."""

    __slots__ = ()


# --------------------------------------------------------------------------- wire helpers

_FLAG_64 = 1 << 16  # INT/REAL payload is 64 bits wide
_FLAG_OBJECT_AS_ID = 1 << 16  # OBJECT payload is a u64 instance id
_TYPE_MASK = 0xFF
_COUNT_MASK = 0x7FFFFFFF  # Dictionary/Array count without the old "shared" bit
_NODE_PATH_NEW_FORMAT = 0x80000000

_INT = VariantType.INT.value
_REAL = VariantType.REAL.value
_STRING = VariantType.STRING.value
_OBJECT = VariantType.OBJECT.value
_DICTIONARY = VariantType.DICTIONARY.value
_ARRAY = VariantType.ARRAY.value
_VARIANT_MAX = VariantType.VARIANT_MAX.value

_U32 = struct.Struct("<I")
_I32 = struct.Struct("<i")
_I64 = struct.Struct("<q")
_U64 = struct.Struct("<Q")
_F32 = struct.Struct("<f")
_F64 = struct.Struct("<d")
_U32X3 = struct.Struct("<III")
_HDR_U32 = struct.Struct("<II")  # header + u32 (counts, lengths, bool)
_HDR_I32 = struct.Struct("<Ii")
_HDR_I64 = struct.Struct("<Iq")
_HDR_F32 = struct.Struct("<If")
_HDR_F64 = struct.Struct("<Id")
_HDR_U64 = struct.Struct("<IQ")

_HEADER = tuple(_U32.pack(type_id) for type_id in range(_VARIANT_MAX))
_PAD = (b"", b"\0\0\0", b"\0\0", b"\0")  # _PAD[n & 3] pads n bytes to a multiple of 4
_BOM = b"\xef\xbb\xbf"
_LITTLE_ENDIAN = sys.byteorder == "little"
_INT32_MIN, _INT32_MAX = -(2**31), 2**31 - 1
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1

_Decoder = Callable[[bytes, int, int], tuple[Any, int]]
_Encoder = Callable[[Any, bytearray], None]


def _invalid(message: str) -> VariantError:
    return VariantError(ERR_INVALID_DATA, message)


def _utf8(text: str) -> bytes:
    try:
        return text.encode("utf-8")
    except AttributeError:
        raise VariantError(
            ERR_INVALID_PARAMETER, f"expected str, got {type(text).__name__}"
        ) from None
    except UnicodeEncodeError as exc:
        raise VariantError(ERR_INVALID_PARAMETER, f"str is not valid Unicode: {exc}") from None


def _put_string(text: str, out: bytearray) -> None:
    raw = _utf8(text)
    out += _U32.pack(len(raw))
    out += raw
    out += _PAD[len(raw) & 3]


def _read_string(data: bytes, pos: int) -> tuple[str, int]:
    """Read a u32-length UTF-8 string and its padding, as Godot's ``_decode_string``."""
    length = _I32.unpack_from(data, pos)[0]
    pos += 4
    end = pos + length
    if length < 0 or end + (-length & 3) > len(data):
        raise _invalid(f"string of {length} bytes runs past the end of the data")
    raw = data[pos:end]
    if raw.startswith(_BOM):
        raw = raw[3:]
    nul = raw.find(0)
    if nul >= 0:
        raw = raw[:nul]
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _invalid(f"string is not valid UTF-8: {exc}") from None
    return text, end + (-length & 3)


def _read_count(data: bytes, pos: int, min_item_size: int, what: str) -> int:
    """A signed u32 element count, checked against the bytes left before anything is built."""
    count = _I32.unpack_from(data, pos)[0]
    if count < 0 or count * min_item_size > len(data) - pos - 4:
        raise _invalid(f"{what} of {count} elements runs past the end of the data")
    return count


# --------------------------------------------------------------------------- decoding


def _decode_nil(data: bytes, pos: int, header: int) -> tuple[Any, int]:
    return None, pos


def _decode_bool(data: bytes, pos: int, header: int) -> tuple[Any, int]:
    return _U32.unpack_from(data, pos)[0] != 0, pos + 4


def _decode_int(data: bytes, pos: int, header: int) -> tuple[Any, int]:
    if header & _FLAG_64:
        return _I64.unpack_from(data, pos)[0], pos + 8
    return _I32.unpack_from(data, pos)[0], pos + 4


def _decode_real(data: bytes, pos: int, header: int) -> tuple[Any, int]:
    if header & _FLAG_64:
        return _F64.unpack_from(data, pos)[0], pos + 8
    return _F32.unpack_from(data, pos)[0], pos + 4


def _decode_string(data: bytes, pos: int, header: int) -> tuple[Any, int]:
    return _read_string(data, pos)


def _float_struct_decoder(cls: Any) -> _Decoder:
    packer = struct.Struct(f"<{len(cls._fields)}f")
    make = cls._make
    size = packer.size

    def decode(data: bytes, pos: int, header: int) -> tuple[Any, int]:
        return make(packer.unpack_from(data, pos)), pos + size

    return decode


def _decode_node_path(data: bytes, pos: int, header: int) -> tuple[Any, int]:
    name_count, subname_count, flags = _U32X3.unpack_from(data, pos)
    if not name_count & _NODE_PATH_NEW_FORMAT:
        raise _invalid("NodePath in the pre-3.0 format")
    name_count &= _COUNT_MASK
    if flags & 2:  # obsolete format: the property was stored apart, it is one more subname
        subname_count += 1
    pos += 12
    total = name_count + subname_count
    if total * 4 > len(data) - pos:
        raise _invalid(f"NodePath of {total} strings runs past the end of the data")
    strings = []
    for _ in range(total):
        text, pos = _read_string(data, pos)
        strings.append(text)
    return NodePath(tuple(strings[:name_count]), tuple(strings[name_count:]), flags & 1), pos


_EMPTY_RID = RID()


def _decode_rid(data: bytes, pos: int, header: int) -> tuple[Any, int]:
    return _EMPTY_RID, pos


def _decode_byte_array(data: bytes, pos: int, header: int) -> tuple[Any, int]:
    length = _read_count(data, pos, 1, "PoolByteArray")
    pos += 4
    end = pos + length
    if end + (-length & 3) > len(data):
        raise _invalid("PoolByteArray padding runs past the end of the data")
    return data[pos:end], end + (-length & 3)


def _scalar_pool_decoder(cls: type[_PoolArray], typecode: str) -> _Decoder:
    assert array(typecode).itemsize == 4

    def decode(data: bytes, pos: int, header: int) -> tuple[Any, int]:
        count = _read_count(data, pos, 4, cls.__name__)
        pos += 4
        values = array(typecode, data[pos : pos + 4 * count])
        if not _LITTLE_ENDIAN:
            values.byteswap()
        return cls(values), pos + 4 * count

    return decode


def _vector_pool_decoder(cls: type[_PoolArray], item: Any) -> _Decoder:
    packer = struct.Struct(f"<{len(item._fields)}f")
    make = item._make
    size = packer.size

    def decode(data: bytes, pos: int, header: int) -> tuple[Any, int]:
        count = _read_count(data, pos, size, cls.__name__)
        pos += 4
        end = pos + size * count
        return cls(map(make, packer.iter_unpack(memoryview(data)[pos:end]))), end

    return decode


def _decode_string_array(data: bytes, pos: int, header: int) -> tuple[Any, int]:
    count = _read_count(data, pos, 4, "PoolStringArray")
    pos += 4
    strings = PoolStringArray()
    for _ in range(count):
        text, pos = _read_string(data, pos)
        strings.append(text)
    return strings, pos


def _unsupported_here(data: bytes, pos: int, header: int) -> tuple[Any, int]:
    raise AssertionError("OBJECT, DICTIONARY and ARRAY are decoded by _decode itself")


# Indexed by type id; containers and objects recurse and are handled in `_decode`.
_DECODERS: tuple[_Decoder, ...] = (
    _decode_nil,
    _decode_bool,
    _decode_int,
    _decode_real,
    _decode_string,
    _float_struct_decoder(Vector2),
    _float_struct_decoder(Rect2),
    _float_struct_decoder(Vector3),
    _float_struct_decoder(Transform2D),
    _float_struct_decoder(Plane),
    _float_struct_decoder(Quat),
    _float_struct_decoder(AABB),
    _float_struct_decoder(Basis),
    _float_struct_decoder(Transform),
    _float_struct_decoder(Color),
    _decode_node_path,
    _decode_rid,
    _unsupported_here,  # OBJECT
    _unsupported_here,  # DICTIONARY
    _unsupported_here,  # ARRAY
    _decode_byte_array,
    _scalar_pool_decoder(PoolIntArray, "i"),
    _scalar_pool_decoder(PoolRealArray, "f"),
    _decode_string_array,
    _vector_pool_decoder(PoolVector2Array, Vector2),
    _vector_pool_decoder(PoolVector3Array, Vector3),
    _vector_pool_decoder(PoolColorArray, Color),
)
assert len(_DECODERS) == _VARIANT_MAX


def _hashable_key(key: Any) -> Any:
    """A Dictionary key Python can hash: Arrays become tuples (they encode back as Arrays)."""
    if type(key) is list:
        return tuple(_hashable_key(item) for item in key)
    return key


def _decode(data: bytes, pos: int, depth: int, allow_objects: bool) -> tuple[Any, int]:
    """Decode the value at ``pos``; return it and the position after it.

    ``depth`` counts the containers around this value. Containers are decoded here rather
    than in helpers so that each nesting level costs one Python frame.
    """
    header = _U32.unpack_from(data, pos)[0]
    type_id = header & _TYPE_MASK
    pos += 4
    if type_id < _OBJECT:
        return _DECODERS[type_id](data, pos, header)
    if type_id > _ARRAY:
        if type_id >= _VARIANT_MAX:
            raise _invalid(f"unknown Variant type id {type_id}")
        return _DECODERS[type_id](data, pos, header)

    if type_id == _OBJECT and header & _FLAG_OBJECT_AS_ID:
        object_id = _U64.unpack_from(data, pos)[0]
        return (EncodedObjectAsID(object_id) if object_id else None), pos + 8
    if depth >= MAX_DEPTH:
        raise _invalid(f"containers nested more than {MAX_DEPTH} deep")
    depth += 1

    if type_id == _ARRAY:
        count = _U32.unpack_from(data, pos)[0] & _COUNT_MASK
        pos += 4
        if count * 4 > len(data) - pos:
            raise _invalid(f"Array of {count} elements runs past the end of the data")
        items = []
        append = items.append
        for _ in range(count):
            item, pos = _decode(data, pos, depth, allow_objects)
            append(item)
        return items, pos

    if type_id == _DICTIONARY:
        count = _U32.unpack_from(data, pos)[0] & _COUNT_MASK
        pos += 4
        if count * 8 > len(data) - pos:
            raise _invalid(f"Dictionary of {count} entries runs past the end of the data")
        result: dict[Any, Any] = {}
        for _ in range(count):
            key, pos = _decode(data, pos, depth, allow_objects)
            value, pos = _decode(data, pos, depth, allow_objects)
            try:
                result[key] = value
            except TypeError:
                try:
                    result[_hashable_key(key)] = value
                except TypeError:
                    raise _invalid(
                        f"Dictionary key of type {type(key).__name__} is not supported"
                    ) from None
        return result, pos

    # A full Object: class name, then (name, value) property pairs.
    if not allow_objects:
        raise VariantError(ERR_UNAUTHORIZED, "full Object received while objects are not allowed")
    class_name, pos = _read_string(data, pos)
    if not class_name:
        return None, pos
    count = _read_count(data, pos, 8, "Object")
    pos += 4
    properties: dict[str, Any] = {}
    for _ in range(count):
        name, pos = _read_string(data, pos)
        value, pos = _decode(data, pos, depth, allow_objects)
        properties[name] = value
    return FullObject(class_name, properties), pos


def decode_variant_at(
    data: bytes | bytearray | memoryview, offset: int = 0, allow_objects: bool = False
) -> tuple[Any, int]:
    """Decode the Variant that starts at ``offset``; return it and the offset just after it.

    Raises `VariantError`: ``ERR_INVALID_DATA`` for malformed or truncated data,
    ``ERR_UNAUTHORIZED`` for a full Object when ``allow_objects`` is false.
    """
    if type(data) is not bytes:
        data = bytes(data)
    if offset < 0:
        raise ValueError("offset must not be negative")
    try:
        return _decode(data, offset, 0, allow_objects)
    except struct.error:
        raise _invalid("data ends in the middle of a value") from None
    except RecursionError:
        raise _invalid("data nested too deep for the Python stack") from None


def decode_variant(data: bytes | bytearray | memoryview, allow_objects: bool = False) -> Any:
    """Decode one Variant, as ``bytes2var`` / ``PacketPeer.get_var`` do.

    Bytes after the value are ignored, as in Godot. Errors as for `decode_variant_at`.
    """
    return decode_variant_at(data, 0, allow_objects)[0]


# --------------------------------------------------------------------------- encoding


def _encode_nil(value: None, out: bytearray) -> None:
    out += _HEADER[0]


_TRUE = _HDR_U32.pack(VariantType.BOOL, 1)
_FALSE = _HDR_U32.pack(VariantType.BOOL, 0)


def _encode_bool(value: bool, out: bytearray) -> None:
    out += _TRUE if value else _FALSE


def _encode_int(value: int, out: bytearray) -> None:
    if _INT32_MIN <= value <= _INT32_MAX:
        out += _HDR_I32.pack(_INT, value)
    elif _INT64_MIN <= value <= _INT64_MAX:
        out += _HDR_I64.pack(_INT | _FLAG_64, value)
    else:
        raise VariantError(ERR_INVALID_PARAMETER, f"int {value} does not fit in 64 bits")


def _encode_float(value: float, out: bytearray) -> None:
    try:
        single = _HDR_F32.pack(_REAL, value)
    except OverflowError:  # beyond the float32 range: not exact as float32
        single = None
    if single is not None and _HDR_F32.unpack(single)[1] == value:
        out += single
    else:  # not exactly a float32 (NaN included, as in Godot)
        out += _HDR_F64.pack(_REAL | _FLAG_64, value)


def _encode_string(value: str, out: bytearray) -> None:
    out += _HEADER[_STRING]
    _put_string(value, out)


def _float_struct_encoder(type_id: int, cls: Any) -> _Encoder:
    type_id = int(type_id)
    packer = struct.Struct(f"<I{len(cls._fields)}f")

    def encode(value: Any, out: bytearray) -> None:
        out += packer.pack(type_id, *value)

    return encode


def _encode_node_path(value: NodePath, out: bytearray) -> None:
    out += _HEADER[VariantType.NODE_PATH]
    out += _U32X3.pack(
        len(value.names) | _NODE_PATH_NEW_FORMAT, len(value.subnames), int(value.absolute)
    )
    for text in value.names:
        _put_string(text, out)
    for text in value.subnames:
        _put_string(text, out)


def _encode_rid(value: RID, out: bytearray) -> None:
    out += _HEADER[VariantType.RID]


def _encode_object_id(value: EncodedObjectAsID, out: bytearray) -> None:
    out += _HDR_U64.pack(VariantType.OBJECT | _FLAG_OBJECT_AS_ID, value.object_id)


def _encode_bytes(value: bytes | bytearray | memoryview, out: bytearray) -> None:
    raw = bytes(value) if type(value) is memoryview else value
    out += _HDR_U32.pack(VariantType.POOL_BYTE_ARRAY, len(raw))
    out += raw
    out += _PAD[len(raw) & 3]


def _scalar_pool_encoder(type_id: int, typecode: str) -> _Encoder:
    type_id = int(type_id)

    def encode(value: list, out: bytearray) -> None:
        out += _HDR_U32.pack(type_id, len(value))
        out += struct.pack(f"<{len(value)}{typecode}", *value)

    return encode


def _vector_pool_encoder(type_id: int, item: Any) -> _Encoder:
    type_id = int(type_id)
    packer = struct.Struct(f"<{len(item._fields)}f")

    def encode(value: Iterable[Iterable[float]], out: bytearray) -> None:
        pack = packer.pack
        items = [pack(*element) for element in value]
        out += _HDR_U32.pack(type_id, len(items))
        out += b"".join(items)

    return encode


def _encode_string_array(value: list[str], out: bytearray) -> None:
    out += _HDR_U32.pack(VariantType.POOL_STRING_ARRAY, len(value))
    for text in value:
        raw = _utf8(text)
        length = len(raw) + 1  # Godot counts (and writes) a trailing NUL here
        out += _U32.pack(length)
        out += raw
        out += b"\0"
        out += _PAD[length & 3]


# Encoders of values that contain no other Variants, by exact type.
_ENCODERS: dict[type, _Encoder] = {
    type(None): _encode_nil,
    bool: _encode_bool,
    int: _encode_int,
    float: _encode_float,
    str: _encode_string,
    Vector2: _float_struct_encoder(VariantType.VECTOR2, Vector2),
    Rect2: _float_struct_encoder(VariantType.RECT2, Rect2),
    Vector3: _float_struct_encoder(VariantType.VECTOR3, Vector3),
    Transform2D: _float_struct_encoder(VariantType.TRANSFORM2D, Transform2D),
    Plane: _float_struct_encoder(VariantType.PLANE, Plane),
    Quat: _float_struct_encoder(VariantType.QUAT, Quat),
    AABB: _float_struct_encoder(VariantType.AABB, AABB),
    Basis: _float_struct_encoder(VariantType.BASIS, Basis),
    Transform: _float_struct_encoder(VariantType.TRANSFORM, Transform),
    Color: _float_struct_encoder(VariantType.COLOR, Color),
    NodePath: _encode_node_path,
    RID: _encode_rid,
    EncodedObjectAsID: _encode_object_id,
    bytes: _encode_bytes,
    bytearray: _encode_bytes,
    memoryview: _encode_bytes,
    PoolIntArray: _scalar_pool_encoder(VariantType.POOL_INT_ARRAY, "i"),
    PoolRealArray: _scalar_pool_encoder(VariantType.POOL_REAL_ARRAY, "f"),
    PoolStringArray: _encode_string_array,
    PoolVector2Array: _vector_pool_encoder(VariantType.POOL_VECTOR2_ARRAY, Vector2),
    PoolVector3Array: _vector_pool_encoder(VariantType.POOL_VECTOR3_ARRAY, Vector3),
    PoolColorArray: _vector_pool_encoder(VariantType.POOL_COLOR_ARRAY, Color),
}
_CONTAINERS = frozenset({list, tuple, dict, FullObject})


def _base_type(cls: type) -> type:
    """The supported type a subclass (IntEnum, OrderedDict, ...) encodes as."""
    for base in cls.__mro__:
        if base in _ENCODERS or base in _CONTAINERS:
            return base
    raise VariantError(ERR_INVALID_PARAMETER, f"cannot encode {cls.__name__} as a Godot Variant")


def _encode(value: Any, out: bytearray, depth: int, full_objects: bool) -> None:
    """Append the encoding of ``value`` to ``out``; ``depth`` counts enclosing containers."""
    cls = type(value)
    encoder = _ENCODERS.get(cls)
    if encoder is None and cls not in _CONTAINERS:
        cls = _base_type(cls)
        encoder = _ENCODERS.get(cls)
    if encoder is not None:
        encoder(value, out)
        return

    if depth >= MAX_DEPTH:
        raise VariantError(ERR_OUT_OF_MEMORY, f"containers nested more than {MAX_DEPTH} deep")
    depth += 1
    if cls is dict:
        out += _HDR_U32.pack(_DICTIONARY, len(value))
        for key, item in value.items():
            _encode(key, out, depth, full_objects)
            _encode(item, out, depth, full_objects)
    elif cls is FullObject:
        if not full_objects:
            raise VariantError(
                ERR_INVALID_PARAMETER, "a FullObject is only encoded with full_objects=True"
            )
        out += _HEADER[_OBJECT]
        _put_string(value.class_name, out)
        out += _U32.pack(len(value.properties))
        for name, item in value.properties.items():
            _put_string(name, out)
            _encode(item, out, depth, full_objects)
    else:  # list or tuple
        out += _HDR_U32.pack(_ARRAY, len(value))
        for item in value:
            _encode(item, out, depth, full_objects)


def encode_variant(
    value: Any, full_objects: bool = False, *, max_size: int | None = MAX_ENCODED_SIZE
) -> bytes:
    """Encode ``value`` as ``var2bytes`` / ``PacketPeer.put_var`` do.

    `EncodedObjectAsID` is always sent as an id; a `FullObject` needs ``full_objects``.
    Raises `VariantError`: ``ERR_OUT_OF_MEMORY`` when the encoding exceeds ``max_size``
    bytes (``put_var``'s ``encode_buffer_max_size``; ``None``: no limit, as ``var2bytes``)
    or nests deeper than `MAX_DEPTH`; ``ERR_INVALID_PARAMETER`` for a value Godot cannot
    represent.
    """
    out = bytearray()
    try:
        _encode(value, out, 0, full_objects)
    except (struct.error, OverflowError) as exc:
        raise VariantError(
            ERR_INVALID_PARAMETER, f"value out of range for its Godot type: {exc}"
        ) from None
    except RecursionError:
        raise VariantError(
            ERR_OUT_OF_MEMORY, "value nested too deep for the Python stack"
        ) from None
    if max_size is not None and len(out) > max_size:
        raise VariantError(
            ERR_OUT_OF_MEMORY, f"encoding of {len(out)} bytes exceeds the {max_size}-byte limit"
        )
    return bytes(out)
