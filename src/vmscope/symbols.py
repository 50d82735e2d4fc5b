"""Guest symbolization: symbol tables from ELF images, System.map and /proc/kallsyms, and lookups.

A :class:`SymbolTable` holds one source's symbols at their *runtime* addresses (load bias already
added), so it can be stored in a profile and used on another machine. A :class:`Symbolizer` merges
tables into non-overlapping address segments once and answers :meth:`Symbolizer.lookup` by bisection.

Symbols without a size (System.map, kallsyms, some assembly labels) extend to the next symbol of
the same table, capped at :data:`MAX_SIZELESS_EXTENT`. Nested symbols resolve to the innermost one.

A neutral module (it needs only errors and file_limits): crash reports in vmm, the CLI and the
profiler all symbolize through it.
"""

from __future__ import annotations

import bisect
import functools
import os
import stat
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from vmscope.errors import VmscopeError
from vmscope.file_limits import MAX_SYMBOL_ELF_BYTES, MAX_SYMBOL_TEXT_BYTES, check_regular_file, read_bounded

#: x86-64 canonical higher half: guest addresses at or above this are kernel addresses
KERNEL_ADDRESS_START = 0xFFFF_8000_0000_0000
#: how far a symbol of unknown size may extend when no later symbol bounds it
MAX_SIZELESS_EXTENT = 1 << 20
_ADDRESS_LIMIT = 1 << 64
# nm / kallsyms type letters of code symbols
_TEXT_TYPES = frozenset("TtWwVv")


