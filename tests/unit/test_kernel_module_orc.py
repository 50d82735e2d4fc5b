"""Loadable modules' own ORC tables (``struct module``'s ``arch`` member) read from a fake guest memory:
stacks through module code unwind into vmlinux and across modules, the table for an address is
picked at the text boundaries, a kernel without the members or a hostile table leaves the module
without ORC; the vCPU's unwinder chooser finds module code through the shared tables, and the
recorder scans for the module a sample (or the frame where a stack stopped) lies in, then unwinds."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.unit.btf_blob import kernel_types
from tests.unit.kernel_tables import KERNEL_BASE, build_kallsyms, build_orc, orc_entry
from tests.unit.rigs.stock_kernel import (
    PD,
    PDPT,
    FakeRunner,
    FakeVcpu,
    finished_machine,
    kernel_sregs,
    map_running_kernel,
)
from tests.unit.rigs.stock_kernel import SLIDE as RIG_SLIDE
from tests.unit.test_kernel_module_list import MODULES_HEAD, SLIDE, FakeGuest, add_module, link, module_layout
from tests.unit.test_unwind_orc import BOTTOM, CALLER, IRQ_ENTRY, LEAF, table
from tests.unit.test_unwind_orc import ENTRIES as ORC_ENTRIES
from tests.unit.test_unwind_orc import SECTION as ORC_SECTION
from vmscope.errors import GuestMemoryError, KernelTableError
from vmscope.kvm import structs as s
from vmscope.memory.guest_memory import GuestMemory
from vmscope.memory.paging import PagingMode, read_virtual
from vmscope.profiler.kernel import context
from vmscope.profiler.kernel.image import KernelImage, Section
from vmscope.profiler.kernel.module_orc import MAX_MODULE_ORCS, ModuleOrcLayout, read_module_orc
from vmscope.profiler.kernel.modules import KernelModule, ModuleLayout, ModuleTracker
from vmscope.profiler.model import ORIGIN_EXIT
from vmscope.profiler.recorder import ProfileRecorder
from vmscope.profiler.unwinders.base import STOP_END, STOP_NO_TABLE, Registers, UnwindResult
from vmscope.profiler.unwinders.chooser import UnwinderChooser
from vmscope.profiler.unwinders.orc import REG_BP, REG_PREV_SP, REG_SP, REG_UNDEFINED, OrcUnwinder
from vmscope.profiler.unwinders.orc_tables import OrcTables

A_TEXT, B_TEXT = 0xFFFF_FFFF_C010_0000, 0xFFFF_FFFF_C011_0000
A_SIZE, B_SIZE = 0x3000, 0x2000
A_LEAF, A_OTHER = A_TEXT + 0x100, A_TEXT + 0x200
B_ENTRY, B_WORK = B_TEXT + 0x40, B_TEXT + 0x80
STACK = 0xFFFF_FFFF_C01F_0000
#: (ip, entry) of each module as the kernel leaves them after sorting: a section terminator shares
#: B_WORK with the real entry and sorts first; the last entry of each text is an end terminator
A_ORC = [
    (A_TEXT, orc_entry(REG_UNDEFINED, 0, 0)),  # undefined code before the first function
    (A_LEAF, orc_entry(REG_SP, 8, 0)),  # frameless: return address at sp
    (A_OTHER, orc_entry(REG_SP, 16, 0)),
    (A_TEXT + A_SIZE - 0x10, orc_entry(REG_UNDEFINED, 0, 0)),
]
B_ORC = [
    (B_ENTRY, orc_entry(REG_SP, 8, 0)),
    (B_WORK, orc_entry(REG_UNDEFINED, 0, 0)),  # a section terminator at the same ip
    (B_WORK, orc_entry(REG_SP, 8, 0)),
    (B_WORK + 1, orc_entry(REG_BP, 16, 0, bp_reg=REG_PREV_SP, bp_offset=-16)),  # after push rbp; mov rbp, rsp
    (B_TEXT + B_SIZE - 0x10, orc_entry(REG_UNDEFINED, 0, 0)),
]
#: where the fake struct module keeps its ORC arrays, from its address
IPS_AT, ENTRIES_AT = 0x8000, 0xA000
MODULE_AREA = 0xFFFF_FFFF_C000_0000
#: guest RAM for guest_ram's 2 MiB pages (after the rig's kernel text) and page directories
FIRST_PHYSICAL, SPARE_PD = 0x60_0000, 0x30000
#: breaks mod_a's (at ``a``) ORC members or arrays, given mod_b's (at ``b``)
Corruption = Callable[[FakeGuest, ModuleOrcLayout, int, int], None]


def add_module_orc(
    guest: FakeGuest, layout: ModuleLayout, module: int, entries: list[tuple[int, bytes]]
) -> None:
    """The module's sorted ``orc_unwind_ip`` / ``orc_unwind`` arrays and its ``arch`` pointers to them."""
    assert layout.orc is not None
    ips, unwind = build_orc(module + IPS_AT, entries)
    guest.write(module + IPS_AT, ips)
    guest.write(module + ENTRIES_AT, unwind)
    guest.word(module + layout.orc.count, len(entries) | (0xBBBB << 32))  # an unsigned int: low 32 bits
    guest.word(module + layout.orc.ips, module + IPS_AT)
    guest.word(module + layout.orc.entries, module + ENTRIES_AT)


