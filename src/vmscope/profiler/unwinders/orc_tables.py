"""Which ORC table describes a kernel address: the image's own (placed by the KASLR slide) or that
of the loadable module whose text holds it (Linux keeps one per module, see kernel/module_orc.py),
the way the kernel's ``orc_find`` falls back to ``orc_module_find``."""

from __future__ import annotations

import bisect

from vmscope.profiler.unwinders.orc import OrcEntry, OrcTable

#: (text start, text end, table) sorted by start
_ModuleEntry = tuple[int, int, OrcTable]


class OrcTables:
    """The kernel's table and its modules' tables behind one lookup, for :class:`OrcUnwinder`.

    vCPU threads read it while the module scan adds to it: the module index is replaced whole,
    never changed in place, so a reader sees the old index or the new one."""

    def __init__(self, kernel: OrcTable | None = None) -> None:
        self.kernel = kernel
        self._index: tuple[tuple[int, ...], tuple[_ModuleEntry, ...]] = ((), ())

    def set_kernel(self, table: OrcTable | None) -> None:
        self.kernel = table

    def add_module(self, start: int, end: int, table: OrcTable) -> None:
        """Module text ``[start, end)`` unwinds with ``table``; a range it overlaps is an unloaded
        module's and goes."""
        _, entries = self._index
        kept = [entry for entry in entries if entry[1] <= start or entry[0] >= end]
        ordered = tuple(sorted([*kept, (start, end, table)], key=lambda entry: entry[0]))
        self._index = (tuple(entry[0] for entry in ordered), ordered)

    @property
    def module_count(self) -> int:
        return len(self._index[1])

    def table_for(self, ip: int) -> OrcTable | None:
        kernel = self.kernel
        if kernel is not None and kernel.covers(ip):
            return kernel
        starts, entries = self._index
        index = bisect.bisect_right(starts, ip) - 1
        if index >= 0 and ip < entries[index][1]:
            return entries[index][2]
        return None

    def covers(self, ip: int) -> bool:
        return self.table_for(ip) is not None

    def lookup(self, ip: int) -> OrcEntry | None:
        table = self.table_for(ip)
        return None if table is None else table.lookup(ip)
