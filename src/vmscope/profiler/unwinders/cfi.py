"""DWARF call frame information (``.eh_frame`` / ``.debug_frame``, decoded with pyelftools) as a flat,
sorted table of rows, and a walker over it.

Only the rules compilers emit for x86-64 code are kept: CFA = rsp or rbp + offset, the return
address and rbp saved at CFA + offset (or rbp unchanged). A row with any other rule (a DWARF
expression, a CFA in another register) ends the walk at that frame.
"""

from __future__ import annotations

import bisect
import os
from dataclasses import dataclass
from typing import Any

from vmscope.errors import KernelTableError
from vmscope.profiler.unwinders.base import (
    STOP_BAD_FRAME,
    STOP_BAD_READ,
    STOP_DEPTH,
    STOP_END,
    STOP_NO_TABLE,
    STOP_UNDEFINED,
    Registers,
    UnwindResult,
    WordReader,
)

# DWARF register numbers on x86-64
DWARF_RBP, DWARF_RSP, DWARF_RA = 6, 7, 16
_MAX_FRAME = 1 << 20


@dataclass(frozen=True, slots=True)
class CfiRow:
    """Rules in force over ``[start, end)``; ``None`` offsets mean "not saved" (rbp) / unknown (ra)."""

    start: int
    end: int
    cfa_register: int
    cfa_offset: int
    ra_offset: int | None
    bp_offset: int | None


class CfiTable:
    """Rows sorted by address, relocated by ``load_bias``."""

    def __init__(self, rows: list[CfiRow], source: str) -> None:
        rows.sort(key=lambda row: row.start)
        self.rows = rows
        self.source = source
        self._starts = [row.start for row in rows]
        self.start = rows[0].start if rows else 0
        self.end = max((row.end for row in rows), default=0)

    def lookup(self, ip: int) -> CfiRow | None:
        index = bisect.bisect_right(self._starts, ip) - 1
        if index < 0:
            return None
        row = self.rows[index]
        return row if row.start <= ip < row.end else None

    @classmethod
    def from_elf(cls, path: str | os.PathLike[str], load_bias: int = 0) -> CfiTable:
        """Rows of an ELF's ``.eh_frame`` and ``.debug_frame``; raises KernelTableError if it has none."""
        from elftools.common.exceptions import DWARFError, ELFError
        from elftools.elf.elffile import ELFFile

        path_text = os.fspath(path)
        table = f"CFI of {path_text}"
        try:
            with open(path_text, "rb") as stream:
                elf = ELFFile(stream)
                if not elf.has_dwarf_info():
                    raise KernelTableError(table, "no .eh_frame or .debug_frame")
                dwarf = elf.get_dwarf_info()
                entries: list[Any] = []
                if dwarf.has_EH_CFI():
                    entries.extend(dwarf.EH_CFI_entries())
                if dwarf.has_CFI():
                    entries.extend(dwarf.CFI_entries())
                rows = _rows(entries, load_bias)
        except OSError as error:
            raise KernelTableError(table, f"cannot read: {error.strerror or error}") from None
        except (ELFError, DWARFError, ValueError, KeyError, IndexError, TypeError, AttributeError) as error:
            # pyelftools raises assorted exceptions on truncated or corrupt sections
            raise KernelTableError(table, f"malformed call frame information: {error!r}") from None
        if not rows:
            raise KernelTableError(table, "no .eh_frame or .debug_frame")
        return cls(rows, path_text)


def _rows(entries: list[Any], load_bias: int) -> list[CfiRow]:
    from elftools.dwarf.callframe import FDE

    rows: list[CfiRow] = []
    for entry in entries:
        if not isinstance(entry, FDE):
            continue
        begin = int(entry.header["initial_location"]) + load_bias
        end = begin + int(entry.header["address_range"])
        decoded = entry.get_decoded().table
        for index, line in enumerate(decoded):
            start = int(line["pc"]) + load_bias
            stop = int(decoded[index + 1]["pc"]) + load_bias if index + 1 < len(decoded) else end
            cfa = line["cfa"]
            if cfa.expr is not None or cfa.reg is None:
                rows.append(CfiRow(start, stop, -1, 0, None, None))
                continue
            rows.append(
                CfiRow(
                    start,
                    stop,
                    int(cfa.reg),
                    int(cfa.offset),
                    _offset(line, DWARF_RA),
                    _offset(line, DWARF_RBP),
                )
            )
    return rows


def _offset(line: dict[Any, Any], register: int) -> int | None:
    rule = line.get(register)
    if rule is None or rule.type != "OFFSET":
        return None
    return int(rule.arg)


class CfiUnwinder:
    """Walks stacks of code covered by a :class:`CfiTable`; frames outside it end the walk."""

    name = "cfi"

    def __init__(self, table: CfiTable, max_depth: int = 64) -> None:
        self.table = table
        self.max_depth = max_depth

    def covers(self, ip: int) -> bool:
        return self.table.lookup(ip) is not None

    def unwind(self, start: Registers, read: WordReader) -> UnwindResult:
        frames = [start.ip]
        ip, sp, bp = start.ip, start.sp, start.bp
        exact = True
        while len(frames) < self.max_depth:
            row = self.table.lookup(ip if exact else ip - 1)
            if row is None:
                stop = STOP_END if len(frames) > 1 else STOP_NO_TABLE
                return UnwindResult(tuple(frames), self.name, stop)
            if row.cfa_register == DWARF_RSP:
                cfa = sp + row.cfa_offset
            elif row.cfa_register == DWARF_RBP:
                cfa = bp + row.cfa_offset
            else:
                return UnwindResult(tuple(frames), self.name, STOP_UNDEFINED)
            if row.ra_offset is None:
                return UnwindResult(tuple(frames), self.name, STOP_UNDEFINED)
            if cfa <= sp or cfa - sp > _MAX_FRAME:
                return UnwindResult(tuple(frames), self.name, STOP_BAD_FRAME)
            return_address = read(cfa + row.ra_offset)
            if return_address is None:
                return UnwindResult(tuple(frames), self.name, STOP_BAD_READ)
            if row.bp_offset is not None:
                saved = read(cfa + row.bp_offset)
                if saved is None:
                    return UnwindResult(tuple(frames), self.name, STOP_BAD_READ)
                bp = saved
            if return_address == 0:
                return UnwindResult(tuple(frames), self.name, STOP_END)
            frames.append(return_address)
            ip, sp, exact = return_address, cfa, False
        return UnwindResult(tuple(frames), self.name, STOP_DEPTH)
