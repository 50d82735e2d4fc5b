"""The register state and boot structures for entering a guest in real, protected or long mode.

Each ``*_state`` function returns a :class:`CpuEntryState`; the protected and long mode ones
also write the boot GDT (and, for long mode, identity page tables) into guest memory at the
addresses in :mod:`vmscope.arch.x86.layout`, so that the descriptors the guest can read back
agree with the hidden segment state KVM is given.

Boot GDT at ``GDT_ADDRESS`` (the layout of Linux's boot GDT, so a 64-bit Linux entry finds
``__BOOT_CS`` = 0x10 and ``__BOOT_DS`` = 0x18 where it expects them)::

    0x00  null
    0x08  code32  base 0, limit 4 GiB, execute/read, D=1        (protected mode / PVH CS)
    0x10  code64  base 0, limit 4 GiB, execute/read, L=1        (long mode CS)
    0x18  data    base 0, limit 4 GiB, read/write, B=1          (DS, ES, FS, GS, SS)
    0x20  tss     base 0, limit 0x67, busy TSS (type 11), 16 bytes as a 64-bit system descriptor

The IDT is empty (limit 0): an exception before the guest installs its own IDT becomes a
triple fault that the VMM reports, rather than a jump through garbage. Because its limit is
0 the CPU reads no bytes of it, so nothing is written at ``IDT_ADDRESS``.
"""

from __future__ import annotations

import struct

from vmscope.arch.x86.cpu_state import (
    CR0_ET,
    CR0_NE,
    CR0_PE,
    CR0_PG,
    CR4_PAE,
    EFER_LMA,
    EFER_LME,
    CpuEntryState,
    CpuMode,
    DescriptorTable,
    Segment,
)
from vmscope.arch.x86.layout import (
    BOOT_STACK_POINTER,
    GDT_ADDRESS,
    IDT_ADDRESS,
    PD_ADDRESS,
    PDPT_ADDRESS,
    PML4_ADDRESS,
)
from vmscope.errors import ConfigError
from vmscope.memory.guest_memory import GuestMemory

CODE32_SELECTOR = 0x08
CODE64_SELECTOR = 0x10
DATA_SELECTOR = 0x18
TSS_SELECTOR = 0x20
#: bytes of the boot GDT: five 8-byte slots plus the upper half of the 16-byte TSS descriptor
GDT_SIZE = 0x30

SEGMENT_TYPE_DATA_RW_ACCESSED = 0x3
SEGMENT_TYPE_CODE_RX_ACCESSED = 0xB
SEGMENT_TYPE_LDT = 0x2
SEGMENT_TYPE_TSS_BUSY = 0xB

PAGE_SIZE = 0x1000
PTE_PRESENT = 1 << 0
PTE_WRITABLE = 1 << 1
PTE_LARGE_PAGE = 1 << 7
#: the identity map of the low 4 GiB: one PDPT pointing at four page directories of 2 MiB pages
PAGE_DIRECTORY_COUNT = 4
LARGE_PAGE_SIZE = 2 << 20

FLAT_LIMIT = 0xFFFF_FFFF

CODE32_SEGMENT = Segment(
    base=0, limit=FLAT_LIMIT, selector=CODE32_SELECTOR, type=SEGMENT_TYPE_CODE_RX_ACCESSED,
    present=1, dpl=0, db=1, s=1, l=0, g=1,
)  # fmt: skip
CODE64_SEGMENT = Segment(
    base=0, limit=FLAT_LIMIT, selector=CODE64_SELECTOR, type=SEGMENT_TYPE_CODE_RX_ACCESSED,
    present=1, dpl=0, db=0, s=1, l=1, g=1,
)  # fmt: skip
DATA_SEGMENT = Segment(
    base=0, limit=FLAT_LIMIT, selector=DATA_SELECTOR, type=SEGMENT_TYPE_DATA_RW_ACCESSED,
    present=1, dpl=0, db=1, s=1, l=0, g=1,
)  # fmt: skip
# A busy TSS: VM entry on Intel requires TR to hold a busy TSS; base 0 and limit 0x67 are
# what the PVH ABI specifies. Nothing reads the TSS until the guest loads its own.
TSS_SEGMENT = Segment(
    base=0, limit=0x67, selector=TSS_SELECTOR, type=SEGMENT_TYPE_TSS_BUSY,
    present=1, dpl=0, db=0, s=0, l=0, g=0,
)  # fmt: skip
# No LDT: a null selector with the attributes LDTR has after reset (present, type 2), which
# VM entry accepts.
NO_LDT_SEGMENT = Segment(base=0, limit=0xFFFF, selector=0, type=SEGMENT_TYPE_LDT, present=1, s=0)

