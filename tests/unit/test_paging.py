"""Guest page-table walks: 4-level tables with 4K, 2M and 1G pages, and every way a walk fails."""

from __future__ import annotations

import pytest

from vmscope.errors import GuestMemoryError, PageFault
from vmscope.memory.guest_memory import GuestMemory
from vmscope.memory.paging import PagingMode, read_virtual, translate, write_virtual

PRESENT_WRITABLE = 0x3
LARGE = 0x80
CR0_PE_PG = 0x8000_0001
CR4_PAE = 0x20
EFER_LME_LMA = 0x500

PML4, PDPT, PD, PT = 0x10000, 0x11000, 0x12000, 0x13000


@pytest.fixture
def memory() -> GuestMemory:
    """Page tables mapping:
    0xffff800000000000 -> 4K pages (PT): page 0 -> 0x40000, page 1 -> 0x41000
    0xffff800000200000 -> a 2M page at 0x200000
    0xffff800040000000 -> a 1G page at 0 (PDPT entry 1 with PS)
    """
    mem = GuestMemory.for_size(8 << 20)
    pml4_index = (0xFFFF_8000_0000_0000 >> 39) & 0x1FF
    mem.write_u64(PML4 + pml4_index * 8, PDPT | PRESENT_WRITABLE)
    mem.write_u64(PDPT + 0 * 8, PD | PRESENT_WRITABLE)
    mem.write_u64(PDPT + 1 * 8, 0x0 | PRESENT_WRITABLE | LARGE)  # 1G page at physical 0
    mem.write_u64(PD + 0 * 8, PT | PRESENT_WRITABLE)
    mem.write_u64(PD + 1 * 8, 0x200000 | PRESENT_WRITABLE | LARGE)  # 2M page
    mem.write_u64(PT + 0 * 8, 0x40000 | PRESENT_WRITABLE)
    mem.write_u64(PT + 1 * 8, 0x41000 | PRESENT_WRITABLE)
    return mem


MODE = PagingMode(cr0=CR0_PE_PG, cr3=PML4, cr4=CR4_PAE, efer=EFER_LME_LMA)


def test_4k_2m_and_1g_pages_translate(memory: GuestMemory) -> None:
    assert translate(memory, MODE, 0xFFFF_8000_0000_0123) == 0x40123
    assert translate(memory, MODE, 0xFFFF_8000_0000_1FFF) == 0x41FFF
    assert translate(memory, MODE, 0xFFFF_8000_0020_0000 + 0x12345) == 0x212345
    assert translate(memory, MODE, 0xFFFF_8000_4000_0000 + 0x3_2100) == 0x3_2100


def test_unmapped_addresses_raise_page_faults_naming_the_address(memory: GuestMemory) -> None:
    with pytest.raises(PageFault, match="0xffff800000002000 is not mapped"):
        translate(memory, MODE, 0xFFFF_8000_0000_2000)  # PT entry 2 is empty
    with pytest.raises(PageFault, match="not mapped"):
        translate(memory, MODE, 0x1000)  # PML4 entry 0 is empty


def test_tables_pointing_outside_ram_fault_instead_of_reading_host_memory(memory: GuestMemory) -> None:
    memory.write_u64(PT + 3 * 8, 0x7_0000_0000 | PRESENT_WRITABLE)  # page beyond RAM
    memory.write_u64(PD + 2 * 8, 0xFFFF_F000 | PRESENT_WRITABLE)  # next table beyond RAM
    assert translate(memory, MODE, 0xFFFF_8000_0000_3000) == 0x7_0000_0000  # translation itself is fine
    with pytest.raises(GuestMemoryError, match="outside guest RAM"):
        read_virtual(memory, MODE, 0xFFFF_8000_0000_3000, 8)
    with pytest.raises(PageFault, match="outside guest RAM"):
        translate(memory, MODE, 0xFFFF_8000_0040_0000)


def test_reads_and_writes_cross_page_boundaries(memory: GuestMemory) -> None:
    write_virtual(memory, MODE, 0xFFFF_8000_0000_0FFC, b"ABCDEFGH")
    assert memory.read(0x40FFC, 4) == b"ABCD" and memory.read(0x41000, 4) == b"EFGH"
    assert read_virtual(memory, MODE, 0xFFFF_8000_0000_0FFC, 8) == b"ABCDEFGH"


def test_paging_off_is_identity() -> None:
    memory = GuestMemory.for_size(1 << 20)
    assert translate(memory, PagingMode(cr0=1, cr3=0, cr4=0, efer=0), 0x1234) == 0x1234


def test_paging_mode_from_sregs_reads_the_four_control_registers() -> None:
    from vmscope.kvm import structs

    sregs = structs.kvm_sregs()
    sregs.cr0, sregs.cr3, sregs.cr4, sregs.efer = 0x8000_0011, 0x1000, 0x20, 0x500
    mode = PagingMode.from_sregs(sregs)
    assert mode == PagingMode(cr0=0x8000_0011, cr3=0x1000, cr4=0x20, efer=0x500)
    assert mode.enabled and mode.long_mode
