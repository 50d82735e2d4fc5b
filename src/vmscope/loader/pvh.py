"""PVH boot: an ELF kernel entered in 32-bit protected mode with ``struct hvm_start_info`` in rbx.

A kernel supports PVH when a PT_NOTE program header carries the Xen note
``XEN_ELFNOTE_PHYS32_ENTRY`` (name "Xen", type 18) whose descriptor is the 32-bit physical
entry address. A note that exists only in a section does not count: like QEMU, vmscope
reads program headers only, which is what a stripped or objcopy'd kernel keeps.

The start-of-day structures follow Xen's public header ``arch-x86/hvm/start_info.h``
(version 1): the start info at PVH_START_INFO_ADDRESS, the module list at
PVH_MODLIST_ADDRESS, the memory map at PVH_MEMMAP_ADDRESS, the command line at
CMDLINE_ADDRESS. Modules (an initrd) go page-aligned at the top of RAM below 4 GiB.
"""

from __future__ import annotations

import itertools
import os
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

from vmscope.arch.x86.cpu_state import CpuMode
from vmscope.arch.x86.e820 import E820Entry, build_e820
from vmscope.arch.x86.layout import (
    CMDLINE_ADDRESS,
    CMDLINE_MAX_SIZE,
    HIGH_MEMORY_START,
    PVH_MEMMAP_ADDRESS,
    PVH_MODLIST_ADDRESS,
    PVH_START_INFO_ADDRESS,
)
from vmscope.arch.x86.modes import PAGE_SIZE, protected_mode_state
from vmscope.errors import ConfigError, ImageFormatError
from vmscope.loader.base import LoadedGuest, LoadedSegment
from vmscope.loader.elf import (
    ENTRY_LIMIT,
    ElfImage,
    checked_entry,
    copy_into_guest,
    has_elf_magic,
    load_elf_segments,
    mode_structures,
    open_image,
    read_elf_image,
)
from vmscope.memory.guest_memory import GuestMemory

XEN_NOTE_NAME = b"Xen"
XEN_ELFNOTE_PHYS32_ENTRY = 18
HVM_START_MAGIC = 0x336EC578
HVM_START_INFO_VERSION = 1

#: struct hvm_start_info: magic, version, flags, nr_modules, modlist_paddr, cmdline_paddr,
#: rsdp_paddr, memmap_paddr, memmap_entries, reserved
START_INFO = struct.Struct("<IIIIQQQQII")
#: struct hvm_modlist_entry: paddr, size, cmdline_paddr, reserved
MODLIST_ENTRY = struct.Struct("<QQQQ")
#: struct hvm_memmap_table_entry: addr, size, type, reserved
MEMMAP_ENTRY = struct.Struct("<QQII")

# The module list may fill the gap up to the memory map; the memory map gets one page
# (the boot stack grows down towards it from BOOT_STACK_POINTER).
MAX_MODULES = (PVH_MEMMAP_ADDRESS - PVH_MODLIST_ADDRESS) // MODLIST_ENTRY.size
MAX_MEMMAP_ENTRIES = PAGE_SIZE // MEMMAP_ENTRY.size
RSDP_SIZE = 20  # the ACPI 1.0 part every RSDP has


def pvh_entry_point(image: ElfImage) -> int | None:
    """The PVH entry address from a PT_NOTE XEN_ELFNOTE_PHYS32_ENTRY note, or None without one."""
    for note in image.notes:
        if note.name == XEN_NOTE_NAME and note.type == XEN_ELFNOTE_PHYS32_ENTRY:
            if len(note.desc) not in (4, 8):
                raise image.fail(
                    f"Xen PHYS32_ENTRY note has a {len(note.desc)}-byte descriptor; expected 4 or 8 bytes"
                )
            return int.from_bytes(note.desc, "little")
    return None


def is_pvh_elf(path: Path) -> bool:
    """Whether ``path`` is an x86 ELF whose program headers carry the PVH entry note.

    A file that is not ELF at all answers False; an unreadable file or a malformed ELF raises
    ImageFormatError.
    """
    path = Path(path)
    if not has_elf_magic(path):
        return False
    return pvh_entry_point(read_elf_image(path)) is not None


