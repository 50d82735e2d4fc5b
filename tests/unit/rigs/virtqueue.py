"""The driver's side of split virtqueues in test guest RAM: a buffer allocator and a ring."""

from __future__ import annotations

import struct

from vmscope.memory.guest_memory import GuestMemory
from vmscope.virtio.queue import (
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
)

RAM_SIZE = 16 << 20


#: an address in the 32-bit MMIO hole: never RAM
OUTSIDE_RAM = 0xE000_0000


Buffer = tuple[int, int, bool]  # (guest address, length, device-writable)


class Arena:
    """Bump allocator for guest-physical buffers (starts at 1 MiB, below the 16 MiB of RAM)."""

    def __init__(self, memory: GuestMemory, start: int = 1 << 20) -> None:
        self.memory = memory
        self.next = start

    def alloc(self, size: int, align: int = 16) -> int:
        address = (self.next + align - 1) & ~(align - 1)
        self.next = address + max(size, 1)
        assert self.next < RAM_SIZE
        return address

    def put(self, data: bytes, align: int = 16) -> int:
        address = self.alloc(len(data), align)
        self.memory.write(address, data)
        return address


class Ring:
    """The driver's view of one split virtqueue (descriptor table, available and used rings)."""

    def __init__(self, memory: GuestMemory, arena: Arena, size: int) -> None:
        self.memory = memory
        self.arena = arena
        self.size = size
        self.desc = arena.alloc(16 * size, 4096)
        self.avail = arena.alloc(6 + 2 * size, 2)
        self.used = arena.alloc(6 + 8 * size, 4096)
        self.next_desc = 0
        self.avail_idx = 0
        self.used_seen = 0

    # -- descriptors ----------------------------------------------------------------------------

    def write_desc(
        self,
        index: int,
        address: int,
        length: int,
        flags: int = 0,
        next_index: int = 0,
        table: int | None = None,
    ) -> None:
        base = self.desc if table is None else table
        self.memory.write(base + 16 * index, struct.pack("<QIHH", address, length, flags, next_index))

    def _take(self, count: int) -> list[int]:
        indexes = [(self.next_desc + i) % self.size for i in range(count)]
        self.next_desc = (self.next_desc + count) % self.size
        return indexes

    def add_chain(self, buffers: list[Buffer], *, publish: bool = True) -> int:
        """Chain ``buffers`` through the descriptor table and make the head available."""
        indexes = self._take(len(buffers))
        for position, (address, length, writable) in enumerate(buffers):
            last = position == len(buffers) - 1
            flags = (VIRTQ_DESC_F_WRITE if writable else 0) | (0 if last else VIRTQ_DESC_F_NEXT)
            self.write_desc(indexes[position], address, length, flags, 0 if last else indexes[position + 1])
        if publish:
            self.publish(indexes[0])
        return indexes[0]

    def add_indirect(self, buffers: list[Buffer], *, prefix: list[Buffer] | None = None) -> int:
        """``buffers`` in an indirect table, optionally after direct descriptors ``prefix``."""
        table = self.arena.alloc(16 * len(buffers), 16)
        for position, (address, length, writable) in enumerate(buffers):
            last = position == len(buffers) - 1
            flags = (VIRTQ_DESC_F_WRITE if writable else 0) | (0 if last else VIRTQ_DESC_F_NEXT)
            self.write_desc(position, address, length, flags, 0 if last else position + 1, table=table)
        prefix = prefix or []
        indexes = self._take(len(prefix) + 1)
        for position, (address, length, writable) in enumerate(prefix):
            flags = (VIRTQ_DESC_F_WRITE if writable else 0) | VIRTQ_DESC_F_NEXT
            self.write_desc(indexes[position], address, length, flags, indexes[position + 1])
        self.write_desc(indexes[-1], table, 16 * len(buffers), VIRTQ_DESC_F_INDIRECT)
        self.publish(indexes[0])
        return indexes[0]

    def publish(self, head: int) -> None:
        self.memory.write_u16(self.avail + 4 + 2 * (self.avail_idx % self.size), head)
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.memory.write_u16(self.avail + 2, self.avail_idx)

    # -- notification suppression --------------------------------------------------------------------

    def set_avail_flags(self, flags: int) -> None:
        self.memory.write_u16(self.avail, flags)

    def set_used_event(self, value: int) -> None:
        self.memory.write_u16(self.avail + 4 + 2 * self.size, value)

    def avail_event(self) -> int:
        return self.memory.read_u16(self.used + 4 + 8 * self.size)

    # -- used ring -----------------------------------------------------------------------------------

    def used_idx(self) -> int:
        return self.memory.read_u16(self.used + 2)

    def take_used(self) -> list[tuple[int, int]]:
        """New (head, length) used elements since the last call."""
        entries = []
        end = self.used_idx()
        while self.used_seen != end:
            slot = self.used_seen % self.size
            entries.append(struct.unpack("<II", self.memory.read(self.used + 4 + 8 * slot, 8)))
            self.used_seen = (self.used_seen + 1) & 0xFFFF
        return entries
