"""CPU entry states: segment state, the boot GDT as the guest reads it, long-mode page tables."""

from __future__ import annotations

import struct
from collections.abc import Iterator

import pytest

from vmscope.arch.x86.cpu_state import (
    CR0_PE,
    CR0_PG,
    CR4_PAE,
    EFER_LMA,
    EFER_LME,
    CpuEntryState,
    CpuMode,
    Segment,
)
from vmscope.arch.x86.layout import GDT_ADDRESS, IDT_ADDRESS, PD_ADDRESS, PDPT_ADDRESS, PML4_ADDRESS
from vmscope.arch.x86.modes import (
    CODE32_SELECTOR,
    CODE64_SELECTOR,
    DATA_SELECTOR,
    TSS_SELECTOR,
    decode_descriptor,
    encode_descriptor,
    entry_state,
    long_mode_state,
    protected_mode_state,
    real_mode_state,
)
from vmscope.errors import ConfigError, PageFault
from vmscope.memory.guest_memory import GuestMemory
from vmscope.memory.paging import PagingMode, translate


@pytest.fixture
def memory() -> Iterator[GuestMemory]:
    guest = GuestMemory.for_size(16 << 20)
    yield guest
    guest.close()


def gdt_descriptor(memory: GuestMemory, state: CpuEntryState, selector: int) -> bytes:
    """The descriptor bytes the CPU would load for ``selector`` from the GDT in guest memory."""
    index = selector & ~0x7
    size = 16 if selector == state.tr.selector else 8
    assert index + size - 1 <= state.gdt.limit, f"selector {selector:#x} beyond the GDT limit"
    return memory.read(state.gdt.base + index, size)


# -- real mode ----------------------------------------------------------------------------


def test_real_mode_segments_follow_the_selector() -> None:
    state = real_mode_state(0x0100, cs_selector=0x07C0)
    assert state.mode is CpuMode.REAL
    assert state.rip == 0x100
    assert state.cs.selector == 0x07C0 and state.cs.base == 0x7C00
    assert (state.cs.base + state.rip) == 0x7D00
    for segment in (state.cs, state.ds, state.es, state.fs, state.gs, state.ss):
        assert segment.limit == 0xFFFF
        assert segment.present == 1 and segment.s == 1
        assert segment.db == 0 and segment.l == 0 and segment.g == 0
    assert state.cs.type == 0xB  # code, execute/read, accessed (as after reset)
    assert state.ds.type == 0x3  # data, read/write, accessed
    assert state.ds.selector == 0x07C0  # data segments default to CS's
    assert state.cr0 & (CR0_PE | CR0_PG) == 0
    assert state.rflags == 0x2
    assert state.efer == 0


def test_real_mode_separate_data_selector() -> None:
    state = real_mode_state(0x7C00, cs_selector=0, data_selector=0x2000)
    assert state.cs.base == 0
    assert state.ss.base == 0x20000 and state.ds.selector == 0x2000


@pytest.mark.parametrize(("ip", "cs"), [(0x10000, 0), (-1, 0), (0, 0x10000)])
def test_real_mode_rejects_values_that_do_not_fit_16_bits(ip: int, cs: int) -> None:
    with pytest.raises(ConfigError, match="16 bits"):
        real_mode_state(ip, cs_selector=cs)


# -- descriptors --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "segment",
    [
        Segment(base=0, limit=0xFFFF_FFFF, selector=0x08, type=0xB, db=1, g=1),
        Segment(base=0x1234_5678, limit=0xFFFFF, selector=0x18, type=0x3, dpl=3, avl=1),
        Segment(base=0, limit=0xFFFF_FFFF, selector=0x10, type=0xB, l=1, g=1),
        Segment(base=0xFFFF_8000_1234_5000, limit=0x67, selector=0x20, type=0xB, s=0),
        Segment(base=0x10, limit=0x1_0000_FFF >> 0, selector=0x28, type=0x2, s=0, g=1, present=0),
    ],
)
def test_descriptor_round_trip(segment: Segment) -> None:
    raw = encode_descriptor(segment)
    assert len(raw) == (8 if segment.s else 16)
    assert decode_descriptor(raw, segment.selector) == segment


def test_descriptor_matches_linux_boot_gdt_encodings() -> None:
    # The same flat descriptors Linux's boot code uses, with the accessed bit set.
    code32 = Segment(base=0, limit=0xFFFF_FFFF, type=0xB, db=1, g=1)
    code64 = Segment(base=0, limit=0xFFFF_FFFF, type=0xB, l=1, g=1)
    data = Segment(base=0, limit=0xFFFF_FFFF, type=0x3, db=1, g=1)
    assert struct.unpack("<Q", encode_descriptor(code32))[0] == 0x00CF_9B00_0000_FFFF
    assert struct.unpack("<Q", encode_descriptor(code64))[0] == 0x00AF_9B00_0000_FFFF
    assert struct.unpack("<Q", encode_descriptor(data))[0] == 0x00CF_9300_0000_FFFF


@pytest.mark.parametrize(
    "segment",
    [Segment(limit=0x10_0000, g=0), Segment(limit=0xFFFF_F000, g=1), Segment(limit=0x1_0000_0FFF, g=1)],
)
def test_unencodable_limits_are_rejected(segment: Segment) -> None:
    with pytest.raises(ConfigError, match="limit"):
        encode_descriptor(segment)


# -- protected mode -----------------------------------------------------------------------


