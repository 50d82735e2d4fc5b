"""Loadable kernel modules of a running guest: names, text ranges and symbols, read from its memory.

The kernel links every ``struct module`` into the list headed by the ``modules`` variable (through
``module.list``). BTF gives the layout, which moved over the years: the text is ``mem[MOD_TEXT]``
(6.4 on), ``core_layout.base``/``text_size`` (4.5 to 6.3) or ``module_core``/``core_text_size``
(older). A module's own symbols are in ``struct mod_kallsyms`` (``symtab``, ``num_symtab``,
``strtab``): ELF symbols whose ``st_info`` holds the ELF type, or the nm letter in kernels that
reused it. The walk is bounded everywhere; a broken list ends it, keeping what was found. A module's
own ORC tables (kernels built with the ORC unwinder) are read once, when it is first found, and
handed to the unwinder's :class:`OrcTables` (see module_orc.py).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from vmscope.errors import KernelTableError
from vmscope.profiler.kernel.btf import Btf
from vmscope.profiler.kernel.kallsyms import Kallsyms
from vmscope.profiler.kernel.module_orc import ModuleOrcLayout, read_module_orc
from vmscope.profiler.unwinders.base import BytesReader, WordReader
from vmscope.profiler.unwinders.orc import OrcTable
from vmscope.profiler.unwinders.orc_tables import OrcTables
from vmscope.symbols import SymbolEntry, SymbolTable

_TABLE = "modules"
KERNEL_HALF = 0xFFFF_8000_0000_0000
MAX_MODULES = 4096
MAX_MODULE_SYMBOLS = 100_000
MAX_STRTAB = 4 << 20
MAX_TEXT = 256 << 20
_ELF_SYMBOL = struct.Struct("<IBBHQQ")
_STT_FUNC = 2
_MASK = 0xFFFF_FFFF_FFFF_FFFF



@dataclass(frozen=True, slots=True)
class ModuleLayout:
    """Offsets in ``struct module`` and ``struct mod_kallsyms``, and the list head's link address."""

    modules_head: int
    list: int
    name: int
    name_size: int
    text_base: int
    text_size: int
    kallsyms: int | None
    symtab: int
    num_symtab: int
    strtab: int
    #: where ``arch`` keeps the module's ORC tables; None when the kernel has no such members
    orc: ModuleOrcLayout | None = None

    @classmethod
    def from_kernel(cls, kallsyms: Kallsyms, btf: Btf) -> ModuleLayout:
        head = kallsyms.address_of("modules")
        if head is None:
            raise KernelTableError(_TABLE, "kallsyms has no 'modules' list head")
        name = btf.field("module", "name")
        if btf.has_member("module", "mem"):
            text = btf.enum_value("MOD_TEXT") or 0
            base = btf.field("module", f"mem[{text}].base").offset
            size = btf.field("module", f"mem[{text}].size").offset
        elif btf.has_member("module", "core_layout"):
            base = btf.field("module", "core_layout.base").offset
            size = btf.field("module", "core_layout.text_size").offset
        elif btf.has_member("module", "module_core"):
            base = btf.field("module", "module_core").offset
            size = btf.field("module", "core_text_size").offset
        else:
            raise KernelTableError(_TABLE, "struct module has none of mem, core_layout, module_core")
        symbols: int | None = None
        symtab = num_symtab = strtab = 0
        if btf.has_member("module", "kallsyms") and btf.has_member("mod_kallsyms", "symtab"):
            symbols = btf.field("module", "kallsyms").offset
            symtab = btf.field("mod_kallsyms", "symtab").offset
            num_symtab = btf.field("mod_kallsyms", "num_symtab").offset
            strtab = btf.field("mod_kallsyms", "strtab").offset
        return cls(
            head, btf.field("module", "list").offset, name.offset, btf.size_of(name.type_id), base, size,
            symbols, symtab, num_symtab, strtab, ModuleOrcLayout.from_btf(btf),
        )  # fmt: skip


@dataclass(slots=True)
class KernelModule:
    name: str
    #: run-time address of its struct module
    address: int
    start: int
    end: int
    symbols: list[SymbolEntry] = field(default_factory=list)
    #: its own ORC table, read once when the tracker first finds it
    orc: OrcTable | None = None
    #: why it has none ("" when it has one, or when the kernel keeps none)
    orc_problem: str = ""

    def symbol_table(self) -> SymbolTable:
        table = SymbolTable(self.name, sorted(self.symbols, key=lambda s: s.start), kind="module-kallsyms")
        table.start, table.end = self.start, self.end
        return table


def _kernel_pointer(value: int | None) -> bool:
    return value is not None and value >= KERNEL_HALF


