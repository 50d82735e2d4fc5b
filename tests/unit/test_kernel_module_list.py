"""Loadable modules read from a fake guest memory: the kernel's ``modules`` list, text ranges in the
6.4+ (mem[MOD_TEXT]) and older (core_layout) layouts, mod_kallsyms symbols, hostile lists ending the
walk, and the tracker scanning only when a sample lands outside everything known."""

from __future__ import annotations

import struct

import pytest

from tests.unit.btf_blob import kernel_types
from tests.unit.kernel_tables import build_kallsyms
from tests.unit.test_kernel_tasks import FakeMemory
from vmscope.profiler.kernel.btf import parse_btf
from vmscope.profiler.kernel.kallsyms import parse_kallsyms
from vmscope.profiler.kernel.modules import (
    ModuleLayout,
    ModuleTracker,
    read_module_symbols,
    walk_modules,
)
from vmscope.symbols import Symbolizer

MODULES_HEAD = 0xFFFF_FFFF_82B2_7160
SLIDE = 0x1A00_0000
STRUCTS = 0xFFFF_FFFF_C000_0000


class FakeGuest(FakeMemory):
    """Mapped page by page, like guest memory: a page with any byte written reads as zeros elsewhere."""

    def read(self, address: int) -> int | None:
        data = self.read_bytes(address, 8)
        return None if data is None else int.from_bytes(data, "little")

    def read_bytes(self, address: int, length: int) -> bytes | None:
        self.reads += 1
        pages = {page for page in range(address >> 12, ((address + length - 1) >> 12) + 1)}
        if not pages <= self.pages:
            return None
        return bytes(self.bytes.get(address + i, 0) for i in range(length))

    def write(self, address: int, data: bytes) -> None:
        super().write(address, data)
        self.pages.update(range(address >> 12, ((address + len(data) - 1) >> 12) + 1))

    def __init__(self) -> None:
        super().__init__()
        self.pages: set[int] = set()


def module_layout(module_mem: bool = True, module_orc: bool = True) -> ModuleLayout:
    base = 0xFFFF_FFFF_8100_0000
    names = [(f"func_{i}", "T", base + 0x100 * i) for i in range(40)] + [("modules", "D", MODULES_HEAD)]
    kallsyms = parse_kallsyms(build_kallsyms(sorted(names, key=lambda s: s[2])))
    btf = parse_btf(kernel_types(module_mem=module_mem, module_orc=module_orc)[0])
    return ModuleLayout.from_kernel(kallsyms, btf)


def add_module(guest: FakeGuest, layout: ModuleLayout, index: int, name: str, text: int, size: int,
               functions: list[tuple[str, int, int]]) -> int:  # fmt: skip
    """A struct module at a fixed place with ``functions`` (name, offset, size) in its mod_kallsyms."""
    module = STRUCTS + index * 0x10000
    guest.write(module + layout.name, name.encode().ljust(layout.name_size, b"\0"))
    guest.word(module + layout.text_base, text)
    guest.word(module + layout.text_size, size | (0xAAAA << 32))  # only the low 32 bits count
    table = module + 0x2000
    symtab, strtab = module + 0x3000, module + 0x5000
    strings = b"\0" + b"".join(n.encode() + b"\0" for n, _, _ in functions) + b"data_obj\0"
    entries = []
    offset = 1
    for function, start, length in functions:
        entries.append(struct.pack("<IBBHQQ", offset, 0x12, 0, 1, text + start, length))
        offset += len(function) + 1
    entries.append(struct.pack("<IBBHQQ", offset, 0x11, 0, 2, text + 8, 4))  # an object: not code
    guest.write(symtab, b"".join(entries))
    guest.write(strtab, strings)
    assert layout.kallsyms is not None
    guest.word(module + layout.kallsyms, table)
    guest.word(table + layout.symtab, symtab)
    guest.word(table + layout.num_symtab, len(entries))
    guest.word(table + layout.strtab, strtab)
    return module


def link(guest: FakeGuest, layout: ModuleLayout, modules: list[int]) -> None:
    head = MODULES_HEAD + SLIDE
    nodes = [head] + [module + layout.list for module in modules]
    for node, following in zip(nodes, [*nodes[1:], head], strict=True):
        guest.word(node, following)


