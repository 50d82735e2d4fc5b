"""The amd64 register set as gdb sees it: numbering, 'g'-packet layout and target.xml.

Register numbers are the order of :data:`REGISTERS`, which follows gdb's amd64 feature
files: ``org.gnu.gdb.i386.core`` (rax..r15, rip, eflags, the six segment selectors as 32
bits, st0-7 as 80 bits, then fctrl fstat ftag fiseg fioff foseg fooff fop as 32 bits),
``org.gnu.gdb.i386.sse`` (xmm0-15, mxcsr) and ``org.gnu.gdb.i386.segments`` (fs_base,
gs_base), plus a vmscope feature with cr0, cr2, cr3, cr4, cr8 and efer. A 'g' reply is
every register, little-endian, in that order.

KVM hands the x87 state over in FXSAVE form: registers in stack order (ST0 first) and an
abridged one-bit-per-register tag. gdb wants the full two-bit tag word indexed by physical
register, so :func:`full_tag_word` and :func:`abridged_tag` convert between the two. In
64-bit mode FXSAVE's FPU instruction and data pointers are 64 bits; gdb's fiseg/foseg carry
their upper halves and fioff/fooff the lower.
"""

from __future__ import annotations

from dataclasses import dataclass
from xml.sax.saxutils import quoteattr

from vmscope.gdbstub.protocol import ProtocolError, decode_hex
from vmscope.kvm import structs as s
from vmscope.kvm.registers import control_registers, general_registers, segment_selectors

FEATURE_CORE = "org.gnu.gdb.i386.core"
FEATURE_SSE = "org.gnu.gdb.i386.sse"
FEATURE_SEGMENTS = "org.gnu.gdb.i386.segments"
FEATURE_SYSTEM = "org.vmscope.x86.system"

GPR_NAMES = (
    "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp",
    "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15",
)  # fmt: skip
SEGMENT_NAMES = ("cs", "ss", "ds", "es", "fs", "gs")
X87_CONTROL_NAMES = ("fctrl", "fstat", "ftag", "fiseg", "fioff", "foseg", "fooff", "fop")
SYSTEM_NAMES = ("cr0", "cr2", "cr3", "cr4", "cr8", "efer")


class RegisterWriteError(ProtocolError):
    """gdb asked to write a register this stub cannot change (a segment selector)."""


@dataclass(frozen=True)
class RegisterInfo:
    name: str
    bitsize: int
    type: str
    feature: str
    group: str | None = None

    @property
    def size(self) -> int:
        return self.bitsize // 8


def _build_register_table() -> tuple[RegisterInfo, ...]:
    table: list[RegisterInfo] = []
    for name in GPR_NAMES:
        kind = {"rbp": "data_ptr", "rsp": "data_ptr"}.get(name, "int64")
        table.append(RegisterInfo(name, 64, kind, FEATURE_CORE))
    table.append(RegisterInfo("rip", 64, "code_ptr", FEATURE_CORE))
    table.append(RegisterInfo("eflags", 32, "i386_eflags", FEATURE_CORE))
    table += [RegisterInfo(name, 32, "int32", FEATURE_CORE) for name in SEGMENT_NAMES]
    table += [RegisterInfo(f"st{i}", 80, "i387_ext", FEATURE_CORE) for i in range(8)]
    table += [RegisterInfo(name, 32, "int", FEATURE_CORE, "float") for name in X87_CONTROL_NAMES]
    table += [RegisterInfo(f"xmm{i}", 128, "vec128", FEATURE_SSE) for i in range(16)]
    table.append(RegisterInfo("mxcsr", 32, "i386_mxcsr", FEATURE_SSE, "vector"))
    table += [RegisterInfo(name, 64, "int", FEATURE_SEGMENTS) for name in ("fs_base", "gs_base")]
    table += [RegisterInfo(name, 64, "int", FEATURE_SYSTEM, "system") for name in SYSTEM_NAMES]
    return tuple(table)


#: every register in gdb's (remote protocol) numbering
REGISTERS = _build_register_table()
REGISTER_NUMBERS = {info.name: number for number, info in enumerate(REGISTERS)}
#: bytes in a full 'g' packet (before hex encoding)
G_PACKET_SIZE = sum(info.size for info in REGISTERS)

RegisterValues = dict[str, int]

# -- x87 tag word ------------------------------------------------------------------------------

TAG_VALID, TAG_ZERO, TAG_SPECIAL, TAG_EMPTY = 0, 1, 2, 3


def _classify_x87(value: int) -> int:
    """The two-bit tag of an 80-bit extended-precision value."""
    exponent = (value >> 64) & 0x7FFF
    mantissa = value & ((1 << 64) - 1)
    if exponent == 0x7FFF:
        return TAG_SPECIAL  # infinity or NaN
    if exponent == 0:
        return TAG_ZERO if mantissa == 0 else TAG_SPECIAL  # zero, or denormal
    if not mantissa >> 63:
        return TAG_SPECIAL  # unnormal: integer bit clear
    return TAG_VALID


