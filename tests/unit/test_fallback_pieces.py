"""Pure pieces of the KVM-side fallback: checked page walks with #PF error codes, and the
XSAVE layout taken from CPUID leaf 0xD."""

from __future__ import annotations

import pytest

from vmscope.emulate import DEFAULT_XSTATE_LAYOUT, PF_PRESENT, PF_USER, PF_WRITE
from vmscope.errors import PageFault
from vmscope.kvm import structs as s
from vmscope.memory.guest_memory import GuestMemory
from vmscope.memory.paging import PagingMode, translate_access
from vmscope.vmm.fallback import xstate_from_cpuid

PML4, PDPT, PD, PT = 0x10000, 0x11000, 0x12000, 0x13000
P, RW, US = 1, 2, 4
CR0_WP = 1 << 16
GVA_RW, GVA_RO, GVA_SUPERVISOR, GVA_ABSENT = 0x0, 0x1000, 0x2000, 0x3000


@pytest.fixture
def memory() -> GuestMemory:
    mem = GuestMemory.for_size(4 << 20)
    mem.write_u64(PML4, PDPT | P | RW | US)
    mem.write_u64(PDPT, PD | P | RW | US)
    mem.write_u64(PD, PT | P | RW | US)
    mem.write_u64(PT + 0 * 8, 0x40000 | P | RW | US)
    mem.write_u64(PT + 1 * 8, 0x41000 | P | US)  # read-only
    mem.write_u64(PT + 2 * 8, 0x42000 | P | RW)  # supervisor only
    return mem


def mode(cr0_extra: int = 0) -> PagingMode:
    return PagingMode(cr0=0x8000_0001 | cr0_extra, cr3=PML4, cr4=0x20, efer=0x500)


def fault(memory: GuestMemory, paging: PagingMode, gva: int, *, write: bool, user: bool = False) -> int:
    with pytest.raises(PageFault) as caught:
        translate_access(memory, paging, gva, write=write, user=user)
    assert caught.value.address == gva
    return caught.value.error_code


def test_allowed_accesses_translate(memory: GuestMemory) -> None:
    assert translate_access(memory, mode(CR0_WP), GVA_RW + 5, write=True, user=True) == 0x40005
    assert translate_access(memory, mode(CR0_WP), GVA_RO + 7, write=False, user=True) == 0x41007
    assert translate_access(memory, mode(), GVA_RO, write=True) == 0x41000  # CR0.WP off: kernel may write


def test_error_codes(memory: GuestMemory) -> None:
    assert fault(memory, mode(), GVA_ABSENT, write=False) == 0
    assert fault(memory, mode(), GVA_ABSENT, write=True, user=True) == PF_WRITE | PF_USER
    assert fault(memory, mode(CR0_WP), GVA_RO, write=True) == PF_PRESENT | PF_WRITE
    assert fault(memory, mode(), GVA_SUPERVISOR, write=False, user=True) == PF_PRESENT | PF_USER


def test_xstate_layout_from_cpuid_leaf_0xd_and_the_default_without_it() -> None:
    leaf0 = s.kvm_cpuid_entry2(function=0xD, index=0, eax=0x2E7, edx=0)
    avx = s.kvm_cpuid_entry2(function=0xD, index=2, eax=256, ebx=576)
    pkru = s.kvm_cpuid_entry2(function=0xD, index=9, eax=8, ebx=2688, ecx=2)
    supported, layout = xstate_from_cpuid([leaf0, avx, pkru])
    assert supported == 0x2E7
    assert (layout[2].offset, layout[2].size) == (576, 256)
    assert (layout[9].offset, layout[9].size, layout[9].align64) == (2688, 8, True)
    supported, layout = xstate_from_cpuid([s.kvm_cpuid_entry2(function=1)])
    assert supported == 0b111 and layout == DEFAULT_XSTATE_LAYOUT
