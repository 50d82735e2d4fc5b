"""Naming guest addresses after a run: a stock kernel without symbols is named from its own kallsyms
at the KASLR slide found in the stopped guest, by ``vmscope stat`` and by run's crash report."""

from __future__ import annotations

import argparse
import io
import logging
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.unit.kernel_tables import KERNEL_BASE
from tests.unit.rigs.stock_kernel import (
    FUNCTIONS,
    SLIDE,
    TEXT_PHYSICAL,
    WRMSR_RIP,
    FakeVcpu,
    finished_machine,
    kernel_sregs,
    map_running_kernel,
    text_bytes,
    write_vmlinux,
)
from vmscope.cli.run import symbolizer_for
from vmscope.cli.stat import finished_profile
from vmscope.kvm import structs as s
from vmscope.memory.guest_memory import GuestMemory
from vmscope.profiler.report import make_console, render_emulated
from vmscope.vmm.crash import build_crash_report

LAYOUTS = [
    pytest.param({"order": "old"}, id="offsets+relative_base"),
    pytest.param({"order": "new", "seqs": True, "marker_size": 4}, id="6.4+"),
    pytest.param({"order": "old", "relative": False}, id="absolute-addresses"),
]
LOGGER = "vmscope.profiler.symbols"


@pytest.fixture
def guest_ram() -> Iterator[GuestMemory]:
    memory = GuestMemory.for_size(8 << 20)
    map_running_kernel(memory)
    yield memory
    memory.close()


def stat_table(machine: object, kernel: Path, symbols: list[Path] | None = None) -> str:
    """What ``vmscope stat`` prints as its emulated table for ``machine`` after the run."""
    args = argparse.Namespace(kernel=kernel, symbols=symbols or [])
    profile = finished_profile(machine, args, 1.0)  # type: ignore[arg-type]
    stream = io.StringIO()
    render_emulated(profile, make_console(stream, width=200), None, False)
    return stream.getvalue()


def wrmsr_row(table: str) -> list[str]:
    rows = [line.replace("|", " ").split() for line in table.splitlines() if "wrmsr" in line]
    assert len(rows) == 1, table
    return rows[0]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_stat_names_the_function_of_a_kallsyms_only_kernel_at_its_slide(
    tmp_path: Path, guest_ram: GuestMemory, layout: dict[str, object]
) -> None:
    vmlinux = write_vmlinux(tmp_path, layout)
    row = wrmsr_row(stat_table(finished_machine(guest_ram), vmlinux))
    assert row[:3] == ["wrmsr", f"{WRMSR_RIP:#x}", "native_write_msr+0x5"]
    assert row[3] == "7"


def test_the_idt_alone_places_the_kernel_when_lstar_cannot_be_read(
    tmp_path: Path, guest_ram: GuestMemory
) -> None:
    machine = finished_machine(guest_ram, FakeVcpu(0, lstar=None))
    assert wrmsr_row(stat_table(machine, write_vmlinux(tmp_path)))[2] == "native_write_msr+0x5"


def test_a_vcpu_stopped_in_user_mode_is_read_through_the_kernel_page_tables(
    tmp_path: Path, guest_ram: GuestMemory
) -> None:
    # PTI: the user PGD (CR3 of a CPL 3 vCPU) maps neither the IDT nor the code the slide is checked on
    machine = finished_machine(guest_ram, FakeVcpu(0, kernel_sregs(user_mode=True)))
    assert wrmsr_row(stat_table(machine, write_vmlinux(tmp_path)))[2] == "native_write_msr+0x5"


def test_symbols_files_win_over_kallsyms(tmp_path: Path, guest_ram: GuestMemory) -> None:
    system_map = tmp_path / "System.map"
    system_map.write_text(f"{WRMSR_RIP - 1:016x} T from_the_map\n{WRMSR_RIP + 0x100:016x} T after_it\n")
    table = stat_table(finished_machine(guest_ram), write_vmlinux(tmp_path), [system_map])
    assert wrmsr_row(table)[2] == "from_the_map+0x1"


@pytest.mark.parametrize(
    ("kallsyms", "guest_text", "why"),
    [
        pytest.param(False, None, "no kallsyms in", id="image-without-kallsyms"),
        pytest.param(True, bytes(len(text_bytes())), "no KASLR slide found", id="code-does-not-match"),
    ],
)
def test_without_kallsyms_or_a_slide_the_address_stays_unnamed_with_one_debug_line(
    tmp_path: Path,
    guest_ram: GuestMemory,
    caplog: pytest.LogCaptureFixture,
    kallsyms: bool,
    guest_text: bytes | None,
    why: str,
) -> None:
    if guest_text is not None:  # another kernel's code at the candidate slide: not confirmed, not used
        map_running_kernel(guest_ram, guest_text)
    with caplog.at_level(logging.DEBUG, logger=LOGGER):
        row = wrmsr_row(stat_table(finished_machine(guest_ram), write_vmlinux(tmp_path, kallsyms=kallsyms)))
    assert row[:3] == ["wrmsr", f"{WRMSR_RIP:#x}", "-"]
    messages = [record.getMessage() for record in caplog.records if record.name == LOGGER]
    assert len(messages) == 1 and why in messages[0], messages


def test_a_vcpu_another_thread_still_runs_is_not_asked(tmp_path: Path, guest_ram: GuestMemory) -> None:
    machine = finished_machine(guest_ram, FakeVcpu(0, running=True))
    runner = machine.runners[0]
    release = threading.Event()
    runner.thread = threading.Thread(target=release.wait)
    runner.thread.start()
    runner.exited.clear()
    try:
        row = wrmsr_row(stat_table(machine, write_vmlinux(tmp_path)))
    finally:
        release.set()
        runner.thread.join()
    assert row[2] == "-"


def test_a_crash_report_names_the_kernel_function_from_the_crashing_vcpus_thread(
    tmp_path: Path, guest_ram: GuestMemory
) -> None:
    machine = finished_machine(guest_ram)
    runner = machine.runners[0]
    runner.exited.clear()  # still running: the report is built on its own thread, which may ask it
    runner.thread = threading.current_thread()
    symbolize = symbolizer_for(machine, [], write_vmlinux(tmp_path))  # type: ignore[arg-type]
    regs = s.kvm_regs()
    regs.rip = WRMSR_RIP
    sregs = kernel_sregs()
    report = build_crash_report(0, "emulation failure", regs, sregs, guest_ram, symbolize=symbolize)
    assert report.symbol == "native_write_msr+0x5"
    assert "in native_write_msr+0x5" in report.format()
    # the text the report disassembled is the guest's own, at the slid address
    offset = FUNCTIONS["native_write_msr"] + 5
    assert report.instruction_bytes == guest_ram.read(TEXT_PHYSICAL + offset, len(report.instruction_bytes))
    assert KERNEL_BASE + SLIDE + offset == WRMSR_RIP
