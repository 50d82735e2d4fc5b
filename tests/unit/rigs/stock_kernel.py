"""A stock kernel without symbols, after a run, without KVM: a vmlinux whose only names are its
kallsyms tables, its text in guest RAM at a KASLR slide behind 4-level page tables with an IDT, and
a finished machine whose vCPUs report the registers a running kernel leaves (CR3, IDT base,
MSR_LSTAR). Enough for the code that names guest addresses after a run to find the slide."""

from __future__ import annotations

import struct
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from tests.unit.kernel_tables import KERNEL_BASE, build_kallsyms
from tests.unit.rigs.elf_images import Seg, build_elf
from vmscope.arch.x86.modes import real_mode_state
from vmscope.errors import KvmError
from vmscope.kvm import structs as s
from vmscope.loader.base import LoadedGuest
from vmscope.memory.guest_memory import GuestMemory
from vmscope.profiler.kernel.kaslr import MSR_LSTAR
from vmscope.vmm.exit_stats import VcpuExitStats

#: 2 MiB aligned, as KASLR moves the kernel
SLIDE = 0x2E00_0000
TEXT_SIZE = 0x4000
#: link-time offsets in the text of the functions the rig names
FUNCTIONS = {
    "asm_exc_divide_error": 0x100,
    "asm_exc_page_fault": 0x200,
    "entry_SYSCALL_64": 0x400,
    "schedule": 0x800,
    "native_write_msr": 0x1000,
    "clear_page_erms": 0x1100,
}
#: where a wrmsr inside native_write_msr lies at run time
WRMSR_RIP = KERNEL_BASE + FUNCTIONS["native_write_msr"] + 5 + SLIDE
IDT_OFFSET = 0x10_0000  # from the run-time text: the kernel's idt_table lies in its image
KERNEL_PGD, PDPT, PD = 0x20000, 0x22000, 0x23000  # the user PGD of PTI is KERNEL_PGD + 4 KiB
TEXT_PHYSICAL = 0x40_0000
BZIMAGE_KIND = "bzImage (boot protocol 2.15, 64-bit entry)"
#: (vcpu, mnemonic, guest rip, count, total ns), as Machine.fallback_counts gives them
EmulatedRow = tuple[int, str, int, int, int]


def kernel_symbols() -> list[tuple[str, str, int]]:
    """(name, type, link-time address), sorted as kallsyms stores them."""
    symbols = [("_text", "T", KERNEL_BASE), ("_stext", "T", KERNEL_BASE)]
    symbols += [(name, "T", KERNEL_BASE + offset) for name, offset in FUNCTIONS.items()]
    symbols += [("_etext", "T", KERNEL_BASE + TEXT_SIZE), ("init_task", "D", KERNEL_BASE + 0x20_0000)]
    return symbols


def text_bytes() -> bytes:
    """Code no two functions share 16 bytes of: the slide is confirmed on code bytes."""
    return bytes((i * 151 + (i >> 8) * 7 + 3) & 0xFF for i in range(TEXT_SIZE))


def write_vmlinux(directory: Path, layout: dict[str, object] | None = None, kallsyms: bool = True) -> Path:
    """A stripped vmlinux: its text, and (``kallsyms``) tables in ``layout`` (build_kallsyms options)."""
    segments = [Seg(0x100_0000, text_bytes(), vaddr=KERNEL_BASE)]
    if kallsyms:
        tables = build_kallsyms(kernel_symbols(), **(layout or {}))  # type: ignore[arg-type]
        segments.append(Seg(0x200_0000, tables, vaddr=KERNEL_BASE + 0x100_0000))
    path = directory / "vmlinux"
    path.write_bytes(build_elf(segments, entry=0x100_0000))
    return path


def gate(handler: int) -> bytes:
    """A present 64-bit interrupt gate."""
    return struct.pack(
        "<HHBBHII", handler & 0xFFFF, 0x10, 0, 0x8E, (handler >> 16) & 0xFFFF, handler >> 32, 0
    )  # fmt: skip


