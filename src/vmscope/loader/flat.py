"""Flat binaries: raw bytes copied to one address and entered in a chosen CPU mode."""

from __future__ import annotations

import os
from pathlib import Path

from vmscope.arch.x86.cpu_state import CpuEntryState, CpuMode
from vmscope.arch.x86.modes import long_mode_state, protected_mode_state, real_mode_state
from vmscope.errors import ConfigError, ImageFormatError
from vmscope.loader.base import LoadedGuest, LoadedSegment
from vmscope.loader.elf import (
    BOOT_STRUCTURES_END,
    BOOT_STRUCTURES_START,
    ENTRY_LIMIT,
    copy_into_guest,
    describe_ram,
    mode_structures,
    open_image,
)
from vmscope.memory.guest_memory import GuestMemory

REAL_MODE_LIMIT = 1 << 20  # what CS:IP can reach without the A20 wrap
REAL_MODE_SEGMENT_SPAN = 0x10000


def real_mode_cs_ip(load_address: int, entry: int) -> tuple[int, int]:
    """CS:IP with CS << 4 + IP == entry and CS's base at or below the load address.

    CS is 0 when the entry lies in the first 64 KiB (the BIOS convention, 0000:7C00), else
    the paragraph of the load address, so the image's start stays addressable through CS.
    """
    if entry < REAL_MODE_SEGMENT_SPAN:
        return 0, entry
    cs = load_address >> 4
    ip = entry - (cs << 4)
    if ip >= REAL_MODE_SEGMENT_SPAN:
        raise ConfigError(
            f"real-mode entry {entry:#x} is out of reach from the load address {load_address:#x}: "
            f"with CS {cs:#x} it needs IP {ip:#x}, and IP stops at 0xffff (64 KiB)"
        )
    return cs, ip


def load_flat(
    memory: GuestMemory, path: Path, load_address: int, mode: CpuMode, entry: int | None = None
) -> LoadedGuest:
    """Copy the file to ``load_address`` and enter it at ``entry`` (default: the load address) in ``mode``.

    In real mode no structure is written and the image must end below 1 MiB; in protected and
    long mode the image must stay clear of the boot GDT and page tables below 0x30000.
    """
    path = Path(path)
    entry = load_address if entry is None else entry
    with open_image(path) as stream:
        size = os.fstat(stream.fileno()).st_size
        if size == 0:
            raise ImageFormatError(str(path), "flat image is empty")
        end = load_address + size
        if load_address < 0 or not memory.contains(load_address, size):
            raise ImageFormatError(
                str(path),
                f"{size:#x} bytes at {load_address:#x} (ending at {end:#x}) do not fit in guest RAM "
                f"({describe_ram(memory)})",
            )
        if mode is CpuMode.REAL and end > REAL_MODE_LIMIT:
            raise ImageFormatError(
                str(path),
                f"{size:#x} bytes at {load_address:#x} end at {end:#x}, beyond the 1 MiB that real mode "
                "can address",
            )
        if mode is not CpuMode.REAL and load_address < BOOT_STRUCTURES_END and end > BOOT_STRUCTURES_START:
            raise ImageFormatError(
                str(path),
                f"{load_address:#x}-{end:#x} overlaps the VMM's boot structures at "
                f"{BOOT_STRUCTURES_START:#x}-{BOOT_STRUCTURES_END:#x} (needed for {mode.value} mode entry)",
            )
        if not load_address <= entry < end:
            raise ConfigError(f"entry {entry:#x} is outside the flat image at {load_address:#x}-{end:#x}")
        if entry >= ENTRY_LIMIT:
            raise ConfigError(f"entry {entry:#x} is above 4 GiB, beyond the identity map vmscope enters with")

        # Validate CS:IP before anything is written.
        cs, ip = real_mode_cs_ip(load_address, entry) if mode is CpuMode.REAL else (0, entry)

        copy_into_guest(memory, stream, path, load_address, size)

    state: CpuEntryState
    if mode is CpuMode.LONG:
        state = long_mode_state(memory, entry)
    elif mode is CpuMode.PROTECTED:
        state = protected_mode_state(memory, entry)
    else:
        state = real_mode_state(ip, cs_selector=cs)
    return LoadedGuest(
        entry=state,
        segments=[LoadedSegment(load_address, size, "flat image"), *mode_structures(mode)],
        symbol_file=None,
        kind=f"flat ({mode.value} mode)",
    )