class SymbolFileError(VmscopeError):
    """A symbol file (ELF, System.map, kallsyms) is unreadable or malformed."""

    def __init__(self, path: str, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path = path
        self.problem = problem


@dataclass(frozen=True, slots=True)
class Symbol:
    """Result of a lookup: ``addr == start of name + offset``, inside ``module``."""

    name: str
    offset: int
    module: str


@dataclass(frozen=True, slots=True)
class SymbolEntry:
    """One symbol at its runtime address; ``size == 0`` means unknown."""

    name: str
    start: int
    size: int = 0


@dataclass(slots=True)
class SymbolTable:
    """The symbols of one module (kernel, module, user binary) at runtime addresses.

    ``start``/``end`` bound the module's mapped range when known (both 0 otherwise); addresses in that
    range without a symbol are shown as ``module+0xoffset``.
    """

    module: str
    symbols: list[SymbolEntry] = field(default_factory=list)
    path: str = ""
    kind: str = ""
    load_bias: int = 0
    start: int = 0
    end: int = 0

    def to_dict(self) -> dict[str, Any]:
        # parallel arrays keep the JSON small for large kernel tables
        return {
            "module": self.module,
            "path": self.path,
            "kind": self.kind,
            "load_bias": self.load_bias,
            "start": self.start,
            "end": self.end,
            "names": [s.name for s in self.symbols],
            "starts": [s.start for s in self.symbols],
            "sizes": [s.size for s in self.symbols],
        }

    @classmethod
    def from_dict(cls, data: Any) -> SymbolTable:
        if not isinstance(data, dict):
            raise VmscopeError("symbol table: expected an object")
        try:
            names, starts, sizes = data["names"], data["starts"], data["sizes"]
            if not (len(names) == len(starts) == len(sizes)):
                raise VmscopeError("symbol table: names, starts and sizes differ in length")
            symbols = []
            for name, start, size in zip(names, starts, sizes, strict=True):
                if not isinstance(name, str) or not _is_address(start) or not _is_address(size):
                    raise VmscopeError(f"symbol table: bad entry {name!r} {start!r} {size!r}")
                symbols.append(SymbolEntry(name, start, size))
            table = cls(
                module=str(data["module"]),
                symbols=symbols,
                path=str(data.get("path", "")),
                kind=str(data.get("kind", "")),
                load_bias=int(data.get("load_bias", 0)),
                start=int(data.get("start", 0)),
                end=int(data.get("end", 0)),
            )
        except (KeyError, TypeError, ValueError) as error:
            raise VmscopeError(f"symbol table: malformed ({error!r})") from None
        return table


def _is_address(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < _ADDRESS_LIMIT


def is_kernel_address(address: int) -> bool:
    return address >= KERNEL_ADDRESS_START


def address_space(address: int, cpl: int | None = None) -> str:
    """``"kernel"`` or ``"user"``: higher-half addresses are kernel; otherwise CPL 0 means kernel.

    Addresses below the higher half at CPL 0 are kernel code of guests that do not use the higher
    half (unikernels, the bundled test guests).
    """
    if address >= KERNEL_ADDRESS_START or cpl == 0:
        return "kernel"
    return "user"


# ---------------------------------------------------------------------------------------------------
# loading


def load_symbol_file(
    path: str | os.PathLike[str], module: str | None = None, load_bias: int = 0
) -> list[SymbolTable]:
    """Load an ELF image or a System.map/kallsyms text file (detected by content).

    Returns one table per module (a kallsyms listing names loadable modules in its 4th column).
    """
    path_text = os.fspath(path)
    fail = functools.partial(SymbolFileError, path_text)
    try:
        mode = os.stat(path_text).st_mode
        if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
            raise fail("is a device, not a symbol file (ELF, System.map or kallsyms)")
        with open(path_text, "rb") as stream:
            magic = stream.read(4)
    except OSError as error:
        raise SymbolFileError(path_text, f"cannot read: {error.strerror or error}") from None
    if magic == b"\x7fELF":
        return [load_elf_symbols(path_text, module=module, load_bias=load_bias)]
    return load_kallsyms(path_text, module=module, load_bias=load_bias)


def load_elf_symbols(
    path: str | os.PathLike[str], module: str | None = None, load_bias: int = 0
) -> SymbolTable:
    """Code symbols of an ELF image (vmlinux, a PIE, a shared object, a .ko) via pyelftools.

    ``load_bias`` is added to every address: the load address of a PIE/shared object, the KASLR
    offset of a vmlinux, or the runtime address of a module's ``.text`` for relocatable objects
    (whose symbols outside ``.text`` are then skipped, because other sections land elsewhere).
    """
    from elftools.common.exceptions import ELFError
    from elftools.elf.constants import SH_FLAGS
    from elftools.elf.elffile import ELFFile
    from elftools.elf.sections import SymbolTableSection

    path_text = os.fspath(path)
    module_name = module or os.path.basename(path_text)
    check_regular_file(
        path_text, MAX_SYMBOL_ELF_BYTES, functools.partial(SymbolFileError, path_text), "symbol file"
    )
    try:
        with open(path_text, "rb") as stream:
            elf = ELFFile(stream)
            relocatable = elf["e_type"] == "ET_REL"
            symtab = elf.get_section_by_name(".symtab") or elf.get_section_by_name(".dynsym")
            if not isinstance(symtab, SymbolTableSection):
                raise SymbolFileError(path_text, "ELF has no .symtab or .dynsym (stripped?)")
            executable_sections: set[int] = set()
            text_index = -1
            for index, section in enumerate(elf.iter_sections()):
                if section["sh_flags"] & SH_FLAGS.SHF_EXECINSTR:
                    executable_sections.add(index)
                if section.name == ".text":
                    text_index = index
            entries: list[SymbolEntry] = []
            for symbol in symtab.iter_symbols():
                if symbol["st_info"]["type"] not in ("STT_FUNC", "STT_NOTYPE", "STT_GNU_IFUNC"):
                    continue
                section_index = symbol["st_shndx"]
                if not isinstance(section_index, int) or section_index not in executable_sections:
                    continue
                if relocatable and section_index != text_index:
                    continue
                name = symbol.name
                if not name or name.startswith((".L", "$")):
                    continue
                address = symbol["st_value"] + load_bias
                if 0 <= address < _ADDRESS_LIMIT:
                    entries.append(SymbolEntry(name, address, int(symbol["st_size"])))
            if not entries:
                raise SymbolFileError(path_text, f"no code symbols in {symtab.name} (stripped?)")
            start, end = _elf_extent(elf, relocatable, text_index, load_bias)
    except ELFError as error:
        raise SymbolFileError(path_text, f"malformed ELF: {error}") from None
    except OSError as error:
        raise SymbolFileError(path_text, f"cannot read: {error.strerror or error}") from None
    except (ValueError, KeyError, AttributeError, TypeError) as error:
        # pyelftools raises assorted exceptions on truncated or corrupt files
        raise SymbolFileError(path_text, f"malformed ELF: {error!r}") from None
    return SymbolTable(
        module=module_name,
        symbols=entries,
        path=path_text,
        kind="elf",
        load_bias=load_bias,
        start=start,
        end=end,
    )


def _elf_extent(elf: Any, relocatable: bool, text_index: int, load_bias: int) -> tuple[int, int]:
    """Runtime range of the image's code, for ``module+offset`` names of unsymbolized addresses."""
    if relocatable:
        if text_index < 0:
            return 0, 0
        return load_bias, load_bias + int(elf.get_section(text_index)["sh_size"])
    low, high = _ADDRESS_LIMIT, 0
    for segment in elf.iter_segments():
        if segment["p_type"] == "PT_LOAD" and segment["p_flags"] & 1:  # PF_X
            low = min(low, int(segment["p_vaddr"]))
            high = max(high, int(segment["p_vaddr"]) + int(segment["p_memsz"]))
    if high == 0:
        return 0, 0
    return min(low + load_bias, _ADDRESS_LIMIT - 1), min(high + load_bias, _ADDRESS_LIMIT)


def load_system_map(
    path: str | os.PathLike[str], module: str | None = None, load_bias: int = 0
) -> list[SymbolTable]:
    """A System.map (``nm`` output: ``address type name``); code symbols only."""
    tables = load_kallsyms(path, module=module, load_bias=load_bias)
    for table in tables:
        table.kind = "system.map"
    return tables


def load_kallsyms(
    path: str | os.PathLike[str], module: str | None = None, load_bias: int = 0
) -> list[SymbolTable]:
    """/proc/kallsyms text (``address type name [module]``); code symbols only."""
    path_text = os.fspath(path)
    raw = read_bounded(
        path_text,
        MAX_SYMBOL_TEXT_BYTES,
        functools.partial(SymbolFileError, path_text),
        "System.map/kallsyms file",
    )
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        problem = f"not a System.map/kallsyms text file (undecodable byte at {error.start})"
        raise SymbolFileError(path_text, problem) from None
    return parse_kallsyms_text(text, path_text, module=module, load_bias=load_bias)


def parse_kallsyms_text(
    text: str, path: str, module: str | None = None, load_bias: int = 0
) -> list[SymbolTable]:
    """Parse System.map/kallsyms lines into one table per module; ``path`` names the source in errors.

    Symbols with a ``[name]`` 4th column belong to loadable module ``name``; the rest to ``module``
    (default ``"kernel"``).
    """
    base_module = module or "kernel"
    by_module: dict[str, list[SymbolEntry]] = {base_module: []}
    nonzero = False
    lines = 0
    for line_number, line in enumerate(text.splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        lines += 1
        if len(fields) < 3 or len(fields[1]) != 1:
            problem = f"line {line_number}: expected 'address type name', got {line[:60]!r}"
            raise SymbolFileError(path, problem)
        try:
            address = int(fields[0], 16)
        except ValueError:
            raise SymbolFileError(path, f"line {line_number}: bad address {fields[0][:20]!r}") from None
        if not 0 <= address < _ADDRESS_LIMIT:
            raise SymbolFileError(path, f"line {line_number}: address {fields[0][:20]} out of range")
        if fields[1] not in _TEXT_TYPES:
            continue
        nonzero = nonzero or address != 0
        owner = base_module
        if len(fields) >= 4 and fields[3].startswith("[") and fields[3].endswith("]"):
            owner = fields[3][1:-1]
        by_module.setdefault(owner, []).append(SymbolEntry(fields[2], (address + load_bias) % _ADDRESS_LIMIT))
    if lines == 0:
        raise SymbolFileError(path, "empty symbol file")
    if not nonzero:
        raise SymbolFileError(
            path, "no code symbol with a non-zero address (kptr_restrict, or not a System.map/kallsyms file?)"
        )
    return [
        SymbolTable(module=name, symbols=entries, path=path, kind="kallsyms", load_bias=load_bias)
        for name, entries in by_module.items()
        if entries
    ]


# ---------------------------------------------------------------------------------------------------
# lookup


class Symbolizer:
    """Address -> :class:`Symbol` over any number of tables, O(log n) per lookup."""

    def __init__(self, tables: Iterable[SymbolTable] = ()) -> None:
        self.tables: list[SymbolTable] = list(tables)
        self._segment_starts: list[int] = []
        self._segment_ends: list[int] = []
        self._segment_symbols: list[tuple[str, int, str]] = []  # name, symbol start, module
        self._module_starts: list[int] = []
        self._modules: list[tuple[int, int, str]] = []
        self._build()

    @classmethod
    def from_files(cls, paths: Sequence[str | os.PathLike[str]]) -> Symbolizer:
        tables: list[SymbolTable] = []
        for path in paths:
            tables.extend(load_symbol_file(path))
        return cls(tables)

    @classmethod
    def from_elf(
        cls, path: str | os.PathLike[str], module: str | None = None, load_bias: int = 0
    ) -> Symbolizer:
        return cls([load_elf_symbols(path, module=module, load_bias=load_bias)])

    def add(self, table: SymbolTable) -> None:
        self.tables.append(table)
        self._build()

    def __len__(self) -> int:
        return len(self._segment_starts)

    def _build(self) -> None:
        # (start, end, name, module): sizeless symbols end at the next symbol of their table
        intervals: list[tuple[int, int, str, str]] = []
        for table in self.tables:
            limit = table.end if table.end > table.start else _ADDRESS_LIMIT
            following = _ADDRESS_LIMIT  # the next greater start in this table
            group_start: int | None = None
            for entry in sorted(table.symbols, key=lambda entry: entry.start, reverse=True):
                if group_start is not None and entry.start != group_start:
                    following = group_start
                group_start = entry.start
                if entry.size > 0:
                    end = entry.start + entry.size
                else:
                    bound = limit if entry.start < limit else _ADDRESS_LIMIT
                    end = min(entry.start + MAX_SIZELESS_EXTENT, following, bound)
                if end > entry.start:
                    intervals.append((entry.start, min(end, _ADDRESS_LIMIT), entry.name, table.module))
        # longer first at equal starts, so nested (shorter) symbols win over their container
        intervals.sort(key=lambda item: (item[0], -item[1]))
        starts: list[int] = []
        ends: list[int] = []
        symbols: list[tuple[str, int, str]] = []

        def emit(low: int, high: int, item: tuple[int, int, str, str]) -> None:
            if high > low:
                starts.append(low)
                ends.append(high)
                symbols.append((item[2], item[0], item[3]))

        open_stack: list[tuple[int, int, str, str]] = []
        cursor = 0
        previous: tuple[int, int] | None = None
        for item in intervals:
            if previous == (item[0], item[1]):
                continue  # alias at the same range: the first name wins
            previous = (item[0], item[1])
            start = item[0]
            while open_stack and open_stack[-1][1] <= start:
                top = open_stack.pop()
                if top[1] > cursor:
                    emit(cursor, top[1], top)
                    cursor = top[1]
            if open_stack and cursor < start:
                emit(cursor, start, open_stack[-1])
            open_stack.append(item)
            cursor = start
        while open_stack:
            top = open_stack.pop()
            if top[1] > cursor:
                emit(cursor, top[1], top)
                cursor = top[1]
        self._segment_starts, self._segment_ends, self._segment_symbols = starts, ends, symbols
        modules = sorted((t.start, t.end, t.module) for t in self.tables if t.end > t.start)
        self._modules = modules
        self._module_starts = [m[0] for m in modules]

    def lookup(self, address: int) -> Symbol | None:
        """The innermost symbol containing ``address``, or None."""
        index = bisect.bisect_right(self._segment_starts, address) - 1
        if index < 0 or address >= self._segment_ends[index]:
            return None
        name, start, module = self._segment_symbols[index]
        return Symbol(name, address - start, module)

    def symbol_extent(self, address: int) -> tuple[str, int, int, str] | None:
        """``(name, symbol start, end of the segment holding address, module)`` or None."""
        index = bisect.bisect_right(self._segment_starts, address) - 1
        if index < 0 or address >= self._segment_ends[index]:
            return None
        name, start, module = self._segment_symbols[index]
        return name, start, self._segment_ends[index], module

    def module_of(self, address: int) -> tuple[str, int] | None:
        """``(module, offset)`` when ``address`` lies in a table's known range."""
        index = bisect.bisect_right(self._module_starts, address) - 1
        # modules rarely overlap: look at the few closest starts below the address
        for candidate in range(index, max(index - 8, -1), -1):
            start, end, module = self._modules[candidate]
            if address < end:
                return module, address - start
        return None

    def function_name(self, address: int) -> str:
        """A name for the function containing ``address``; never drops an address.

        ``name`` when symbolized, else ``module+0xoffset`` inside a known module, else ``0xaddress``.
        """
        symbol = self.lookup(address)
        if symbol is not None:
            return symbol.name
        return unknown_address_name(address, self.module_of(address))

    def name_and_offset(self, address: int) -> str | None:
        """``name+0xoffset`` (offset always shown) for crash reports and logs, or None when unknown."""
        symbol = self.lookup(address)
        return None if symbol is None else f"{symbol.name}+{symbol.offset:#x}"

    def describe(self, address: int) -> str:
        """``name+0xoffset [module]``-style text for one address (offset omitted when 0)."""
        symbol = self.lookup(address)
        if symbol is None:
            return unknown_address_name(address, self.module_of(address))
        offset = f"+{symbol.offset:#x}" if symbol.offset else ""
        return f"{symbol.name}{offset} [{symbol.module}]"


def unknown_address_name(address: int, module: tuple[str, int] | None) -> str:
    if module is not None:
        return f"{module[0]}+{module[1]:#x}"
    return f"{address:#x}"
