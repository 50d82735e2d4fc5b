"""Guest call stacks from the host: frame-pointer unwinding through guest memory.

The guest is stopped (we run on its vCPU thread between exits), so its stack is consistent.
Each frame is ``[rbp] = caller's rbp, [rbp + 8] = return address`` (x86-64 with frame
pointers; 4-byte words for 32-bit code). Every read goes through the guest page tables and
GuestMemory, so a corrupt or hostile stack ends the walk, never the VMM. Translations are
cached per (CR3, page) because consecutive samples walk the same stack pages.
"""

from __future__ import annotations

from vmscope.errors import GuestMemoryError
from vmscope.memory.guest_memory import GuestMemory
from vmscope.memory.paging import PagingMode, translate

DEFAULT_MAX_DEPTH = 64
_CACHE_LIMIT = 4096
_CANONICAL_LOW = 0x0000_7FFF_FFFF_FFFF
_CANONICAL_HIGH = 0xFFFF_8000_0000_0000


def is_canonical(address: int) -> bool:
    return address <= _CANONICAL_LOW or address >= _CANONICAL_HIGH


class StackUnwinder:
    """Walks frame-pointer chains; one instance per vCPU (its cache is not thread-safe)."""

    def __init__(self, memory: GuestMemory, max_depth: int = DEFAULT_MAX_DEPTH) -> None:
        self.memory = memory
        self.max_depth = max_depth
        self._pages: dict[tuple[int, int], int] = {}
        self.failed_reads = 0

    def read_word(self, mode: PagingMode, address: int, size: int) -> int | None:
        """One little-endian word at a guest-virtual address; None when unmapped (counted)."""
        page = address & ~0xFFF
        key = (mode.cr3, page)
        physical_page = self._pages.get(key)
        if physical_page is None:
            try:
                physical_page = translate(self.memory, mode, page)
            except GuestMemoryError:
                self.failed_reads += 1
                return None
            if len(self._pages) >= _CACHE_LIMIT:
                self._pages.clear()
            self._pages[key] = physical_page
        offset = address & 0xFFF
        if offset + size > 0x1000:  # a word straddling pages: rare, translate both halves
            try:
                low = self.memory.read(physical_page + offset, 0x1000 - offset)
                high_page = translate(self.memory, mode, page + 0x1000)
                data = low + self.memory.read(high_page, size - len(low))
            except GuestMemoryError:
                self.failed_reads += 1
                return None
            return int.from_bytes(data, "little")
        try:
            return (
                self.memory.read_u64(physical_page + offset)
                if size == 8
                else self.memory.read_u32(physical_page + offset)
            )
        except GuestMemoryError:
            self.failed_reads += 1
            return None

    def unwind(
        self, ip: int, frame_pointer: int, stack_pointer: int, mode: PagingMode, wide: bool = True
    ) -> tuple[int, ...]:
        """Return addresses leaf first, starting with ``ip``; stops cleanly on a bad frame.

        ``wide`` is True for 64-bit code. A frame must lie at or above the stack pointer and
        frames must move strictly upwards, which also rules out loops.
        """
        word = 8 if wide else 4
        frames = [ip]
        previous = stack_pointer - 1 if stack_pointer else 0
        frame = frame_pointer
        for _ in range(self.max_depth - 1):
            if frame == 0 or frame % word or frame <= previous or (wide and not is_canonical(frame)):
                break
            caller_frame = self.read_word(mode, frame, word)
            return_address = self.read_word(mode, frame + word, word)
            if caller_frame is None or return_address is None or return_address == 0:
                break
            if wide and not is_canonical(return_address):
                break
            frames.append(return_address)
            previous = frame
            frame = caller_frame
        return tuple(frames)