def is_linux_elf(image: ElfImage) -> bool:
    """Whether an ELF kernel is Linux: its "Linux" notes, or the Xen GUEST_OS note saying so."""
    return any(
        note.name == b"Linux" or (note.name == b"Xen" and note.type == 6 and note.desc.startswith(b"linux"))
        for note in image.notes
    )


# -- memory map ---------------------------------------------------------------------------


def merge_memory_map(base: Sequence[E820Entry], extra: Sequence[E820Entry]) -> list[E820Entry]:
    """``base`` with each ``extra`` range cut out of it and the extra entries added, sorted by address."""
    ordered_extra = sorted(extra, key=lambda e: e.address)
    for entry in ordered_extra:
        if entry.size <= 0:
            raise ConfigError(
                f"memory map entry at {entry.address:#x} has size {entry.size}: must be positive"
            )
    for first, second in itertools.pairwise(ordered_extra):
        if second.address < first.end:
            raise ConfigError(
                f"memory map entries {first.address:#x}-{first.end:#x} ({first.type.name}) and "
                f"{second.address:#x}-{second.end:#x} ({second.type.name}) overlap"
            )
    merged: list[E820Entry] = list(ordered_extra)
    for entry in base:
        pieces = [(entry.address, entry.end)]
        for cut in ordered_extra:
            next_pieces = []
            for start, end in pieces:
                if cut.end <= start or end <= cut.address:
                    next_pieces.append((start, end))
                    continue
                if start < cut.address:
                    next_pieces.append((start, cut.address))
                if cut.end < end:
                    next_pieces.append((cut.end, end))
            pieces = next_pieces
        merged.extend(E820Entry(start, end - start, entry.type) for start, end in pieces)
    return sorted(merged, key=lambda e: e.address)


# -- modules ------------------------------------------------------------------------------


class _Module(NamedTuple):
    path: Path
    size: int
    address: int = 0


def _module_size(path: Path) -> int:
    with open_image(path) as stream:
        size = os.fstat(stream.fileno()).st_size
    if size == 0:
        raise ImageFormatError(str(path), "module is empty")
    return size


def place_modules(sizes: Sequence[int], top: int, occupied: Sequence[tuple[int, int]]) -> list[int]:
    """Page-aligned addresses for modules of ``sizes``, as high as possible below ``top``.

    Each module avoids the ``occupied`` [start, end) ranges, the modules placed before it,
    and everything below 1 MiB. Returns one address per size, or raises ConfigError.
    """
    taken = list(occupied)
    addresses: list[int] = []
    for number, size in enumerate(sizes):
        ceiling = top
        while True:
            start = (ceiling - size) // PAGE_SIZE * PAGE_SIZE
            if start < HIGH_MEMORY_START:
                raise ConfigError(
                    f"no room for module {number} ({size:#x} bytes) between {HIGH_MEMORY_START:#x} and "
                    f"{top:#x} clear of the kernel and reserved ranges; give the guest more memory"
                )
            clashes = [s for s, e in taken if s < start + size and start < e]
            if not clashes:
                break
            ceiling = min(clashes)
        taken.append((start, start + size))
        addresses.append(start)
    return addresses


def _load_module(memory: GuestMemory, module: _Module) -> None:
    with open_image(module.path) as stream:
        copy_into_guest(memory, stream, module.path, module.address, module.size)


# -- loading ------------------------------------------------------------------------------


def encode_cmdline(cmdline: str) -> bytes:
    """The NUL-terminated command line, or ConfigError when it does not fit at CMDLINE_ADDRESS."""
    encoded = cmdline.encode()
    if b"\0" in encoded:
        raise ConfigError("kernel command line contains a NUL character")
    if len(encoded) + 1 > CMDLINE_MAX_SIZE:
        raise ConfigError(
            f"kernel command line is {len(encoded)} bytes; the limit is {CMDLINE_MAX_SIZE - 1} "
            f"(plus the terminating NUL)"
        )
    return encoded + b"\0"


