"""Guest-virtual to guest-physical translation by walking the guest's own page tables.

Used by introspection (stack unwinding, the GDB stub, crash reports), never by the
guest itself, so it only needs to be correct, not fast. Every table entry is read through
:class:`GuestMemory`, so corrupt or malicious tables end in a :class:`PageFault`, never a
host access outside guest RAM.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from vmscope.errors import GuestMemoryError, PageFault
from vmscope.memory.guest_memory import GuestMemory

PTE_PRESENT = 1 << 0
PTE_PAGE_SIZE = 1 << 7  # PS bit: this entry maps a large page
ADDRESS_MASK = 0x000F_FFFF_FFFF_F000  # bits 12-51 of an entry

CR0_PG = 1 << 31
CR4_PSE = 1 << 4
CR4_PAE = 1 << 5
CR4_LA57 = 1 << 12
EFER_LMA = 1 << 10


class ControlRegisters(Protocol):
    """What :meth:`PagingMode.from_sregs` reads: ``kvm_sregs`` or anything with the same fields."""

    @property
    def cr0(self) -> int: ...
    @property
    def cr3(self) -> int: ...
    @property
    def cr4(self) -> int: ...
    @property
    def efer(self) -> int: ...


@dataclass(frozen=True)
class PagingMode:
    """The control-register bits that decide how an address translates."""

    cr0: int
    cr3: int
    cr4: int
    efer: int

    @classmethod
    def from_sregs(cls, sregs: ControlRegisters) -> PagingMode:
        """The paging mode a vCPU's special registers (``kvm_sregs``) describe."""
        return cls(cr0=int(sregs.cr0), cr3=int(sregs.cr3), cr4=int(sregs.cr4), efer=int(sregs.efer))

    @property
    def enabled(self) -> bool:
        return bool(self.cr0 & CR0_PG)

    @property
    def long_mode(self) -> bool:
        return bool(self.efer & EFER_LMA)


def translate_long_mode(memory: GuestMemory, cr3: int, gva: int, five_level: bool = False) -> int:
    """Translate through 4-level (or 5-level) x86-64 tables; 1G and 2M pages are honoured."""
    levels = 5 if five_level else 4
    table = cr3 & ADDRESS_MASK
    for level in range(levels, 0, -1):
        shift = 12 + 9 * (level - 1)
        index = (gva >> shift) & 0x1FF
        entry_address = table + index * 8
        try:
            entry = memory.read_u64(entry_address)
        except GuestMemoryError:
            raise PageFault(
                f"page table entry for {gva:#x} at {entry_address:#x} lies outside guest RAM", address=gva
            ) from None
        if not entry & PTE_PRESENT:
            raise PageFault(f"guest-virtual address {gva:#x} is not mapped (level {level})", address=gva)
        if level in (2, 3) and entry & PTE_PAGE_SIZE:
            page_mask = (1 << shift) - 1
            return (entry & ADDRESS_MASK & ~page_mask) | (gva & page_mask)
        table = entry & ADDRESS_MASK
    return table | (gva & 0xFFF)


def translate_pae(memory: GuestMemory, cr3: int, gva: int) -> int:
    """Translate a 32-bit address through 3-level PAE tables (2M pages honoured)."""
    gva &= 0xFFFF_FFFF
    pdpte = memory.read_u64((cr3 & 0xFFFF_FFE0) + ((gva >> 30) & 3) * 8)
    if not pdpte & PTE_PRESENT:
        raise PageFault(f"guest-virtual address {gva:#x} is not mapped (PDPTE)", address=gva)
    pde = memory.read_u64((pdpte & ADDRESS_MASK) + ((gva >> 21) & 0x1FF) * 8)
    if not pde & PTE_PRESENT:
        raise PageFault(f"guest-virtual address {gva:#x} is not mapped (PDE)", address=gva)
    if pde & PTE_PAGE_SIZE:
        return (pde & ADDRESS_MASK & ~0x1F_FFFF) | (gva & 0x1F_FFFF)
    pte = memory.read_u64((pde & ADDRESS_MASK) + ((gva >> 12) & 0x1FF) * 8)
    if not pte & PTE_PRESENT:
        raise PageFault(f"guest-virtual address {gva:#x} is not mapped (PTE)", address=gva)
    return (pte & ADDRESS_MASK) | (gva & 0xFFF)


def translate_legacy(memory: GuestMemory, cr3: int, gva: int, pse: bool) -> int:
    """Translate through 2-level 32-bit tables (4M pages when CR4.PSE)."""
    gva &= 0xFFFF_FFFF
    pde = memory.read_u32((cr3 & 0xFFFF_F000) + (gva >> 22) * 4)
    if not pde & PTE_PRESENT:
        raise PageFault(f"guest-virtual address {gva:#x} is not mapped (PDE)", address=gva)
    if pse and pde & PTE_PAGE_SIZE:
        return (pde & 0xFFC0_0000) | (gva & 0x3F_FFFF)
    pte = memory.read_u32((pde & 0xFFFF_F000) + ((gva >> 12) & 0x3FF) * 4)
    if not pte & PTE_PRESENT:
        raise PageFault(f"guest-virtual address {gva:#x} is not mapped (PTE)", address=gva)
    return (pte & 0xFFFF_F000) | (gva & 0xFFF)


def translate(memory: GuestMemory, mode: PagingMode, gva: int) -> int:
    """Translate ``gva`` the way the vCPU in ``mode`` would; identity when paging is off."""
    try:
        if not mode.enabled:
            return gva
        if mode.long_mode:
            return translate_long_mode(memory, mode.cr3, gva, bool(mode.cr4 & CR4_LA57))
        if mode.cr4 & CR4_PAE:
            return translate_pae(memory, mode.cr3, gva)
        return translate_legacy(memory, mode.cr3, gva, bool(mode.cr4 & CR4_PSE))
    except PageFault:
        raise
    except GuestMemoryError:
        raise PageFault(f"page tables for {gva:#x} point outside guest RAM", address=gva) from None


def read_virtual(memory: GuestMemory, mode: PagingMode, gva: int, length: int) -> bytes:
    """Read ``length`` bytes at a guest-virtual address, page by page."""
    out = bytearray()
    while length > 0:
        chunk = min(length, 0x1000 - (gva & 0xFFF))
        out += memory.read(translate(memory, mode, gva), chunk)
        gva += chunk
        length -= chunk
    return bytes(out)


def write_virtual(memory: GuestMemory, mode: PagingMode, gva: int, data: bytes) -> None:
    """Write ``data`` at a guest-virtual address, page by page."""
    offset = 0
    while offset < len(data):
        chunk = min(len(data) - offset, 0x1000 - (gva & 0xFFF))
        memory.write(translate(memory, mode, gva), data[offset : offset + chunk])
        gva += chunk
        offset += chunk
