"""The kernel's ORC unwind tables (``.orc_unwind_ip`` / ``.orc_unwind``) and a walker over them.

Each ``.orc_unwind_ip`` entry is an s32 relative to its own address; each ``.orc_unwind`` entry is
6 bytes: s16 sp_offset, s16 bp_offset, then bit fields sp_reg:4 bp_reg:4 and a type whose width
and numbering changed (see arch/x86/include/asm/orc_types.h):

* format 1 (4.14 to 6.2): type:2 (CALL 0, REGS 1, REGS_PARTIAL 2), end:1;
* format 2 (6.3): type:2, signal:1, end:1;
* format 3 (6.4 on): type:3 (UNDEFINED 0, END_OF_STACK 1, CALL 2, REGS 3, REGS_PARTIAL 4), signal:1.

The format is told from the data: in formats 1-2 CALL (0) dominates, in format 3 CALL is 2.
"""

from __future__ import annotations

import bisect
import struct
from array import array
from dataclasses import dataclass
from typing import Protocol

from vmscope.errors import KernelTableError
from vmscope.profiler.unwinders.base import (
    STOP_BAD_FRAME,
    STOP_BAD_READ,
    STOP_DEPTH,
    STOP_END,
    STOP_NO_TABLE,
    STOP_UNDEFINED,
    STOP_USER,
    Registers,
    UnwindResult,
    WordReader,
)

REG_UNDEFINED, REG_PREV_SP, REG_DX, REG_DI, REG_BP, REG_SP, REG_R10, REG_R13 = range(8)
REG_BP_INDIRECT, REG_SP_INDIRECT = 8, 9
TYPE_UNDEFINED, TYPE_END, TYPE_CALL, TYPE_REGS, TYPE_REGS_PARTIAL = range(5)

# struct pt_regs offsets (x86-64) of the registers ORC can refer to
_PT_REGS = {"bp": 32, "r13": 16, "r10": 56, "dx": 96, "di": 112, "ip": 128, "cs": 136, "sp": 152}
_PT_REGS_IP = _PT_REGS["ip"]
_ORC_SP_REGS = {REG_DX: "dx", REG_DI: "di", REG_R10: "r10", REG_R13: "r13"}
_MAX_FRAME = 1 << 20  # no kernel frame or stack switch moves the stack pointer further than this
_TABLE = "ORC"
_DECODED_LIMIT = 65536


@dataclass(frozen=True, slots=True)
class OrcEntry:
    sp_offset: int
    bp_offset: int
    sp_reg: int
    bp_reg: int
    #: normalised to format 3 numbering (TYPE_*)
    type: int
    signal: bool