def two_modules(layout: ModuleLayout, orc: bool = True) -> tuple[FakeGuest, list[int]]:
    guest = FakeGuest()
    a = add_module(guest, layout, 0, "mod_a", A_TEXT, A_SIZE, [("a_leaf", 0x100, 0x80)])
    b = add_module(guest, layout, 1, "mod_b", B_TEXT, B_SIZE, [("b_work", 0x80, 0x100)])
    if orc:
        add_module_orc(guest, layout, a, A_ORC)
        add_module_orc(guest, layout, b, B_ORC)
    link(guest, layout, [a, b])
    return guest, [a, b]


def module_stack(guest: FakeGuest, slide: int) -> Registers:
    """a_leaf (mod_a, frameless) <- b_work (mod_b, bp frame) <- CALLER (vmlinux) <- IRQ_ENTRY's pt_regs,
    which interrupted vmlinux's BOTTOM, where the stack ends."""
    sp = STACK + 0x100
    put(guest, sp, B_WORK + 0x20)  # a_leaf's return address into mod_b
    b_sp = sp + 8
    put(guest, b_sp, STACK + 0xAA, STACK + 0x500, CALLER + 0x10 + slide)  # a local, saved bp, return
    caller_sp = b_sp + 24
    put(guest, caller_sp, 0, 0, IRQ_ENTRY + 8 + slide)
    regs = caller_sp + 24
    put(guest, regs + 32, STACK + 0x900)  # bp
    put(guest, regs + 128, BOTTOM + 0x10 + slide, 0x10, 0x202, STACK + 0x800, 0x18)  # the iret frame
    return Registers(A_LEAF + 4, sp, b_sp + 8)


def put(guest: FakeGuest, address: int, *words: int) -> None:
    for i, word in enumerate(words):
        guest.word(address + 8 * i, word)


def expected_frames(slide: int) -> list[int]:
    return [A_LEAF + 4, B_WORK + 0x20, CALLER + 0x10 + slide, IRQ_ENTRY + 8 + slide, BOTTOM + 0x10 + slide]


def tracked(guest: FakeGuest, layout: ModuleLayout, tables: OrcTables, at: int = A_LEAF) -> ModuleTracker:
    tracker = ModuleTracker(layout, orc=tables, orc_format=1)
    assert tracker.note(at, guest.read, guest.read_bytes, SLIDE)
    return tracker


def by_name(tracker: ModuleTracker) -> dict[str, KernelModule]:
    return {module.name: module for module in tracker.modules.values()}


@pytest.mark.parametrize("module_mem", [True, False])
def test_a_stack_through_two_modules_unwinds_into_vmlinux(module_mem: bool) -> None:
    layout = module_layout(module_mem)
    assert layout.orc == ModuleOrcLayout(count=640, ips=648, entries=656)  # btf_blob's offsets
    guest, _ = two_modules(layout)
    tables = OrcTables(table(SLIDE))
    tracker = tracked(guest, layout, tables)
    modules = by_name(tracker)
    assert all(m.orc is not None and m.orc_problem == "" for m in modules.values()), modules
    assert tables.module_count == 2
    start = module_stack(guest, SLIDE)
    result = OrcUnwinder(tables).unwind(start, guest.read)
    assert list(result.frames) == expected_frames(SLIDE)
    assert result.stop == STOP_END and result.unwinder == "orc"
    # without the modules' tables the same stack stops at its first frame
    alone = OrcUnwinder(OrcTables(table(SLIDE))).unwind(start, guest.read)
    assert alone.frames == (A_LEAF + 4,) and alone.stop == STOP_NO_TABLE


