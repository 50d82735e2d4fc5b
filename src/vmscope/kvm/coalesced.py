"""KVM's coalesced MMIO/PIO ring: guest writes KVM queued instead of exiting to us.

A zone registered with KVM_REGISTER_COALESCED_MMIO (``pio=1`` for ports) makes KVM append
each guest write inside it to one VM-wide ring page and resume the guest at once; only when
the ring is full does the write become an ordinary exit. The ring is mapped at page
``KVM_COALESCED_MMIO_PAGE_OFFSET`` of every vCPU's mmap: a ``kvm_coalesced_mmio_ring``
header (``first``: the consumer's index, ours; ``last``: the producer's, KVM's) followed by
``kvm_coalesced_mmio`` entries to the end of the page. This module is the only code that
knows that layout; the entries come out as plain tuples.
"""

from __future__ import annotations

import ctypes
import mmap
import struct

from vmscope.kvm import constants as c
from vmscope.kvm import structs as s

_HEADER_SIZE = ctypes.sizeof(s.kvm_coalesced_mmio_ring)
_ENTRY = struct.Struct("<QII8s")  # phys_addr, len, pio, data[8]: kvm_coalesced_mmio
assert _ENTRY.size == ctypes.sizeof(s.kvm_coalesced_mmio)

#: (pio, guest address or port, the bytes written)
CoalescedWrite = tuple[bool, int, bytes]


def ring_offset() -> int:
    """Byte offset of the ring inside a vCPU's mmap."""
    return c.KVM_COALESCED_MMIO_PAGE_OFFSET * mmap.PAGESIZE


class CoalescedRing:
    """The VM's ring, read through one vCPU's mmap (any vCPU's maps the same page).

    Not thread-safe: the caller serialises :meth:`take` (the ring has one consumer index).
    """

    def __init__(self, vcpu_mmap: mmap.mmap) -> None:
        offset = ring_offset()
        if len(vcpu_mmap) < offset + mmap.PAGESIZE:
            raise ValueError(f"the vCPU mmap ({len(vcpu_mmap)} bytes) does not reach the coalesced ring")
        self._page = memoryview(vcpu_mmap)[offset : offset + mmap.PAGESIZE]
        #: [first, last] as live u32 views: the exit loop compares them to see pending writes
        #: without a call
        self.indices = self._page[:_HEADER_SIZE].cast("I")
        #: entries the ring holds (KVM_COALESCED_MMIO_MAX)
        self.capacity = (mmap.PAGESIZE - _HEADER_SIZE) // _ENTRY.size

    def pending(self) -> bool:
        indices = self.indices
        return indices[0] != indices[1]

    def take(self) -> list[CoalescedWrite]:
        """Every queued write, oldest first, and free their slots for KVM."""
        indices = self.indices
        first, last = indices[0], indices[1]
        capacity = self.capacity
        if first >= capacity or last >= capacity:  # KVM keeps both in range; never trust blindly
            indices[0] = last % capacity
            return []
        page = self._page
        unpack = _ENTRY.unpack_from
        writes: list[CoalescedWrite] = []
        while first != last:
            address, length, pio, data = unpack(page, _HEADER_SIZE + first * _ENTRY.size)
            writes.append((bool(pio), address, data[: min(length, 8)]))
            first = (first + 1) % capacity
        # x86 keeps stores in order, so KVM sees the slots free only after we copied them
        indices[0] = first
        return writes

    def close(self) -> None:
        """Release the views so the vCPU's mmap can be unmapped."""
        self.indices.release()
        self._page.release()
