"""Where the VMM puts boot structures in low guest memory.

Everything lives below 1 MiB, away from where kernels load (1 MiB and up), and below the
EBDA at 0x9FC00. The addresses follow the conventions of Firecracker and QEMU microvm, so a
reader of either finds things where they expect.
"""

from __future__ import annotations

GDT_ADDRESS = 0x500  # boot GDT (0x30 bytes): null, code32 0x08, code64 0x10, data 0x18, tss 0x20
IDT_ADDRESS = 0x530  # empty IDT: a fault before the guest installs its own triple-faults
PVH_START_INFO_ADDRESS = 0x6000  # struct hvm_start_info
PVH_MODLIST_ADDRESS = 0x6040  # struct hvm_modlist_entry[]
PVH_MEMMAP_ADDRESS = 0x7000  # struct hvm_memmap_table_entry[]
ZERO_PAGE_ADDRESS = 0x7000  # Linux boot_params (bzImage boot; never together with PVH)
BOOT_STACK_POINTER = 0x8FF0
PML4_ADDRESS = 0x9000  # identity page tables for long-mode entry
PDPT_ADDRESS = 0xA000
PD_ADDRESS = 0xB000  # four page directories of 2 MiB pages: identity map of the low 4 GiB
CMDLINE_ADDRESS = 0x20000
CMDLINE_MAX_SIZE = 0x10000
EBDA_START = 0x9FC00
HIGH_MEMORY_START = 0x100000  # 1 MiB: where kernels and ELF images are expected to load