def full_tag_word(abridged: int, fsw: int, stack: list[int]) -> int:
    """FXSAVE's abridged tag (bit i: physical register i in use) to the 16-bit tag word.

    ``stack`` holds ST0..ST7; physical register i is ST((i - TOP) mod 8).
    """
    top = (fsw >> 11) & 7
    word = 0
    for physical in range(8):
        in_use = abridged & (1 << physical)
        tag = _classify_x87(stack[(physical - top) & 7]) if in_use else TAG_EMPTY
        word |= tag << (2 * physical)
    return word


def abridged_tag(full: int) -> int:
    """The 16-bit tag word to FXSAVE's abridged form: a register is in use unless tagged empty."""
    return sum(1 << physical for physical in range(8) if (full >> (2 * physical)) & 3 != TAG_EMPTY)


# -- KVM state <-> gdb values -----------------------------------------------------------------


def registers_from_kvm(regs: s.kvm_regs, sregs: s.kvm_sregs, fpu: s.kvm_fpu) -> RegisterValues:
    """gdb's view of one vCPU's KVM register sets."""
    values: RegisterValues = general_registers(regs, GPR_NAMES)
    values["rip"] = int(regs.rip)
    values["eflags"] = int(regs.rflags) & 0xFFFF_FFFF
    values.update(segment_selectors(sregs, SEGMENT_NAMES))
    stack = [int.from_bytes(bytes(fpu.fpr[i])[:10], "little") for i in range(8)]
    for index, value in enumerate(stack):
        values[f"st{index}"] = value
    values["fctrl"] = int(fpu.fcw)
    values["fstat"] = int(fpu.fsw)
    values["ftag"] = full_tag_word(int(fpu.ftwx), int(fpu.fsw), stack)
    values["fiseg"] = int(fpu.last_ip) >> 32
    values["fioff"] = int(fpu.last_ip) & 0xFFFF_FFFF
    values["foseg"] = int(fpu.last_dp) >> 32
    values["fooff"] = int(fpu.last_dp) & 0xFFFF_FFFF
    values["fop"] = int(fpu.last_opcode) & 0x7FF
    for index in range(16):
        values[f"xmm{index}"] = int.from_bytes(bytes(fpu.xmm[index]), "little")
    values["mxcsr"] = int(fpu.mxcsr)
    values["fs_base"] = int(sregs.fs.base)
    values["gs_base"] = int(sregs.gs.base)
    values.update(control_registers(sregs, SYSTEM_NAMES))
    return values


@dataclass(frozen=True)
class Changed:
    """Which KVM register sets :func:`apply_registers` modified (only those need writing back)."""

    regs: bool
    sregs: bool
    fpu: bool


def apply_registers(values: RegisterValues, regs: s.kvm_regs, sregs: s.kvm_sregs, fpu: s.kvm_fpu) -> Changed:
    """Store ``values`` (any subset of the registers) into the KVM structures, in place.

    Segment selectors cannot be changed without their descriptors, so a different selector
    raises :class:`RegisterWriteError` before anything is modified.
    """
    unknown = set(values) - REGISTER_NUMBERS.keys()
    if unknown:
        raise ProtocolError(f"unknown registers {sorted(unknown)}")
    for name in SEGMENT_NAMES:
        if name in values and values[name] != int(getattr(sregs, name).selector):
            raise RegisterWriteError(f"segment register {name} cannot be changed through gdb")
    current = registers_from_kvm(regs, sregs, fpu)
    changed = {name for name, value in values.items() if current[name] != value}
    for name in changed:
        value = values[name]
        if name in GPR_NAMES or name == "rip":
            setattr(regs, name, value)
        elif name == "eflags":
            regs.rflags = value
        elif name.startswith("st"):
            raw = value.to_bytes(10, "little") + bytes(6)
            for offset, byte in enumerate(raw):
                fpu.fpr[int(name[2:])][offset] = byte
        elif name.startswith("xmm"):
            for offset, byte in enumerate(value.to_bytes(16, "little")):
                fpu.xmm[int(name[3:])][offset] = byte
        elif name == "fctrl":
            fpu.fcw = value & 0xFFFF
        elif name == "fstat":
            fpu.fsw = value & 0xFFFF
        elif name == "ftag":
            fpu.ftwx = abridged_tag(value)
        elif name in ("fiseg", "fioff"):
            merged = {**current, **values}
            fpu.last_ip = (merged["fiseg"] << 32) | merged["fioff"]
        elif name in ("foseg", "fooff"):
            merged = {**current, **values}
            fpu.last_dp = (merged["foseg"] << 32) | merged["fooff"]
        elif name == "fop":
            fpu.last_opcode = value & 0x7FF
        elif name == "mxcsr":
            fpu.mxcsr = value
        elif name == "fs_base":
            sregs.fs.base = value
        elif name == "gs_base":
            sregs.gs.base = value
        else:  # control registers and efer
            setattr(sregs, name, value)
    fpu_names = {"mxcsr", *X87_CONTROL_NAMES} | {f"st{i}" for i in range(8)} | {f"xmm{i}" for i in range(16)}
    return Changed(
        regs=bool(changed & {*GPR_NAMES, "rip", "eflags"}),
        sregs=bool(changed & {"fs_base", "gs_base", *SYSTEM_NAMES}),
        fpu=bool(changed & fpu_names),
    )