#: the descriptors of the boot GDT, indexed by selector
BOOT_GDT_SEGMENTS = (CODE32_SEGMENT, CODE64_SEGMENT, DATA_SEGMENT, TSS_SEGMENT)


# -- descriptor encoding -----------------------------------------------------------------


def _raw_limit(segment: Segment) -> int:
    """The 20-bit limit field for ``segment.limit`` (a byte limit, as in kvm_segment)."""
    if segment.g:
        if segment.limit & 0xFFF != 0xFFF or segment.limit >> 32:
            raise ConfigError(f"segment limit {segment.limit:#x} cannot be expressed in 4 KiB granules")
        return segment.limit >> 12
    if segment.limit > 0xFFFFF:
        raise ConfigError(f"segment limit {segment.limit:#x} needs G=1 (byte granular limits stop at 1 MiB)")
    return segment.limit


def encode_descriptor(segment: Segment) -> bytes:
    """The GDT descriptor for ``segment``: 8 bytes, or 16 for a system segment (S=0) in a 64-bit GDT."""
    limit = _raw_limit(segment)
    low = (limit & 0xFFFF) | (segment.base & 0xFFFF) << 16
    high = (
        (segment.base >> 16) & 0xFF
        | (segment.type & 0xF) << 8
        | (segment.s & 1) << 12
        | (segment.dpl & 3) << 13
        | (segment.present & 1) << 15
        | (limit >> 16) << 16
        | (segment.avl & 1) << 20
        | (segment.l & 1) << 21
        | (segment.db & 1) << 22
        | (segment.g & 1) << 23
        | ((segment.base >> 24) & 0xFF) << 24
    )
    descriptor = struct.pack("<II", low, high)
    if not segment.s:
        descriptor += struct.pack("<II", (segment.base >> 32) & 0xFFFF_FFFF, 0)
    return descriptor


def decode_descriptor(raw: bytes, selector: int) -> Segment:
    """The hidden segment state a CPU derives when it loads ``selector`` whose descriptor is ``raw``."""
    if len(raw) < 8:
        raise ValueError(f"a segment descriptor is at least 8 bytes, got {len(raw)}")
    low, high = struct.unpack_from("<II", raw)
    s = (high >> 12) & 1
    base = (low >> 16) | (high & 0xFF) << 16 | (high >> 24) << 24
    if not s and len(raw) >= 16:
        base |= struct.unpack_from("<I", raw, 8)[0] << 32
    g = (high >> 23) & 1
    limit = (low & 0xFFFF) | ((high >> 16) & 0xF) << 16
    if g:
        limit = limit << 12 | 0xFFF
    return Segment(
        base=base,
        limit=limit,
        selector=selector,
        type=(high >> 8) & 0xF,
        present=(high >> 15) & 1,
        dpl=(high >> 13) & 3,
        db=(high >> 22) & 1,
        s=s,
        l=(high >> 21) & 1,
        g=g,
        avl=(high >> 20) & 1,
    )


# -- structures in guest memory -----------------------------------------------------------


def write_boot_gdt(memory: GuestMemory) -> DescriptorTable:
    """Write the boot GDT (layout in the module docstring) at GDT_ADDRESS; returns the GDTR value."""
    table = bytearray(GDT_SIZE)
    for segment in BOOT_GDT_SEGMENTS:
        descriptor = encode_descriptor(segment)
        table[segment.selector : segment.selector + len(descriptor)] = descriptor
    memory.write(GDT_ADDRESS, table)
    return DescriptorTable(base=GDT_ADDRESS, limit=GDT_SIZE - 1)


def empty_idt() -> DescriptorTable:
    """An IDT of limit 0: any exception or interrupt before the guest loads its own triple-faults."""
    return DescriptorTable(base=IDT_ADDRESS, limit=0)


def write_identity_page_tables(memory: GuestMemory) -> int:
    """Identity-map the low 4 GiB with 2 MiB pages at PML4/PDPT/PD_ADDRESS; returns CR3."""
    entry_flags = PTE_PRESENT | PTE_WRITABLE
    pml4 = bytearray(PAGE_SIZE)
    struct.pack_into("<Q", pml4, 0, PDPT_ADDRESS | entry_flags)
    pdpt = bytearray(PAGE_SIZE)
    for directory in range(PAGE_DIRECTORY_COUNT):
        struct.pack_into("<Q", pdpt, directory * 8, (PD_ADDRESS + directory * PAGE_SIZE) | entry_flags)
    large_pages = PAGE_DIRECTORY_COUNT * 512
    directories = struct.pack(
        f"<{large_pages}Q",
        *(page * LARGE_PAGE_SIZE | entry_flags | PTE_LARGE_PAGE for page in range(large_pages)),
    )
    memory.write(PML4_ADDRESS, pml4)
    memory.write(PDPT_ADDRESS, pdpt)
    memory.write(PD_ADDRESS, directories)
    return PML4_ADDRESS


