"""Picks the unwinder for each code region: ORC for the kernel's text and its modules' (whichever
tables the ORC lookup covers), DWARF CFI for ELF images that carry it, frame pointers for everything
else; a kernel stack that ends in user space goes on there."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from vmscope.memory.guest_memory import GuestMemory
from vmscope.memory.paging import PagingMode
from vmscope.profiler.unwind import StackUnwinder
from vmscope.profiler.unwinders.base import (
    STOP_DEPTH,
    STOP_END,
    STOP_USER,
    Registers,
    UnwindResult,
    WordReader,
)
from vmscope.profiler.unwinders.orc import OrcLookup, OrcUnwinder

FRAME_POINTERS = "fp"
_KERNEL_HALF = 0xFFFF_8000_0000_0000


class RegionUnwinder(Protocol):
    name: str

    def covers(self, ip: int) -> bool: ...

    def unwind(self, start: Registers, read: WordReader) -> UnwindResult: ...


class UnwinderChooser:
    """One per vCPU (the page cache of its frame-pointer walker is not thread-safe)."""

    def __init__(
        self, memory: GuestMemory, max_depth: int = 64, regions: Sequence[RegionUnwinder] = ()
    ) -> None:
        self.frame_pointers = StackUnwinder(memory, max_depth)
        self.max_depth = max_depth
        self.regions = list(regions)
        self._orc: OrcUnwinder | None = None

    def set_kernel_orc(self, table: OrcLookup | None) -> None:
        """``table``: the kernel image's table, or :class:`OrcTables` with its modules' too."""
        self._orc = None if table is None else OrcUnwinder(table, self.max_depth)

    def unwind(self, start: Registers, mode: PagingMode, wide: bool = True) -> UnwindResult:
        if not wide:
            return self._frame_pointers(start, mode, wide)

        def read(address: int) -> int | None:
            return self.frame_pointers.read_word(mode, address, 8)

        if self._orc is not None and start.ip >= _KERNEL_HALF and self._orc.table.covers(start.ip):
            kernel = self._orc.unwind(start, read)
            if kernel.stop == STOP_USER and kernel.user is not None:
                user = self._user(kernel.user, mode, read)
                frames = (*kernel.frames[:-1], *user.frames)[: self.max_depth]
                return UnwindResult(frames, f"orc+{user.unwinder}", user.stop)
            return kernel
        return self._user(start, mode, read)

    def _user(self, start: Registers, mode: PagingMode, read: WordReader) -> UnwindResult:
        for region in self.regions:
            if region.covers(start.ip):
                return region.unwind(start, read)
        return self._frame_pointers(start, mode, True)

    def _frame_pointers(self, start: Registers, mode: PagingMode, wide: bool) -> UnwindResult:
        frames = self.frame_pointers.unwind(start.ip, start.bp, start.sp, mode, wide)
        stop = STOP_DEPTH if len(frames) >= self.max_depth else STOP_END
        return UnwindResult(frames, FRAME_POINTERS, stop)