def walk_modules(
    read: WordReader, read_bytes: BytesReader, layout: ModuleLayout, slide: int
) -> list[KernelModule]:
    """The loaded modules in list order (without symbols); stops at the first broken link."""
    head = (layout.modules_head + slide) & _MASK
    found: list[KernelModule] = []
    seen = {head}
    link = read(head)
    while _kernel_pointer(link) and link not in seen and len(found) < MAX_MODULES:
        assert link is not None
        seen.add(link)
        module = (link - layout.list) & _MASK
        raw_name = read_bytes(module + layout.name, layout.name_size)
        base, size = read(module + layout.text_base), read(module + layout.text_size)
        if raw_name is None or base is None or size is None:
            break
        name = raw_name.split(b"\0", 1)[0].decode("ascii", "replace")
        length = size & 0xFFFF_FFFF  # an unsigned int in every layout
        if not name or not _kernel_pointer(base) or length > MAX_TEXT:
            break
        found.append(KernelModule(name, module, base, base + length))
        link = read(link)
    return found


def read_module_symbols(read: WordReader, read_bytes: BytesReader, layout: ModuleLayout,
                        module: KernelModule) -> list[SymbolEntry]:  # fmt: skip
    """Code symbols of ``module`` from its mod_kallsyms; [] when it has none or they are unreadable."""
    if layout.kallsyms is None:
        return []
    table = read(module.address + layout.kallsyms)
    if not _kernel_pointer(table):
        return []
    assert table is not None
    symtab, count_word, strtab = (
        read(table + layout.symtab),
        read(table + layout.num_symtab),
        read(table + layout.strtab),
    )
    if not _kernel_pointer(symtab) or count_word is None or not _kernel_pointer(strtab):
        return []
    assert symtab is not None and strtab is not None
    count = count_word & 0xFFFF_FFFF
    if count == 0 or count > MAX_MODULE_SYMBOLS:
        return []
    raw = read_bytes(symtab, count * _ELF_SYMBOL.size)
    if raw is None:
        return []
    entries: list[tuple[int, int, int]] = []
    string_end = 0
    for index in range(count):
        name_offset, info, _other, _section, value, size = _ELF_SYMBOL.unpack_from(
            raw, index * _ELF_SYMBOL.size
        )
        if not _is_code(info) or not module.start <= value < module.end or name_offset >= MAX_STRTAB:
            continue
        entries.append((name_offset, value, size))
        string_end = max(string_end, name_offset + 128)
    if not entries:
        return []
    strings = _read_strings(read_bytes, strtab, min(string_end, MAX_STRTAB))
    symbols = []
    for name_offset, value, size in entries:
        end = strings.find(b"\0", name_offset)
        if end <= name_offset:
            continue
        name = strings[name_offset:end].decode("ascii", "replace")
        symbols.append(SymbolEntry(name, value, min(size, module.end - value)))
    return symbols


def _is_code(info: int) -> bool:
    # kernels 4.5 to 5.x kept the nm type letter in st_info; others keep the ELF type
    return chr(info) in "tTwW" if info >= 0x41 else (info & 0xF) == _STT_FUNC


def _read_strings(read_bytes: BytesReader, address: int, length: int) -> bytes:
    """As much of the string table as is mapped, page by page (the last name may end its page)."""
    out = bytearray()
    while len(out) < length:
        chunk = min(length - len(out), 0x1000 - ((address + len(out)) & 0xFFF))
        data = read_bytes(address + len(out), chunk)
        if data is None:
            break
        out += data
    return bytes(out)


class ModuleTracker:
    """Finds modules when the profile needs them: a sample in kernel-half code outside the kernel
    image and outside every known module triggers a rescan (at most one per ``rescan_every``
    misses), which also reads the symbols and ORC tables of newly found modules; the tables go
    to ``orc`` (shared with the unwinders), in the kernel image's ``orc_format``."""

    def __init__(self, layout: ModuleLayout, rescan_every: int = 256, orc: OrcTables | None = None,
                 orc_format: int | None = None) -> None:  # fmt: skip
        self.layout = layout
        self.rescan_every = rescan_every
        self.orc = orc
        self.orc_format = orc_format
        self.modules: dict[tuple[str, int], KernelModule] = {}
        self.scans = 0
        self._misses = 0

    def covers(self, address: int) -> bool:
        return any(module.start <= address < module.end for module in self.modules.values())

    def note(self, address: int, read: WordReader, read_bytes: BytesReader, slide: int) -> bool:
        """A sampled address outside the kernel image: rescan now and then until it is covered.
        True when this call's scan found the module that covers it."""
        if self.covers(address):
            return False
        self._misses += 1
        if self.scans and (self._misses - 1) % self.rescan_every:
            return False
        self.scans += 1
        for module in walk_modules(read, read_bytes, self.layout, slide):
            key = (module.name, module.start)
            if key not in self.modules:
                module.symbols = read_module_symbols(read, read_bytes, self.layout, module)
                self._read_orc(read, read_bytes, module)
                self.modules[key] = module
        return self.covers(address)

    def _read_orc(self, read: WordReader, read_bytes: BytesReader, module: KernelModule) -> None:
        if self.orc is None or self.layout.orc is None:
            return
        try:
            module.orc = read_module_orc(
                read, read_bytes, self.layout.orc, module.address, (module.start, module.end), self.orc_format
            )
        except KernelTableError as error:  # that module's frames end the walk; the others unwind
            module.orc_problem = str(error)
            return
        self.orc.add_module(module.start, module.end, module.orc)

    def symbol_tables(self) -> list[SymbolTable]:
        return [module.symbol_table() for module in self.modules.values()]