# -- entry states -------------------------------------------------------------------------


def _real_mode_segment(selector: int, segment_type: int) -> Segment:
    return Segment(base=selector << 4, limit=0xFFFF, selector=selector, type=segment_type, present=1, s=1)


def real_mode_state(entry_ip: int, cs_selector: int = 0, data_selector: int | None = None) -> CpuEntryState:
    """Real mode at ``cs_selector:entry_ip``, segments as after reset (64 KiB limits, base = selector << 4).

    DS, ES, FS, GS and SS use ``data_selector`` (default: the same as CS, so a flat image sees
    its own data at the offsets it was assembled for). No structure is written to guest memory.
    """
    if not 0 <= entry_ip <= 0xFFFF:
        raise ConfigError(f"real-mode entry IP {entry_ip:#x} does not fit in 16 bits")
    if not 0 <= cs_selector <= 0xFFFF:
        raise ConfigError(f"real-mode CS selector {cs_selector:#x} does not fit in 16 bits")
    data = cs_selector if data_selector is None else data_selector
    if not 0 <= data <= 0xFFFF:
        raise ConfigError(f"real-mode data selector {data:#x} does not fit in 16 bits")
    data_segment = _real_mode_segment(data, SEGMENT_TYPE_DATA_RW_ACCESSED)
    return CpuEntryState(
        rip=entry_ip,
        mode=CpuMode.REAL,
        cs=_real_mode_segment(cs_selector, SEGMENT_TYPE_CODE_RX_ACCESSED),
        ds=data_segment,
        es=data_segment,
        fs=data_segment,
        gs=data_segment,
        ss=data_segment,
        tr=Segment(base=0, limit=0xFFFF, selector=0, type=SEGMENT_TYPE_TSS_BUSY, present=1, s=0),
        ldt=NO_LDT_SEGMENT,
        gdt=DescriptorTable(base=0, limit=0xFFFF),
        idt=DescriptorTable(base=0, limit=0xFFFF),
        cr0=CR0_ET | CR0_NE,
        rflags=0x2,
    )


def _check_entry_32bit(entry: int) -> None:
    if not 0 <= entry <= 0xFFFF_FFFF:
        raise ConfigError(f"entry point {entry:#x} is not a 32-bit physical address")


def _flat_state(memory: GuestMemory, entry: int, mode: CpuMode, code: Segment) -> CpuEntryState:
    return CpuEntryState(
        rip=entry,
        mode=mode,
        cs=code,
        ds=DATA_SEGMENT,
        es=DATA_SEGMENT,
        fs=DATA_SEGMENT,
        gs=DATA_SEGMENT,
        ss=DATA_SEGMENT,
        tr=TSS_SEGMENT,
        ldt=NO_LDT_SEGMENT,
        gdt=write_boot_gdt(memory),
        idt=empty_idt(),
        gprs={"rsp": BOOT_STACK_POINTER},
    )


def protected_mode_state(memory: GuestMemory, entry: int) -> CpuEntryState:
    """32-bit protected mode, paging off, flat segments from the boot GDT (CS 0x08, data 0x18).

    This is also the PVH entry state; the PVH loader sets rbx to the start info address.
    rsp points at BOOT_STACK_POINTER so a guest may call before it sets up its own stack.
    """
    _check_entry_32bit(entry)
    state = _flat_state(memory, entry, CpuMode.PROTECTED, CODE32_SEGMENT)
    state.cr0 = CR0_PE | CR0_ET | CR0_NE
    return state


def long_mode_state(memory: GuestMemory, entry: int) -> CpuEntryState:
    """64-bit long mode (CS 0x10, data 0x18) with the low 4 GiB identity-mapped by 2 MiB pages."""
    _check_entry_32bit(entry)
    state = _flat_state(memory, entry, CpuMode.LONG, CODE64_SEGMENT)
    state.cr0 = CR0_PE | CR0_PG | CR0_ET | CR0_NE
    state.cr3 = write_identity_page_tables(memory)
    state.cr4 = CR4_PAE
    state.efer = EFER_LME | EFER_LMA
    return state


def entry_state(memory: GuestMemory, mode: CpuMode, entry: int) -> CpuEntryState:
    """The entry state for ``mode`` at physical ``entry`` (real mode: CS:IP chosen as 0:entry)."""
    if mode is CpuMode.LONG:
        return long_mode_state(memory, entry)
    if mode is CpuMode.PROTECTED:
        return protected_mode_state(memory, entry)
    return real_mode_state(entry)