class OrcTable:
    """ORC entries sorted by instruction address, relocated by ``slide``."""

    def __init__(self, ips: array[int], raw: bytes, format_version: int, slide: int = 0) -> None:
        self._ips = ips
        self._raw = raw
        self.format_version = format_version
        self.slide = slide
        self._decoded: dict[int, OrcEntry] = {}  # hot code repeats across samples
        mask = 0xFFFF_FFFF_FFFF_FFFF
        self.start = (ips[0] + slide) & mask if ips else 0
        self.end = (ips[-1] + slide) & mask if ips else 0

    @classmethod
    def from_sections(
        cls, ip_section: bytes, ip_address: int, unwind_section: bytes, format_version: int | None = None
    ) -> OrcTable:
        """Parse the two sections (``ip_address``: where ``.orc_unwind_ip`` lies, at link time for
        vmlinux, at run time for a module's copy). ``format_version`` (see the module docstring)
        is told from the entries when not given; a module's few entries say less than the kernel's."""
        count = len(ip_section) // 4
        if count == 0 or len(ip_section) % 4:
            raise KernelTableError(_TABLE, f".orc_unwind_ip size {len(ip_section)} is not a multiple of 4")
        if len(unwind_section) != 6 * count:
            raise KernelTableError(
                _TABLE, f".orc_unwind holds {len(unwind_section)} bytes, expected {6 * count} for {count} ips"
            )
        relative = struct.unpack(f"<{count}i", ip_section)
        ips = array("q", (_signed(ip_address + 4 * i + offset) for i, offset in enumerate(relative)))
        # ips as signed 64-bit: kernel addresses are negative, which keeps the order
        if any(ips[i] > ips[i + 1] for i in range(count - 1)):
            raise KernelTableError(_TABLE, ".orc_unwind_ip is not sorted")
        return cls(ips, unwind_section, format_version or _detect_format(unwind_section, count))

    def relocated(self, slide: int) -> OrcTable:
        return OrcTable(self._ips, self._raw, self.format_version, slide)

    def __len__(self) -> int:
        return len(self._ips)

    def covers(self, ip: int) -> bool:
        return self.start <= ip <= self.end

    def lookup(self, ip: int) -> OrcEntry | None:
        """The entry in force at ``ip`` (the last one at or below it)."""
        key = _signed(ip - self.slide)
        index = bisect.bisect_right(self._ips, key) - 1
        if index < 0:
            return None
        return self.entry(index)

    def entry(self, index: int) -> OrcEntry:
        found = self._decoded.get(index)
        if found is None:
            if len(self._decoded) >= _DECODED_LIMIT:
                self._decoded.clear()
            found = self._decoded[index] = self._decode(index)
        return found

    def _decode(self, index: int) -> OrcEntry:
        sp_offset, bp_offset, bits = struct.unpack_from("<hhH", self._raw, 6 * index)
        sp_reg, bp_reg = bits & 0xF, (bits >> 4) & 0xF
        if self.format_version == 3:
            kind, signal = (bits >> 8) & 7, bool(bits & 0x800)
        else:
            old_type = (bits >> 8) & 3
            end = bool(bits & (0x800 if self.format_version == 2 else 0x400))
            signal = self.format_version == 2 and bool(bits & 0x400)
            if sp_reg == REG_UNDEFINED:
                kind = TYPE_END if end else TYPE_UNDEFINED
            else:
                kind = (TYPE_CALL, TYPE_REGS, TYPE_REGS_PARTIAL, TYPE_UNDEFINED)[old_type]
            signal = signal or kind in (TYPE_REGS, TYPE_REGS_PARTIAL)
        return OrcEntry(sp_offset, bp_offset, sp_reg, bp_reg, kind, signal)


def _signed(value: int) -> int:
    value &= 0xFFFF_FFFF_FFFF_FFFF
    return value - (1 << 64) if value >= 1 << 63 else value