def test_protected_mode_state(memory: GuestMemory) -> None:
    state = protected_mode_state(memory, 0x10_0000)
    assert state.mode is CpuMode.PROTECTED
    assert state.rip == 0x10_0000
    assert state.cr0 & CR0_PE and not state.cr0 & CR0_PG
    assert state.cr4 == 0 and state.efer == 0
    assert state.cs.selector == CODE32_SELECTOR
    assert state.cs.db == 1 and state.cs.l == 0
    for segment in (state.ds, state.es, state.fs, state.gs, state.ss):
        assert segment.selector == DATA_SELECTOR
        assert segment.base == 0 and segment.limit == 0xFFFF_FFFF
    assert state.gdt.base == GDT_ADDRESS
    assert state.idt.base == IDT_ADDRESS and state.idt.limit == 0


@pytest.mark.parametrize("mode", [CpuMode.PROTECTED, CpuMode.LONG])
def test_gdt_in_memory_decodes_to_the_hidden_segment_state(memory: GuestMemory, mode: CpuMode) -> None:
    state = entry_state(memory, mode, 0x20_0000)
    assert memory.read(GDT_ADDRESS, 8) == bytes(8)  # the null descriptor
    for segment in (state.cs, state.ds, state.es, state.fs, state.gs, state.ss, state.tr):
        decoded = decode_descriptor(gdt_descriptor(memory, state, segment.selector), segment.selector)
        assert decoded == segment


def test_tr_is_a_busy_tss_with_a_zero_upper_half(memory: GuestMemory) -> None:
    state = long_mode_state(memory, 0x20_0000)
    assert state.tr.selector == TSS_SELECTOR
    assert state.tr.type == 11 and state.tr.s == 0 and state.tr.present == 1
    assert state.tr.limit >= 0x67
    raw = gdt_descriptor(memory, state, TSS_SELECTOR)
    assert raw[8:] == bytes(8)  # base[63:32] and the reserved dword of the 16-byte system descriptor


def test_both_code_segments_are_in_one_gdt(memory: GuestMemory) -> None:
    state = protected_mode_state(memory, 0x10_0000)
    code64 = decode_descriptor(gdt_descriptor(memory, state, CODE64_SELECTOR), CODE64_SELECTOR)
    assert code64.l == 1 and code64.db == 0 and code64.type == 0xB


@pytest.mark.parametrize("entry", [-1, 1 << 32])
def test_entry_must_be_a_32_bit_address(memory: GuestMemory, entry: int) -> None:
    with pytest.raises(ConfigError, match="32-bit"):
        protected_mode_state(memory, entry)


# -- long mode ----------------------------------------------------------------------------


def test_long_mode_control_registers(memory: GuestMemory) -> None:
    state = long_mode_state(memory, 0x10_0000)
    assert state.mode is CpuMode.LONG
    assert state.cs.selector == CODE64_SELECTOR and state.cs.l == 1 and state.cs.db == 0
    assert state.cr0 & CR0_PE and state.cr0 & CR0_PG
    assert state.cr4 & CR4_PAE
    assert state.efer & EFER_LME and state.efer & EFER_LMA
    assert state.cr3 == PML4_ADDRESS


@pytest.mark.parametrize(
    "address",
    [
        0,
        0x1000,
        0x1F_FFFF,
        0x20_0000,
        0x10_0123,
        0x4000_1234,
        0x8765_4321,
        0xBFFF_FFFF,
        0xFEE0_0000,
        0xFFFF_FFFF,
    ],
)
def test_page_tables_identity_map_the_low_4_gib(memory: GuestMemory, address: int) -> None:
    state = long_mode_state(memory, 0x10_0000)
    mode = PagingMode(cr0=state.cr0, cr3=state.cr3, cr4=state.cr4, efer=state.efer)
    assert translate(memory, mode, address) == address


def test_page_tables_stop_at_4_gib(memory: GuestMemory) -> None:
    state = long_mode_state(memory, 0x10_0000)
    mode = PagingMode(cr0=state.cr0, cr3=state.cr3, cr4=state.cr4, efer=state.efer)
    with pytest.raises(PageFault):
        translate(memory, mode, 1 << 32)
    with pytest.raises(PageFault):
        translate(memory, mode, 0x80_0000_0000)  # second PML4 entry


def test_page_tables_use_2_mib_pages_at_the_layout_addresses(memory: GuestMemory) -> None:
    long_mode_state(memory, 0x10_0000)
    assert memory.read_u64(PML4_ADDRESS) & ~0xFFF == PDPT_ADDRESS
    for directory in range(4):
        assert memory.read_u64(PDPT_ADDRESS + directory * 8) & ~0xFFF == PD_ADDRESS + directory * 0x1000
    assert memory.read_u64(PDPT_ADDRESS + 4 * 8) == 0
    last = memory.read_u64(PD_ADDRESS + 4 * 0x1000 - 8)
    assert last & (1 << 7)  # PS: a 2 MiB page
    assert last & ~0xFFF == 0xFFE0_0000


def test_long_mode_overwrites_stale_page_table_contents(memory: GuestMemory) -> None:
    memory.fill(PML4_ADDRESS, 0x1000, 0xFF)
    state = long_mode_state(memory, 0x10_0000)
    mode = PagingMode(cr0=state.cr0, cr3=state.cr3, cr4=state.cr4, efer=state.efer)
    with pytest.raises(PageFault):
        translate(memory, mode, 0x80_0000_0000)
    assert translate(memory, mode, 0x1234) == 0x1234