def map_running_kernel(memory: GuestMemory, text: bytes | None = None) -> None:
    """The text at KERNEL_BASE + SLIDE (one 2 MiB page) with an IDT after it; PTI's user PGD
    (KERNEL_PGD + 4 KiB) maps none of it."""
    runtime = KERNEL_BASE + SLIDE
    memory.write_u64(KERNEL_PGD + ((runtime >> 39) & 0x1FF) * 8, PDPT | 3)
    memory.write_u64(PDPT + ((runtime >> 30) & 0x1FF) * 8, PD | 3)
    memory.write_u64(PD + ((runtime >> 21) & 0x1FF) * 8, TEXT_PHYSICAL | 0x83)  # a 2 MiB page
    memory.write(TEXT_PHYSICAL, text_bytes() if text is None else text)
    idt = bytearray(16 * 32)
    for vector, name in ((0, "asm_exc_divide_error"), (14, "asm_exc_page_fault")):
        idt[16 * vector : 16 * vector + 16] = gate(KERNEL_BASE + FUNCTIONS[name] + SLIDE)
    memory.write(TEXT_PHYSICAL + IDT_OFFSET, bytes(idt))


def kernel_sregs(user_mode: bool = False) -> s.kvm_sregs:
    """64-bit paging on the kernel PGD at CPL 0, or (``user_mode``) on PTI's user PGD at CPL 3."""
    sregs = s.kvm_sregs()
    sregs.cr0, sregs.cr4, sregs.efer = 0x8000_0011, 0x20, 0x500  # PE|ET|PG, PAE, LME|LMA
    sregs.cr3 = KERNEL_PGD + (0x1000 if user_mode else 0)
    sregs.cs.selector = 0x33 if user_mode else 0x10
    sregs.cs.l = 1
    sregs.idt.base = KERNEL_BASE + SLIDE + IDT_OFFSET
    sregs.idt.limit = 16 * 32 - 1
    return sregs


@dataclass
class FakeVcpu:
    """Answers the register ioctls of a stopped vCPU; ``running`` ones must not be asked at all."""

    id: int
    sregs: s.kvm_sregs = field(default_factory=kernel_sregs)
    lstar: int | None = KERNEL_BASE + FUNCTIONS["entry_SYSCALL_64"] + SLIDE
    running: bool = False

    def get_sregs(self) -> s.kvm_sregs:
        assert not self.running, "asked a vCPU another thread holds in KVM_RUN"
        return self.sregs

    def get_msrs(self, indices: Iterable[int]) -> dict[int, int]:
        assert not self.running, "asked a vCPU another thread holds in KVM_RUN"
        if self.lstar is None:
            raise KvmError("KVM_GET_MSRS failed")
        return {MSR_LSTAR: self.lstar} if MSR_LSTAR in indices else {}


@dataclass
class FakeRunner:
    vcpu: FakeVcpu
    thread: threading.Thread | None = None
    exited: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self.stats = VcpuExitStats(self.vcpu.id)


@dataclass
class FakeKvm:
    backend: str = "kvm_pvm"


class FinishedMachine:
    """What ``vmscope stat`` reads of a machine whose run ended: exit accounting (empty), the
    fallback emulator's completions, the guest, its memory and its stopped vCPUs."""

    def __init__(self, memory: GuestMemory, runners: list[FakeRunner], emulated: list[EmulatedRow]) -> None:
        self.memory = memory
        self.runners = runners
        self.cpu_count = len(runners)
        self.kvm = FakeKvm()
        self.guest = LoadedGuest(real_mode_state(0), kind=BZIMAGE_KIND)
        self._emulated = emulated

    def fallback_counts(self) -> list[EmulatedRow]:
        return list(self._emulated)

    def unclaimed_counts(self) -> list[object]:
        return []

    def kvm_stats(self) -> dict[str, dict[str, int | list[int]]]:
        return {}

    def device_name_at(self, bus: str, address: int) -> str | None:
        return None


def finished_machine(memory: GuestMemory, vcpu: FakeVcpu | None = None) -> FinishedMachine:
    """One stopped vCPU (its thread ended) that completed 7 wrmsr at WRMSR_RIP."""
    runner = FakeRunner(vcpu or FakeVcpu(0))
    runner.exited.set()
    return FinishedMachine(memory, [runner], [(0, "wrmsr", WRMSR_RIP, 7, 7000)])