@pytest.mark.parametrize("module_mem", [True, False])
def test_walk_finds_names_ranges_and_symbols(module_mem: bool) -> None:
    layout = module_layout(module_mem)
    guest = FakeGuest()
    blk = add_module(
        guest, layout, 0, "virtio_blk", 0xFFFF_FFFF_C010_0000, 0x3000, [("virtblk_probe", 0x100, 0x80)]
    )
    net = add_module(
        guest, layout, 1, "virtio_net", 0xFFFF_FFFF_C020_0000, 0x8000, [("start_xmit", 0x400, 0x200)]
    )
    link(guest, layout, [blk, net])
    modules = walk_modules(guest.read, guest.read_bytes, layout, SLIDE)
    assert [(m.name, m.start, m.end) for m in modules] == [
        ("virtio_blk", 0xFFFF_FFFF_C010_0000, 0xFFFF_FFFF_C010_3000),
        ("virtio_net", 0xFFFF_FFFF_C020_0000, 0xFFFF_FFFF_C020_8000),
    ]
    found = read_module_symbols(guest.read, guest.read_bytes, layout, modules[1])
    assert [(s.name, s.start, s.size) for s in found] == [("start_xmit", 0xFFFF_FFFF_C020_0400, 0x200)]


def test_tracker_scans_lazily_and_symbolizes_module_code() -> None:
    layout = module_layout()
    guest = FakeGuest()
    text = 0xFFFF_FFFF_C010_0000
    blk = add_module(guest, layout, 0, "virtio_blk", text, 0x3000, [("virtblk_probe", 0x100, 0x80)])
    link(guest, layout, [blk])
    tracker = ModuleTracker(layout, rescan_every=4)
    tracker.note(text + 0x120, guest.read, guest.read_bytes, SLIDE)
    assert tracker.scans == 1
    reads = guest.reads
    tracker.note(text + 0x2000, guest.read, guest.read_bytes, SLIDE)  # covered: no scan, no read
    assert tracker.scans == 1 and guest.reads == reads
    for _ in range(4):  # outside every module: rescans at most every 4th miss
        tracker.note(0xFFFF_FFFF_C900_0000, guest.read, guest.read_bytes, SLIDE)
    assert tracker.scans == 2
    symbolizer = Symbolizer(tracker.symbol_tables())
    assert symbolizer.function_name(text + 0x120) == "virtblk_probe"
    assert symbolizer.function_name(text + 0x2000) == "virtio_blk+0x2000"


def test_hostile_lists_end_the_walk() -> None:
    layout = module_layout()
    guest = FakeGuest()
    first = add_module(guest, layout, 0, "first", 0xFFFF_FFFF_C010_0000, 0x1000, [])
    second = add_module(guest, layout, 1, "second", 0xFFFF_FFFF_C020_0000, 0x1000, [])
    link(guest, layout, [first, second])
    guest.word(second + layout.list, first + layout.list)  # a cycle that skips the head
    assert [m.name for m in walk_modules(guest.read, guest.read_bytes, layout, SLIDE)] == ["first", "second"]
    guest.word(first + layout.list, 0x4000_0000)  # a user-space link
    assert [m.name for m in walk_modules(guest.read, guest.read_bytes, layout, SLIDE)] == ["first"]
    guest.word(first + layout.list, second + layout.list)
    guest.word(second + layout.text_size, 1 << 31)  # a 2 GiB "text"
    assert [m.name for m in walk_modules(guest.read, guest.read_bytes, layout, SLIDE)] == ["first"]
    assert walk_modules(guest.read, guest.read_bytes, layout, SLIDE + 0x1000) == []  # unreadable head


def test_hostile_symbol_tables_give_no_symbols() -> None:
    layout = module_layout()
    guest = FakeGuest()
    text = 0xFFFF_FFFF_C010_0000
    module = add_module(guest, layout, 0, "m", text, 0x1000, [("f", 0x10, 8)])
    link(guest, layout, [module])
    (found,) = walk_modules(guest.read, guest.read_bytes, layout, SLIDE)
    assert [s.name for s in read_module_symbols(guest.read, guest.read_bytes, layout, found)] == ["f"]
    table = module + 0x2000
    guest.word(table + layout.num_symtab, 50_000_000)
    assert read_module_symbols(guest.read, guest.read_bytes, layout, found) == []
    guest.word(table + layout.num_symtab, 40_000)  # more entries than are mapped
    assert read_module_symbols(guest.read, guest.read_bytes, layout, found) == []
    guest.word(table + layout.num_symtab, 2)
    guest.word(table + layout.strtab, 0xFFFF_FFFF_DEAD_0000)  # unmapped strings
    assert read_module_symbols(guest.read, guest.read_bytes, layout, found) == []
    guest.word(module + layout.kallsyms, 0)
    assert read_module_symbols(guest.read, guest.read_bytes, layout, found) == []
