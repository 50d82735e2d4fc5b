"""A builder of synthetic BTF blobs (the uapi btf.h layout), and kernel-like types built with it, so the
parser, the task lookup and the module walk can be checked against known content."""

from __future__ import annotations

import struct
from collections.abc import Sequence

from vmscope.profiler.kernel.btf import Kind

#: (name, type id, bit offset, bitfield size)
MemberSpec = tuple[str, int, int, int]


class BtfBuilder:
    def __init__(self) -> None:
        self.records: list[bytes] = []
        self.strings = bytearray(b"\0")

    def string(self, text: str) -> int:
        if not text:
            return 0
        offset = len(self.strings)
        self.strings += text.encode() + b"\0"
        return offset

    def add(self, kind: Kind, name: str, size_or_type: int, vlen: int = 0, flag: bool = False,
            extra: bytes = b"") -> int:  # fmt: skip
        info = (int(flag) << 31) | (int(kind) << 24) | vlen
        self.records.append(struct.pack("<III", self.string(name), info, size_or_type) + extra)
        return len(self.records)

    def int_type(self, name: str, size: int, signed: bool = False) -> int:
        return self.add(Kind.INT, name, size, extra=struct.pack("<I", (int(signed) << 24) | size * 8))

    def ptr(self, target: int) -> int:
        return self.add(Kind.PTR, "", target)

    def array(self, element: int, index_type: int, count: int) -> int:
        return self.add(Kind.ARRAY, "", 0, extra=struct.pack("<III", element, index_type, count))

    def struct(self, name: str, size: int, members: Sequence[MemberSpec], union: bool = False) -> int:
        bitfields = any(bits for *_, bits in members)
        extra = b"".join(
            struct.pack("<III", self.string(member), type_id, (bits << 24 | offset) if bitfields else offset)
            for member, type_id, offset, bits in members
        )
        kind = Kind.UNION if union else Kind.STRUCT
        return self.add(kind, name, size, len(members), bitfields, extra)

    def enum(self, name: str, values: Sequence[tuple[str, int]], signed: bool = False) -> int:
        extra = b"".join(struct.pack("<II", self.string(n), v & 0xFFFF_FFFF) for n, v in values)
        return self.add(Kind.ENUM, name, 4, len(values), signed, extra)

    def enum64(self, name: str, values: Sequence[tuple[str, int]], signed: bool = False) -> int:
        extra = b"".join(
            struct.pack("<III", self.string(n), v & 0xFFFF_FFFF, (v >> 32) & 0xFFFF_FFFF) for n, v in values
        )
        return self.add(Kind.ENUM64, name, 8, len(values), signed, extra)

    def build(self, *, version: int = 1, magic: int = 0xEB9F) -> bytes:
        types = b"".join(self.records)
        header = struct.pack("<HBBIIIII", magic, version, 0, 24, 0, len(types), len(types), len(self.strings))
        return header + types + bytes(self.strings)


def kernel_types(
    *, pcpu_hot: bool = False, module_mem: bool = True, module_orc: bool = True
) -> tuple[bytes, dict[str, int]]:
    """A BTF blob with task_struct, (pcpu_hot,) module, module_memory or module_layout, mod_kallsyms,
    enum mod_mem_type and (``module_orc``: CONFIG_UNWINDER_ORC) mod_arch_specific's ORC members, laid
    out like the kernel's with arbitrary offsets; returns the blob and the offsets the tests expect."""
    b = BtfBuilder()
    u32 = b.int_type("unsigned int", 4)
    s32 = b.int_type("int", 4, signed=True)
    char = b.int_type("char", 1, signed=True)
    u64 = b.int_type("long unsigned int", 8)
    pid_t = b.add(Kind.TYPEDEF, "pid_t", s32)
    void_ptr = b.ptr(0)
    comm = b.array(char, u32, 16)
    list_head = b.struct("list_head", 16, [])
    list_ptr = b.ptr(list_head)
    b.records[list_head - 1] = b.records[list_head - 1][:4] + struct.pack(
        "<II", (int(Kind.STRUCT) << 24) | 2, 16
    )
    b.records[list_head - 1] += struct.pack("<III", b.string("next"), list_ptr, 0)
    b.records[list_head - 1] += struct.pack("<III", b.string("prev"), list_ptr, 64)
    mm = b.ptr(b.add(Kind.FWD, "mm_struct", 0))
    flags_union = b.struct("", 8, [("flags", u64, 0, 0), ("raw", u64, 0, 0)], union=True)
    task = b.struct(
        "task_struct",
        3200,
        [
            ("__state", u32, 0, 0),
            ("", flags_union, 64, 0),
            ("mm", mm, 2272 * 8, 0),
            ("pid", pid_t, 2416 * 8, 0),
            ("tgid", b.add(Kind.VOLATILE, "", pid_t), 2420 * 8, 0),
            ("comm", comm, 2976 * 8, 0),
        ],
    )
    task_ptr = b.ptr(task)
    expected = {"comm": 2976, "pid": 2416, "tgid": 2420, "mm": 2272}
    if pcpu_hot:
        b.struct("pcpu_hot", 64, [("preempt_count", s32, 0, 0), ("current_task", task_ptr, 64, 0)])
        expected["pcpu_hot.current_task"] = 8
    b.enum("mod_mem_type", [("MOD_TEXT", 0), ("MOD_DATA", 1), ("MOD_RODATA", 2)])
    symbols = b.struct(
        "mod_kallsyms",
        40,
        [("symtab", void_ptr, 0, 0), ("num_symtab", u32, 64, 0), ("strtab", b.ptr(char), 128, 0)],
    )
    name = b.array(char, u32, 56)
    members: list[MemberSpec] = [
        ("state", u32, 0, 0),
        ("list", list_head, 64, 0),
        ("name", name, 24 * 8, 0),
        ("kallsyms", b.ptr(symbols), 600 * 8, 0),
    ]
    if module_mem:
        memory = b.struct("module_memory", 32, [("base", void_ptr, 0, 0), ("size", u32, 64, 0)])
        members.append(("mem", b.array(memory, u32, 3), 320 * 8, 0))
        expected.update({"module.text_base": 320, "module.text_size": 328})
    else:
        layout = b.struct(
            "module_layout", 48, [("base", void_ptr, 0, 0), ("size", u32, 64, 0), ("text_size", u32, 96, 0)]
        )
        members.append(("core_layout", layout, 320 * 8, 0))
        expected.update({"module.text_base": 320, "module.text_size": 332})
    orc_members: list[MemberSpec] = []
    if module_orc:
        entry_ptr = b.ptr(b.add(Kind.FWD, "orc_entry", 0))
        orc_members = [
            ("num_orcs", u32, 0, 0),
            ("orc_unwind_ip", b.ptr(s32), 64, 0),
            ("orc_unwind", entry_ptr, 128, 0),
        ]
        expected.update(
            {"module.arch.num_orcs": 640, "module.arch.orc_unwind_ip": 648, "module.arch.orc_unwind": 656}
        )
    # without the ORC unwinder the arch member is an empty struct
    members.append(("arch", b.struct("mod_arch_specific", 24 if module_orc else 0, orc_members), 640 * 8, 0))
    b.struct("module", 1024, members)
    expected.update({"module.list": 8, "module.name": 24, "module.kallsyms": 600})
    return b.build(), expected
