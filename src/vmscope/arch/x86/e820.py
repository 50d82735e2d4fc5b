"""The guest's physical memory map as firmware reports it (E820 / PVH memmap)."""

from __future__ import annotations

import enum
from typing import NamedTuple

from vmscope.arch.x86.layout import EBDA_START, HIGH_MEMORY_START
from vmscope.memory.guest_memory import GuestMemory


class E820Type(enum.IntEnum):
    RAM = 1
    RESERVED = 2
    ACPI = 3
    NVS = 4
    UNUSABLE = 5


class E820Entry(NamedTuple):
    address: int
    size: int
    type: E820Type

    @property
    def end(self) -> int:
        return self.address + self.size


def build_e820(memory: GuestMemory) -> list[E820Entry]:
    """RAM below the EBDA, the legacy BIOS hole reserved, then each RAM region from 1 MiB."""
    entries: list[E820Entry] = []
    for base, size in memory.ranges():
        end = base + size
        if base < HIGH_MEMORY_START:
            entries.append(E820Entry(base, min(end, EBDA_START) - base, E820Type.RAM))
            entries.append(E820Entry(EBDA_START, HIGH_MEMORY_START - EBDA_START, E820Type.RESERVED))
            if end > HIGH_MEMORY_START:
                entries.append(E820Entry(HIGH_MEMORY_START, end - HIGH_MEMORY_START, E820Type.RAM))
        else:
            entries.append(E820Entry(base, size, E820Type.RAM))
    return entries