def test_the_table_for_an_address_is_picked_at_the_boundaries() -> None:
    layout = module_layout()
    guest, _ = two_modules(layout)
    kernel = table(SLIDE)
    tables = OrcTables(kernel)
    modules = by_name(tracked(guest, layout, tables))
    a, b = modules["mod_a"].orc, modules["mod_b"].orc
    assert tables.table_for(CALLER + SLIDE) is kernel
    assert tables.table_for(A_TEXT) is a and tables.table_for(A_TEXT + A_SIZE - 1) is a
    assert tables.table_for(A_TEXT - 1) is None and tables.table_for(A_TEXT + A_SIZE) is None
    assert tables.table_for(B_TEXT) is b and tables.table_for(B_TEXT + B_SIZE) is None
    # the entry in force: the last at or below the address, the real one of two at the same ip
    assert tables.lookup(A_LEAF - 1) == tables.lookup(A_TEXT)
    assert (entry := tables.lookup(A_LEAF)) is not None and entry.sp_offset == 8
    assert (entry := tables.lookup(A_OTHER - 1)) is not None and entry.sp_offset == 8
    assert (entry := tables.lookup(A_OTHER)) is not None and entry.sp_offset == 16
    assert (entry := tables.lookup(B_WORK)) is not None and (entry.sp_reg, entry.sp_offset) == (REG_SP, 8)
    assert (entry := tables.lookup(B_WORK + 1)) is not None and entry.sp_reg == REG_BP
    assert tables.lookup(B_TEXT) is None  # below mod_b's first entry: nothing is in force
    assert tables.lookup(A_TEXT + A_SIZE) is None


def test_the_table_is_read_once_and_kept_with_the_module() -> None:
    layout = module_layout()
    guest, (a, _) = two_modules(layout)
    tables = OrcTables()
    tracker = ModuleTracker(layout, rescan_every=1, orc=tables, orc_format=2)
    assert tracker.note(A_LEAF, guest.read, guest.read_bytes, SLIDE)
    first = by_name(tracker)["mod_a"].orc
    assert first is not None and first.format_version == 2  # the kernel image's format, not guessed
    guest.word(a + IPS_AT, 0x7FFF_FFFF)  # the guest's copy changes: a known module is not read again
    assert not tracker.note(0xFFFF_FFFF_C900_0000, guest.read, guest.read_bytes, SLIDE)  # a rescan
    assert tracker.scans == 2 and by_name(tracker)["mod_a"].orc is first and tables.module_count == 2


def test_a_kernel_without_the_members_has_no_module_orc() -> None:
    layout = module_layout(module_orc=False)
    assert layout.orc is None
    guest, _ = two_modules(module_layout(), orc=True)  # tables in memory, but BTF does not say where
    tables = OrcTables(table(SLIDE))
    modules = by_name(tracked(guest, layout, tables))
    assert [m.orc for m in modules.values()] == [None, None] and tables.module_count == 0
    assert [symbol.name for symbol in modules["mod_a"].symbols] == ["a_leaf"]  # names still come
    result = OrcUnwinder(tables).unwind(module_stack(guest, SLIDE), guest.read)
    assert result.frames == (A_LEAF + 4,) and result.stop == STOP_NO_TABLE


def set_member(member: str, value: int) -> Corruption:
    def corrupt(guest: FakeGuest, orc: ModuleOrcLayout, a: int, b: int) -> None:
        guest.word(a + getattr(orc, member), value)

    return corrupt


def borrow_b_table(guest: FakeGuest, orc: ModuleOrcLayout, a: int, b: int) -> None:
    """mod_a's arch points at mod_b's arrays: sorted and readable, but about mod_b's text."""
    guest.word(a + orc.ips, b + IPS_AT)
    guest.word(a + orc.entries, b + ENTRIES_AT)
    guest.word(a + orc.count, len(B_ORC))


def unsort(guest: FakeGuest, orc: ModuleOrcLayout, a: int, b: int) -> None:
    guest.write(a + IPS_AT, build_orc(a + IPS_AT, [A_ORC[2], A_ORC[1], A_ORC[0], A_ORC[3]])[0])