def load_pvh_image(
    memory: GuestMemory,
    image: ElfImage,
    cmdline: str = "",
    modules: Sequence[Path] = (),
    rsdp_address: int = 0,
    extra_e820: Sequence[E820Entry] = (),
    module_limit: int | None = None,
) -> LoadedGuest:
    """Load a parsed PVH ELF; see :func:`load_pvh`."""
    note_entry = pvh_entry_point(image)
    if note_entry is None:
        raise image.fail("no PVH entry note (Xen XEN_ELFNOTE_PHYS32_ENTRY in a PT_NOTE program header)")
    entry = checked_entry(image, note_entry, "PVH entry point", virtual=False)
    cmdline_bytes = encode_cmdline(cmdline)
    if rsdp_address and not memory.contains(rsdp_address, RSDP_SIZE):
        raise ConfigError(f"RSDP address {rsdp_address:#x} is outside guest RAM")
    if len(modules) > MAX_MODULES:
        raise ConfigError(f"{len(modules)} modules given; PVH boot takes at most {MAX_MODULES}")
    memory_map = merge_memory_map(build_e820(memory), extra_e820)
    if len(memory_map) > MAX_MEMMAP_ENTRIES:
        raise ConfigError(f"memory map has {len(memory_map)} entries; at most {MAX_MEMMAP_ENTRIES} fit")

    low_end = next(base + size for base, size in memory.ranges())
    top = min(low_end, ENTRY_LIMIT, module_limit if module_limit is not None else ENTRY_LIMIT)
    occupied = [(s.paddr, s.end) for s in image.segments] + [(e.address, e.end) for e in extra_e820]
    sizes = [_module_size(Path(path)) for path in modules]
    placed = [
        _Module(Path(path), size, address)
        for path, size, address in zip(modules, sizes, place_modules(sizes, top, occupied), strict=True)
    ]

    # Everything is validated: now write guest memory.
    loaded = load_elf_segments(memory, image)
    for module in placed:
        _load_module(memory, module)
        loaded.append(LoadedSegment(module.address, module.size, f"module {module.path.name}"))

    memory.write(CMDLINE_ADDRESS, cmdline_bytes)
    loaded.append(LoadedSegment(CMDLINE_ADDRESS, len(cmdline_bytes), "command line"))

    modlist = b"".join(MODLIST_ENTRY.pack(m.address, m.size, 0, 0) for m in placed)
    if modlist:
        memory.write(PVH_MODLIST_ADDRESS, modlist)
        loaded.append(LoadedSegment(PVH_MODLIST_ADDRESS, len(modlist), "PVH module list"))

    memmap = b"".join(MEMMAP_ENTRY.pack(e.address, e.size, int(e.type), 0) for e in memory_map)
    memory.write(PVH_MEMMAP_ADDRESS, memmap)
    loaded.append(LoadedSegment(PVH_MEMMAP_ADDRESS, len(memmap), "PVH memory map"))

    start_info = START_INFO.pack(
        HVM_START_MAGIC,
        HVM_START_INFO_VERSION,
        0,  # flags
        len(placed),
        PVH_MODLIST_ADDRESS if placed else 0,
        CMDLINE_ADDRESS,
        rsdp_address,
        PVH_MEMMAP_ADDRESS,
        len(memory_map),
        0,  # reserved
    )
    memory.write(PVH_START_INFO_ADDRESS, start_info)
    loaded.append(LoadedSegment(PVH_START_INFO_ADDRESS, len(start_info), "PVH start info"))

    state = protected_mode_state(memory, entry)
    state.gprs["rbx"] = PVH_START_INFO_ADDRESS
    return LoadedGuest(
        entry=state,
        segments=loaded + mode_structures(CpuMode.PROTECTED),
        symbol_file=image.path,
        kind="PVH ELF",
    )


def load_pvh(
    memory: GuestMemory,
    path: Path,
    cmdline: str = "",
    modules: Sequence[Path] = (),
    rsdp_address: int = 0,
    extra_e820: Sequence[E820Entry] = (),
    module_limit: int | None = None,
) -> LoadedGuest:
    """Boot a PVH ELF kernel: PT_LOADs at their physical addresses, start info in rbx.

    ``modules`` (the first is what Linux takes as its initrd) are loaded page-aligned as high
    as possible in RAM below 4 GiB and below ``module_limit``, clear of the kernel and of the
    ``extra_e820`` ranges. ``extra_e820`` entries (e.g. ACPI tables) are cut into the memory
    map built from guest RAM. ``rsdp_address`` 0 means "no ACPI".
    """
    return load_pvh_image(
        memory, read_elf_image(Path(path)), cmdline, modules, rsdp_address, extra_e820, module_limit
    )