# -- wire encoding ----------------------------------------------------------------------------


def encode_register(number: int, value: int) -> bytes:
    """One register as little-endian hex (a 'p' reply)."""
    info = REGISTERS[number]
    return value.to_bytes(info.size, "little").hex().encode("ascii")


def decode_register(number: int, text: bytes) -> int:
    """A 'P' value: exactly the register's size in little-endian hex."""
    info = REGISTERS[number]
    data = decode_hex(text)
    if len(data) != info.size:
        raise ProtocolError(f"register {info.name} takes {info.size} bytes, got {len(data)}")
    return int.from_bytes(data, "little")


def encode_registers(values: RegisterValues) -> bytes:
    """The 'g' reply: every register, in number order."""
    return b"".join(encode_register(number, values[info.name]) for number, info in enumerate(REGISTERS))


def decode_registers(text: bytes) -> RegisterValues:
    """A 'G' payload. gdb may send fewer registers than it knows; only whole ones are taken."""
    data = decode_hex(text)
    if len(data) > G_PACKET_SIZE:
        raise ProtocolError(f"G packet carries {len(data)} bytes, more than all registers ({G_PACKET_SIZE})")
    values: RegisterValues = {}
    offset = 0
    for info in REGISTERS:
        if offset + info.size > len(data):
            break
        values[info.name] = int.from_bytes(data[offset : offset + info.size], "little")
        offset += info.size
    if offset != len(data):
        raise ProtocolError(f"G packet of {len(data)} bytes ends inside a register")
    return values


# -- target description -----------------------------------------------------------------------

_EFLAGS_FIELDS = (
    ("CF", 0), ("", 1), ("PF", 2), ("AF", 4), ("ZF", 6), ("SF", 7), ("TF", 8), ("IF", 9),
    ("DF", 10), ("OF", 11), ("NT", 14), ("RF", 16), ("VM", 17), ("AC", 18), ("VIF", 19),
    ("VIP", 20), ("ID", 21),
)  # fmt: skip
_MXCSR_FIELDS = (
    ("IE", 0), ("DE", 1), ("ZE", 2), ("OE", 3), ("UE", 4), ("PE", 5), ("DAZ", 6), ("IM", 7),
    ("DM", 8), ("ZM", 9), ("OM", 10), ("UM", 11), ("PM", 12), ("FZ", 15),
)  # fmt: skip
_VECTOR_TYPES = (
    ("v4f", "ieee_single", 4), ("v2d", "ieee_double", 2), ("v16i8", "int8", 16),
    ("v8i16", "int16", 8), ("v4i32", "int32", 4), ("v2i64", "int64", 2),
)  # fmt: skip
_VEC128_FIELDS = (
    ("v4_float", "v4f"), ("v2_double", "v2d"),
    ("v16_int8", "v16i8"), ("v8_int16", "v8i16"), ("v4_int32", "v4i32"), ("v2_int64", "v2i64"),
    ("uint128", "uint128"),
)  # fmt: skip


def _flags(identifier: str, fields: tuple[tuple[str, int], ...]) -> list[str]:
    lines = [f'    <flags id="{identifier}" size="4">']
    lines += [f'      <field name="{name}" start="{bit}" end="{bit}"/>' for name, bit in fields]
    lines.append("    </flags>")
    return lines


def _feature_types(feature: str) -> list[str]:
    if feature == FEATURE_CORE:
        return _flags("i386_eflags", _EFLAGS_FIELDS)
    if feature == FEATURE_SSE:
        lines = [
            f'    <vector id="{name}" type="{kind}" count="{count}"/>' for name, kind, count in _VECTOR_TYPES
        ]
        lines.append('    <union id="vec128">')
        lines += [f'      <field name="{name}" type="{kind}"/>' for name, kind in _VEC128_FIELDS]
        lines.append("    </union>")
        return lines + _flags("i386_mxcsr", _MXCSR_FIELDS)
    return []


def target_xml() -> str:
    """The target description gdb reads through qXfer:features:read:target.xml."""
    lines = [
        '<?xml version="1.0"?>',
        '<!DOCTYPE target SYSTEM "gdb-target.dtd">',
        '<target version="1.0">',
        "  <architecture>i386:x86-64</architecture>",
    ]
    feature: str | None = None
    for number, info in enumerate(REGISTERS):
        if info.feature != feature:
            if feature is not None:
                lines.append("  </feature>")
            feature = info.feature
            lines.append(f"  <feature name={quoteattr(feature)}>")
            lines += _feature_types(feature)
        group = f' group="{info.group}"' if info.group else ""
        attributes = f'name="{info.name}" bitsize="{info.bitsize}" type="{info.type}" regnum="{number}"'
        lines.append(f"    <reg {attributes}{group}/>")
    lines += ["  </feature>", "</target>", ""]
    return "\n".join(lines)
