"""The kernel's BPF Type Format (``.BTF``): the C types of a running kernel, read from its image.

The profiler needs a handful of structure layouts (``task_struct``, ``module``, ``pcpu_hot``) that
change with every kernel build; BTF gives them exactly. Layout of the section (uapi btf.h):

* header: magic 0xEB9F, version, flags, hdr_len, then type_off/type_len and str_off/str_len,
  both relative to the end of the header;
* type section: one ``btf_type`` record (name_off, info, size-or-type; 12 bytes) per type, ids
  from 1 (0 is void), each followed by kind-specific data whose length depends on kind and vlen;
* string section: NUL-terminated names, offset 0 is the empty string.

Parsing makes one pass that records where each record starts; members, enumerators and the like
are decoded when asked for. Everything is bounds-checked: a malformed or truncated blob raises
:class:`KernelTableError`, never an IndexError or struct.error.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum

from vmscope.errors import KernelTableError

_TABLE = "BTF"
MAGIC = 0xEB9F
_HEADER = struct.Struct("<HBBIIIII")
_TYPE = struct.Struct("<III")
_MAX_DEPTH = 32  # typedef/modifier chains and nested anonymous members; real kernels need < 10


class Kind(IntEnum):
    INT = 1
    PTR = 2
    ARRAY = 3
    STRUCT = 4
    UNION = 5
    ENUM = 6
    FWD = 7
    TYPEDEF = 8
    VOLATILE = 9
    CONST = 10
    RESTRICT = 11
    FUNC = 12
    FUNC_PROTO = 13
    VAR = 14
    DATASEC = 15
    FLOAT = 16
    DECL_TAG = 17
    TYPE_TAG = 18
    ENUM64 = 19


#: kinds that only qualify another type (followed by :meth:`Btf.resolve`)
MODIFIERS = frozenset({Kind.TYPEDEF, Kind.VOLATILE, Kind.CONST, Kind.RESTRICT, Kind.TYPE_TAG})
#: kinds whose record carries a byte size
_SIZED = frozenset({Kind.INT, Kind.STRUCT, Kind.UNION, Kind.ENUM, Kind.ENUM64, Kind.FLOAT, Kind.DATASEC})
#: bytes of kind-specific data after the common record: (fixed, per vlen item)
_EXTRA = {
    Kind.INT: (4, 0),
    Kind.PTR: (0, 0),
    Kind.ARRAY: (12, 0),
    Kind.STRUCT: (0, 12),
    Kind.UNION: (0, 12),
    Kind.ENUM: (0, 8),
    Kind.FWD: (0, 0),
    Kind.TYPEDEF: (0, 0),
    Kind.VOLATILE: (0, 0),
    Kind.CONST: (0, 0),
    Kind.RESTRICT: (0, 0),
    Kind.FUNC: (0, 0),
    Kind.FUNC_PROTO: (0, 8),
    Kind.VAR: (4, 0),
    Kind.DATASEC: (0, 12),
    Kind.FLOAT: (0, 0),
    Kind.DECL_TAG: (4, 0),
    Kind.TYPE_TAG: (0, 0),
    Kind.ENUM64: (0, 12),
}


@dataclass(frozen=True, slots=True)
class Member:
    """A struct/union member: offset in bits from the start of the aggregate; ``bitfield_size`` 0
    for ordinary members."""

    name: str
    type_id: int
    bit_offset: int
    bitfield_size: int = 0


@dataclass(frozen=True, slots=True)
class BtfType:
    type_id: int
    kind: Kind
    name: str
    vlen: int
    kind_flag: bool
    #: byte size (INT, STRUCT, UNION, ENUM, DATASEC, FLOAT, ENUM64) or the referenced type id
    size_or_type: int


@dataclass(frozen=True, slots=True)
class FieldLocation:
    """Where a member path lands: byte offset from the outer struct, its type and, for bit fields,
    the bit position within that byte and width."""

    offset: int
    type_id: int
    bit_shift: int = 0
    bitfield_size: int = 0


def _fail(problem: str) -> KernelTableError:
    return KernelTableError(_TABLE, problem)


class Btf:
    """Types of one BTF blob; ids index :meth:`type`, names through :meth:`find`."""

    def __init__(self, data: bytes) -> None:
        if len(data) < _HEADER.size:
            raise _fail(f"{len(data)} bytes is shorter than the {_HEADER.size}-byte header")
        magic, version, _flags, header_length, type_off, type_len, str_off, str_len = _HEADER.unpack_from(
            data
        )
        if magic != MAGIC:
            raise _fail(f"bad magic {magic:#06x} (expected {MAGIC:#06x}; big-endian BTF is not supported)")
        if version != 1:
            raise _fail(f"unsupported version {version}")
        if header_length < _HEADER.size or header_length > len(data):
            raise _fail(f"header length {header_length} is out of range")
        body = len(data) - header_length
        for name, offset, length in (("type", type_off, type_len), ("string", str_off, str_len)):
            if offset + length > body:
                raise _fail(f"{name} section ({offset:#x}+{length:#x}) runs past the end ({body:#x} bytes)")
        self._data = data
        self._types_start = header_length + type_off
        self._types_end = self._types_start + type_len
        self._strings = data[header_length + str_off : header_length + str_off + str_len]
        if self._strings and self._strings[0] != 0:
            raise _fail("string section does not start with the empty string")
        self._offsets: list[int] = [0]  # type id -> record offset; id 0 is void
        self._by_name: dict[str, list[int]] | None = None
        self._scan()

    # -- parsing ------------------------------------------------------------------------------

    def _scan(self) -> None:
        data, position, end = self._data, self._types_start, self._types_end
        offsets = self._offsets
        while position < end:
            if position + _TYPE.size > end:
                raise _fail(f"type {len(offsets)} is truncated at {position:#x}")
            info = struct.unpack_from("<I", data, position + 4)[0]
            kind_number = (info >> 24) & 0x1F
            if kind_number not in Kind._value2member_map_:
                raise _fail(f"type {len(offsets)} has unknown kind {kind_number}")
            fixed, per_item = _EXTRA[Kind(kind_number)]
            offsets.append(position)
            position += _TYPE.size + fixed + per_item * (info & 0xFFFF)
        if position != end:
            raise _fail(f"last type {len(offsets) - 1} runs past the end of the type section")

    def _string(self, offset: int) -> str:
        if offset >= len(self._strings) and offset:
            raise _fail(f"name offset {offset:#x} is outside the string section ({len(self._strings):#x})")
        terminator = self._strings.find(b"\0", offset)
        if terminator < 0:
            raise _fail(f"name at {offset:#x} is not NUL-terminated")
        return self._strings[offset:terminator].decode("utf-8", "replace")

    def __len__(self) -> int:
        """Number of types, void excluded."""
        return len(self._offsets) - 1

    def type(self, type_id: int) -> BtfType:
        if not 0 < type_id < len(self._offsets):
            raise _fail(f"type id {type_id} is out of range (1..{len(self._offsets) - 1})")
        name_off, info, size_or_type = _TYPE.unpack_from(self._data, self._offsets[type_id])
        return BtfType(
            type_id, Kind((info >> 24) & 0x1F), self._string(name_off), info & 0xFFFF, bool(info >> 31),
            size_or_type,
        )  # fmt: skip

    def _items(self, btf_type: BtfType, size: int) -> list[tuple[int, ...]]:
        fixed = _EXTRA[btf_type.kind][0]
        start = self._offsets[btf_type.type_id] + _TYPE.size + fixed
        layout = struct.Struct("<" + "I" * (size // 4))
        return [layout.unpack_from(self._data, start + i * size) for i in range(btf_type.vlen)]

    def _extra_word(self, btf_type: BtfType, index: int = 0) -> int:
        start = self._offsets[btf_type.type_id] + _TYPE.size + 4 * index
        value: int = struct.unpack_from("<I", self._data, start)[0]
        return value

    # -- queries ------------------------------------------------------------------------------

    def find(self, name: str, kind: Kind | None = Kind.STRUCT) -> int | None:
        """Id of the first type called ``name`` (of ``kind``, any kind if None)."""
        if self._by_name is None:
            index: dict[str, list[int]] = {}
            for type_id in range(1, len(self._offsets)):
                name_off = struct.unpack_from("<I", self._data, self._offsets[type_id])[0]
                if name_off:
                    index.setdefault(self._string(name_off), []).append(type_id)
            self._by_name = index
        for type_id in self._by_name.get(name, ()):
            if kind is None or self.type(type_id).kind == kind:
                return type_id
        return None

    def resolve(self, type_id: int) -> int:
        """Follow typedefs and qualifiers to the underlying type id (0 for void)."""
        for _ in range(_MAX_DEPTH):
            if type_id == 0:
                return 0
            btf_type = self.type(type_id)
            if btf_type.kind not in MODIFIERS:
                return type_id
            type_id = btf_type.size_or_type
        raise _fail(f"typedef/qualifier chain from type {type_id} is longer than {_MAX_DEPTH}")

    def members(self, type_id: int) -> list[Member]:
        btf_type = self.type(self.resolve(type_id))
        if btf_type.kind not in (Kind.STRUCT, Kind.UNION):
            raise _fail(f"type {type_id} ({btf_type.kind.name} {btf_type.name}) is not a struct or union")
        members = []
        for name_off, member_type, offset in self._items(btf_type, 12):
            if btf_type.kind_flag:  # bit fields: offset packs the size in its top byte
                members.append(Member(self._string(name_off), member_type, offset & 0xFF_FFFF, offset >> 24))
            else:
                members.append(Member(self._string(name_off), member_type, offset))
        return members

    def enumerators(self, type_id: int) -> dict[str, int]:
        btf_type = self.type(self.resolve(type_id))
        signed = btf_type.kind_flag
        if btf_type.kind == Kind.ENUM:
            return {
                self._string(name_off): (value - (1 << 32) if signed and value >> 31 else value)
                for name_off, value in self._items(btf_type, 8)
            }
        if btf_type.kind == Kind.ENUM64:
            values = {}
            for name_off, low, high in self._items(btf_type, 12):
                value = low | high << 32
                values[self._string(name_off)] = value - (1 << 64) if signed and value >> 63 else value
            return values
        raise _fail(f"type {type_id} ({btf_type.kind.name}) is not an enum")

    def enum_value(self, name: str) -> int | None:
        """The value of enumerator ``name`` in any enum of the blob."""
        for type_id in range(1, len(self._offsets)):
            kind = Kind((struct.unpack_from("<I", self._data, self._offsets[type_id] + 4)[0] >> 24) & 0x1F)
            if kind in (Kind.ENUM, Kind.ENUM64):
                value = self.enumerators(type_id).get(name)
                if value is not None:
                    return value
        return None

    def array(self, type_id: int) -> tuple[int, int]:
        """(element type id, number of elements) of an ARRAY."""
        btf_type = self.type(self.resolve(type_id))
        if btf_type.kind != Kind.ARRAY:
            raise _fail(f"type {type_id} ({btf_type.kind.name}) is not an array")
        return self._extra_word(btf_type, 0), self._extra_word(btf_type, 2)

    def int_encoding(self, type_id: int) -> tuple[bool, int, int]:
        """(signed, bit offset, bits) of an INT."""
        btf_type = self.type(self.resolve(type_id))
        if btf_type.kind != Kind.INT:
            raise _fail(f"type {type_id} ({btf_type.kind.name}) is not an int")
        word = self._extra_word(btf_type)
        return bool((word >> 24) & 1), (word >> 16) & 0xFF, word & 0xFF

    def size_of(self, type_id: int, depth: int = 0) -> int:
        """Size in bytes of a type (pointers are 8 bytes: BTF here is the x86-64 kernel's)."""
        if depth > _MAX_DEPTH:
            raise _fail(f"arrays nest deeper than {_MAX_DEPTH}")
        resolved = self.resolve(type_id)
        if resolved == 0:
            raise _fail("void has no size")
        btf_type = self.type(resolved)
        if btf_type.kind in _SIZED:
            return btf_type.size_or_type
        if btf_type.kind == Kind.PTR:
            return 8
        if btf_type.kind != Kind.ARRAY:
            raise _fail(f"type {resolved} ({btf_type.kind.name} {btf_type.name}) has no size")
        element, count = self.array(resolved)
        return count * self.size_of(element, depth + 1)

    def field(self, struct_name: str, path: str) -> FieldLocation:
        """Where ``path`` ("comm", "core_layout.base", "mem[0].size") lies in ``struct struct_name``.

        Members of anonymous structs/unions are found as if they were direct members, like C does.
        """
        struct_id = self.find(struct_name, Kind.STRUCT)
        if struct_id is None:
            raise _fail(f"no struct {struct_name}")
        return self.field_in(struct_id, path, struct_name)

    def field_in(self, type_id: int, path: str, label: str = "") -> FieldLocation:
        label = label or f"type {type_id}"
        bit_offset, bitfield_size = 0, 0
        current = type_id
        for part in path.split("."):
            name, _, index_text = part.partition("[")
            found = self._member(current, name, 0)
            if found is None:
                raise _fail(f"{label} has no member {path!r} (at {name!r})")
            member, member_offset = found
            bit_offset += member_offset
            bitfield_size = member.bitfield_size
            current = member.type_id
            if index_text:
                if not index_text.endswith("]") or not index_text[:-1].isdigit():
                    raise _fail(f"bad index in member path {path!r}")
                element, count = self.array(current)
                index = int(index_text[:-1])
                if index >= count:
                    raise _fail(f"{label}.{name} has {count} elements, not {index + 1}")
                bit_offset += 8 * index * self.size_of(element)
                current = element
        return FieldLocation(bit_offset // 8, current, bit_offset % 8, bitfield_size)

    def _member(self, type_id: int, name: str, depth: int) -> tuple[Member, int] | None:
        if depth > _MAX_DEPTH:
            raise _fail(f"anonymous members nest deeper than {_MAX_DEPTH}")
        for member in self.members(type_id):
            if member.name == name:
                return member, member.bit_offset
            if not member.name:
                resolved = self.resolve(member.type_id)
                if resolved and self.type(resolved).kind in (Kind.STRUCT, Kind.UNION):
                    inner = self._member(resolved, name, depth + 1)
                    if inner is not None:
                        return inner[0], member.bit_offset + inner[1]
        return None

    def has_member(self, struct_name: str, path: str) -> bool:
        try:
            self.field(struct_name, path)
        except KernelTableError:
            return False
        return True


def parse_btf(data: bytes) -> Btf:
    """Parse a raw ``.BTF`` section; malformed input raises :class:`KernelTableError`."""
    try:
        return Btf(data)
    except (struct.error, ValueError, IndexError) as error:  # a bound we did not foresee
        raise _fail(f"malformed: {error}") from None