def _detect_format(raw: bytes, count: int) -> int:
    types = [0] * 8
    end_bits = 0
    step = max(1, count // 4096)
    for index in range(0, count, step):
        bits = struct.unpack_from("<H", raw, 6 * index + 4)[0]
        types[(bits >> 8) & 7] += 1
        end_bits += bool(bits & 0x800) and (bits >> 8) & 4 == 0 and bits & 0xF == 0
    if types[2] > types[0]:
        return 3
    return 2 if end_bits else 1


class OrcLookup(Protocol):
    """What the walker needs of its tables: one :class:`OrcTable`, or the kernel's and its
    modules' together (:class:`~vmscope.profiler.unwinders.orc_tables.OrcTables`)."""

    def covers(self, ip: int) -> bool: ...

    def lookup(self, ip: int) -> OrcEntry | None: ...


class OrcUnwinder:
    """Walks kernel stacks with ORC tables, crossing pt_regs and iret frames."""

    name = "orc"

    def __init__(self, table: OrcLookup, max_depth: int = 64) -> None:
        self.table = table
        self.max_depth = max_depth

    def unwind(self, start: Registers, read: WordReader) -> UnwindResult:
        frames = [start.ip]
        ip, sp, bp = start.ip, start.sp, start.bp
        pt_regs: int | None = None  # address of a full pt_regs when the last frame crossed one
        exact_ip = True  # the sampled ip and ips from pt_regs are not return addresses
        seen: set[tuple[int, int]] = set()
        while len(frames) < self.max_depth:
            entry = self.table.lookup(ip if exact_ip else ip - 1)
            if entry is None:
                return UnwindResult(tuple(frames), self.name, STOP_NO_TABLE)
            if entry.type == TYPE_END:
                return UnwindResult(tuple(frames), self.name, STOP_END)
            if entry.type == TYPE_UNDEFINED:
                return UnwindResult(tuple(frames), self.name, STOP_UNDEFINED)
            cfa = self._cfa(entry, sp, bp, pt_regs, read)
            if cfa is None:
                return UnwindResult(tuple(frames), self.name, STOP_BAD_READ)
            if entry.type == TYPE_CALL:
                if cfa <= sp or cfa - sp > _MAX_FRAME or cfa % 8:
                    return UnwindResult(tuple(frames), self.name, STOP_BAD_FRAME)
                new_ip = read(cfa - 8)
                if new_ip is None:
                    return UnwindResult(tuple(frames), self.name, STOP_BAD_READ)
                new_sp, pt_regs, exact_ip = cfa, None, entry.signal
            else:
                # REGS: cfa is a whole pt_regs; REGS_PARTIAL: cfa is its iret frame (ip, cs, flags, sp, ss)
                regs_at = cfa if entry.type == TYPE_REGS else cfa - _PT_REGS_IP
                new_ip = read(regs_at + _PT_REGS_IP)
                cs = read(regs_at + _PT_REGS["cs"])
                user_sp = read(regs_at + _PT_REGS["sp"])
                if new_ip is None or cs is None or user_sp is None:
                    return UnwindResult(tuple(frames), self.name, STOP_BAD_READ)
                if cs & 3 == 3:
                    user_bp = read(regs_at + _PT_REGS["bp"]) if entry.type == TYPE_REGS else None
                    user = Registers(new_ip, user_sp, user_bp if user_bp is not None else 0, 3)
                    return UnwindResult((*frames, new_ip), self.name, STOP_USER, user)
                new_sp = user_sp
                pt_regs = regs_at if entry.type == TYPE_REGS else None
                exact_ip = True
            new_bp = self._bp(entry, bp, cfa, pt_regs, read)
            if new_bp is None:
                return UnwindResult(tuple(frames), self.name, STOP_BAD_READ)
            if new_ip == 0:
                return UnwindResult(tuple(frames), self.name, STOP_END)
            if (new_ip, new_sp) in seen:
                return UnwindResult(tuple(frames), self.name, STOP_BAD_FRAME)
            seen.add((new_ip, new_sp))
            frames.append(new_ip)
            ip, sp, bp = new_ip, new_sp, new_bp
        return UnwindResult(tuple(frames), self.name, STOP_DEPTH)

    @staticmethod
    def _cfa(entry: OrcEntry, sp: int, bp: int, pt_regs: int | None, read: WordReader) -> int | None:
        reg = entry.sp_reg
        if reg == REG_SP:
            return sp + entry.sp_offset
        if reg == REG_BP:
            return bp + entry.sp_offset
        if reg == REG_SP_INDIRECT:
            value = read(sp)
            return None if value is None else value + entry.sp_offset
        if reg == REG_BP_INDIRECT:
            return read(bp + entry.sp_offset)
        name = _ORC_SP_REGS.get(reg)
        if name is None or pt_regs is None:
            return None  # only a full pt_regs of the previous frame holds these registers
        value = read(pt_regs + _PT_REGS[name])
        return None if value is None else value + entry.sp_offset

    @staticmethod
    def _bp(entry: OrcEntry, bp: int, cfa: int, pt_regs: int | None, read: WordReader) -> int | None:
        if entry.bp_reg == REG_PREV_SP:
            return read(cfa + entry.bp_offset)
        if entry.bp_reg == REG_BP:
            return read(bp + entry.bp_offset)
        if pt_regs is not None and entry.type == TYPE_REGS:
            saved = read(pt_regs + _PT_REGS["bp"])
            return bp if saved is None else saved
        return bp