HOSTILE: dict[str, tuple[Corruption, str]] = {
    "huge num_orcs": (set_member("count", 0xFFFF_FFFF), "over"),
    "num_orcs just over the cap": (set_member("count", MAX_MODULE_ORCS + 1), "over"),
    "no entries": (set_member("count", 0), "no ORC entries"),
    "more entries than are mapped": (set_member("count", 4000), "not all mapped"),
    "a user-space ip table": (set_member("ips", 0x7FFF_0000), "not kernel addresses"),
    "a null entry table": (set_member("entries", 0), "not kernel addresses"),
    "an unmapped ip table": (set_member("ips", 0xFFFF_FFFF_DEAD_0000), "not all mapped"),
    "another module's table": (borrow_b_table, "miss the text"),
    "unsorted ips": (unsort, "not sorted"),
}


@pytest.mark.parametrize("case", HOSTILE)
def test_a_hostile_table_leaves_the_module_without_orc(case: str) -> None:
    layout = module_layout()
    assert layout.orc is not None
    guest, (a, b) = two_modules(layout)
    corrupt, problem = HOSTILE[case]
    corrupt(guest, layout.orc, a, b)
    tables = OrcTables(table(SLIDE))
    modules = by_name(tracked(guest, layout, tables))
    assert modules["mod_a"].orc is None and problem in modules["mod_a"].orc_problem
    assert modules["mod_b"].orc is not None and tables.module_count == 1  # the other module keeps its own
    result = OrcUnwinder(tables).unwind(module_stack(guest, SLIDE), guest.read)
    assert result.frames == (A_LEAF + 4,) and result.stop == STOP_NO_TABLE


def test_an_unreadable_struct_module_is_a_table_error() -> None:
    layout = module_layout()
    assert layout.orc is not None
    with pytest.raises(KernelTableError, match="unreadable"):
        read_module_orc(lambda _: None, lambda *_: None, layout.orc, MODULE_AREA, (A_TEXT, A_TEXT + A_SIZE))


def test_a_reloaded_module_replaces_the_range_it_overlaps() -> None:
    layout = module_layout()
    guest, _ = two_modules(layout)
    tables = OrcTables()
    modules = by_name(tracked(guest, layout, tables))
    a, b = modules["mod_a"].orc, modules["mod_b"].orc
    assert a is not None and b is not None
    tables.add_module(A_TEXT + 0x1000, A_TEXT + 0x5000, b)  # a module loaded where mod_a was
    assert tables.module_count == 2
    assert tables.table_for(A_TEXT) is None and tables.table_for(A_TEXT + 0x1000) is b
    assert tables.table_for(B_TEXT) is b


# --- through a vCPU's unwinder chooser, on guest RAM behind page tables --------------------------


def guest_ram(guest: FakeGuest) -> tuple[GuestMemory, PagingMode]:
    """Every page of ``guest`` (list head, structs, ORC arrays, stack) in guest RAM behind the rig's
    kernel page tables, a 2 MiB page for each 2 MiB ``guest`` touches; the paging mode to read it."""
    regions = sorted({page >> 9 for page in guest.pages})
    memory = GuestMemory.for_size(FIRST_PHYSICAL + (len(regions) << 21))
    map_running_kernel(memory)  # the kernel PGD, its top PDPT and the PD of the image's GiB
    directories = {((KERNEL_BASE + RIG_SLIDE) >> 30) & 0x1FF: PD}
    physical = {}
    for number, region in enumerate(regions):
        address = region << 21
        assert address >> 30 >= 0x3FFFFFFFE, hex(address)  # the top 2 GiB: the rig's PDPT
        gib = (address >> 30) & 0x1FF
        if gib not in directories:
            directories[gib] = SPARE_PD + 0x1000 * len(directories)
            memory.write_u64(PDPT + gib * 8, directories[gib] | 3)
        physical[region] = FIRST_PHYSICAL + (number << 21)
        memory.write_u64(directories[gib] + ((address >> 21) & 0x1FF) * 8, physical[region] | 0x83)
    for page in guest.pages:
        data = guest.read_bytes(page << 12, 0x1000)
        assert data is not None
        memory.write(physical[page >> 9] + ((page << 12) & 0x1F_FFFF), data)
    return memory, PagingMode.from_sregs(kernel_sregs())


def chooser_unwind(
    memory: GuestMemory, mode: PagingMode, tables: OrcTables, start: Registers
) -> UnwindResult:
    chooser = UnwinderChooser(memory)
    chooser.set_kernel_orc(tables)
    return chooser.unwind(start, mode)


