"""ORC tables and the ORC walker on synthetic entries and a synthetic stack in a byte buffer."""

from __future__ import annotations

import struct

import pytest

from tests.unit.kernel_tables import build_orc, orc_entry
from vmscope.errors import KernelTableError
from vmscope.profiler.unwinders.base import STOP_BAD_FRAME, STOP_END, STOP_UNDEFINED, STOP_USER, Registers
from vmscope.profiler.unwinders.orc import REG_BP, REG_SP, REG_UNDEFINED, OrcTable, OrcUnwinder

TEXT = 0xFFFF_FFFF_8100_0000
STACK = 0xFFFF_C900_0000_0000
SECTION = 0xFFFF_FFFF_82C0_0000
SLIDE = 0x1E00_0000

# three functions: leaf (frameless, sp+8), middle (push rbp, frame at bp+16), entry code that
# saved a pt_regs (REGS), then the end of the stack
LEAF, MIDDLE, CALLER, IRQ_ENTRY, BOTTOM = (TEXT + 0x1000 * i for i in range(1, 6))
ENTRIES = [
    (LEAF, orc_entry(REG_SP, 8, 0)),
    (MIDDLE, orc_entry(REG_SP, 8, 0)),
    (MIDDLE + 1, orc_entry(REG_BP, 16, 0, bp_reg=1, bp_offset=-16)),  # bp_reg 1: PREV_SP
    (CALLER, orc_entry(REG_SP, 24, 0)),
    (IRQ_ENTRY, orc_entry(REG_SP, 0, 1)),  # REGS: sp points at a pt_regs
    (BOTTOM, orc_entry(REG_UNDEFINED, 0, 0, end=True)),
    (BOTTOM + 0x100, orc_entry(REG_UNDEFINED, 0, 0)),
]


class Stack:
    def __init__(self) -> None:
        self.words: dict[int, int] = {}

    def put(self, address: int, *values: int) -> None:
        for i, value in enumerate(values):
            self.words[address + 8 * i] = value

    def read(self, address: int) -> int | None:
        return self.words.get(address)


def table(slide: int = 0) -> OrcTable:
    ips, unwind = build_orc(SECTION, ENTRIES)
    return OrcTable.from_sections(ips, SECTION, unwind).relocated(slide)


def kernel_stack(slide: int, user: bool) -> tuple[Stack, Registers]:
    """leaf <- middle (bp frame) <- caller <- pt_regs (interrupted BOTTOM code or user space)."""
    stack = Stack()
    sp = STACK + 0x100
    stack.put(sp, MIDDLE + 0x20 + slide)  # leaf's return address
    middle_sp = sp + 8
    stack.put(middle_sp, STACK + 0xAA, STACK + 0x500, CALLER + 0x10 + slide)  # local, saved bp, return
    caller_sp = middle_sp + 24
    stack.put(caller_sp, 0, 0, IRQ_ENTRY + 0x8 + slide)
    regs = caller_sp + 24
    cs = 0x33 if user else 0x10
    interrupted_ip = 0x40_1000 if user else BOTTOM + 0x10 + slide
    stack.put(regs + 32, 0x7FFF_0000 if user else STACK + 0x900)  # bp
    stack.put(regs + 128, interrupted_ip, cs, 0x202, 0x7FFF_1000 if user else STACK + 0x800, 0x2B)
    return stack, Registers(LEAF + 0x4 + slide, sp, middle_sp + 8)


@pytest.mark.parametrize("slide", [0, SLIDE])
def test_walks_frameless_bp_frames_and_pt_regs_to_the_end(slide: int) -> None:
    stack, start = kernel_stack(slide, user=False)
    result = OrcUnwinder(table(slide)).unwind(start, stack.read)
    expected = [LEAF + 4, MIDDLE + 0x20, CALLER + 0x10, IRQ_ENTRY + 8, BOTTOM + 0x10]
    assert [f - slide for f in result.frames] == expected
    assert result.stop == STOP_END and result.unwinder == "orc"


def test_crosses_into_user_space() -> None:
    stack, start = kernel_stack(0, user=True)
    result = OrcUnwinder(table()).unwind(start, stack.read)
    assert result.stop == STOP_USER
    assert result.frames[-1] == 0x40_1000
    assert result.user is not None and result.user.sp == 0x7FFF_1000 and result.user.bp == 0x7FFF_0000


def test_undefined_entry_and_hostile_stacks_end_the_walk() -> None:
    stack = Stack()
    result = OrcUnwinder(table()).unwind(Registers(BOTTOM + 0x180, STACK, 0), stack.read)
    assert result.stop == STOP_UNDEFINED and result.frames == (BOTTOM + 0x180,)
    # a return address pointing back at the same frame forever: a loop is cut, never followed
    stack.put(STACK, LEAF + 1)
    looped = OrcUnwinder(table()).unwind(Registers(LEAF + 1, STACK - 8, 0), stack.read)
    assert looped.stop in (STOP_BAD_FRAME, "unreadable stack") and len(looped.frames) < 10
    # nothing mapped: one frame, no exception
    empty = OrcUnwinder(table()).unwind(Registers(LEAF, STACK, 0), lambda address: None)
    assert empty.frames == (LEAF,) and empty.stop == "unreadable stack"


def test_depth_is_bounded() -> None:
    # every frame returns into LEAF one word further up: an endless but well-formed chain
    stack = Stack()
    for i in range(200):
        stack.put(STACK + 8 * i, LEAF + 2 + i)
    result = OrcUnwinder(table(), max_depth=20).unwind(Registers(LEAF + 1, STACK, 0), stack.read)
    assert len(result.frames) == 20 and result.stop == "depth limit"


def test_formats_are_told_apart() -> None:
    ips, unwind = build_orc(SECTION, ENTRIES)
    assert OrcTable.from_sections(ips, SECTION, unwind).format_version == 1
    # format 3: CALL is type 2, END_OF_STACK 1, type:3 bits
    v3 = b"".join(struct.pack("<hhH", 8, 0, REG_SP | 2 << 8) for _ in ENTRIES)
    parsed = OrcTable.from_sections(ips, SECTION, v3)
    assert parsed.format_version == 3 and parsed.lookup(LEAF) is not None


def test_malformed_sections_are_clear_errors() -> None:
    ips, unwind = build_orc(SECTION, ENTRIES)
    with pytest.raises(KernelTableError, match="expected"):
        OrcTable.from_sections(ips, SECTION, unwind[:-3])
    with pytest.raises(KernelTableError, match="multiple of 4"):
        OrcTable.from_sections(ips[:-1], SECTION, unwind)
    backwards = build_orc(SECTION, list(reversed(ENTRIES)))
    with pytest.raises(KernelTableError, match="not sorted"):
        OrcTable.from_sections(backwards[0], SECTION, backwards[1])