def test_the_chooser_unwinds_a_sample_in_module_code_with_the_module_table() -> None:
    layout = module_layout()
    guest, _ = two_modules(layout)
    start = module_stack(guest, SLIDE)
    memory, mode = guest_ram(guest)
    try:

        def read_bytes(address: int, length: int) -> bytes | None:
            try:
                return read_virtual(memory, mode, address, length)
            except GuestMemoryError:
                return None

        def read(address: int) -> int | None:
            data = read_bytes(address, 8)
            return None if data is None else int.from_bytes(data, "little")

        tables = OrcTables(table(SLIDE))
        before = chooser_unwind(memory, mode, tables, start)
        assert before.unwinder == "fp"  # no table covers the sampled ip yet: frame pointers
        tracker = ModuleTracker(layout, orc=tables, orc_format=1)
        assert tracker.note(start.ip, read, read_bytes, SLIDE)
        result = chooser_unwind(memory, mode, tables, start)
        assert result.unwinder == "orc" and result.stop == STOP_END
        assert list(result.frames) == expected_frames(SLIDE)
    finally:
        memory.close()


# --- through the recorder: a sample finds the module, then unwinds with its table ----------------


@dataclass
class SampledRunner(FakeRunner):
    """A stopped vCPU at CPL 0 whose registers are ``regs``, on the rig's kernel page tables."""

    regs: s.kvm_regs = field(default_factory=s.kvm_regs)

    def registers(self) -> tuple[s.kvm_regs, s.kvm_sregs]:
        return self.regs, kernel_sregs()


def stock_kernel_image(monkeypatch: pytest.MonkeyPatch) -> None:
    """What KernelProfileInfo.load reads of a vmlinux: kallsyms in its bytes, ORC and BTF sections."""
    functions = [(f"func_{i}", "T", KERNEL_BASE + 0x400 * i) for i in range(40)]
    names = [("_text", "T", KERNEL_BASE), *functions, ("_etext", "T", KERNEL_BASE + 0x10000)]
    data = bytearray(build_kallsyms([*names, ("modules", "D", MODULES_HEAD)]))
    ips, unwind = build_orc(ORC_SECTION, ORC_ENTRIES)
    sections = {}
    for name, body, address in (
        (".orc_unwind_ip", ips, ORC_SECTION),
        (".orc_unwind", unwind, 0),
        (".BTF", kernel_types()[0], 0),
    ):
        sections[name] = Section(address, len(data), len(body))
        data += body
    image = KernelImage("vmlinux", bytes(data), sections, [])
    monkeypatch.setattr(context, "load_kernel_image", lambda path: image)


@pytest.mark.parametrize("sampled", ["module code", "kernel code called from a module"])
def test_the_recorder_finds_a_module_and_unwinds_through_it(
    monkeypatch: pytest.MonkeyPatch, sampled: str
) -> None:
    stock_kernel_image(monkeypatch)
    layout = module_layout()
    guest, _ = two_modules(layout)
    start = module_stack(guest, SLIDE)
    frames = expected_frames(SLIDE)
    if sampled != "module code":  # vmlinux's frameless LEAF was called from b_work instead of a_leaf
        start.ip = frames[0] = LEAF + 4 + SLIDE
    memory, _ = guest_ram(guest)
    try:
        runner = SampledRunner(FakeVcpu(0), regs=s.kvm_regs(rip=start.ip, rsp=start.sp, rbp=start.bp))
        machine = finished_machine(memory, runner.vcpu)
        machine.runners = [runner]
        recorder = ProfileRecorder(machine, frequency_hz=0, kernel_image=Path("vmlinux"))  # type: ignore[arg-type]
        assert recorder.kernel is not None and recorder.modules is not None
        recorder.kernel.slide = SLIDE  # as _find_slide leaves it
        assert recorder.orc_tables is not None
        recorder.orc_tables.set_kernel(recorder.kernel.orc_table())
        sample = recorder._take_sample(runner, 0, ORIGIN_EXIT)  # type: ignore[arg-type]
        assert sample is not None and sample.unwinder == "orc"
        assert list(sample.stack) == frames
        assert recorder.modules.scans == 1 and recorder.orc_tables.module_count == 2
        recorder._task_statistics(recorder.kernel)  # the module lines of the profile's metadata
        assert recorder.profile.metadata.extra["modules.with_orc"] == "2"
    finally:
        memory.close()
