"""The guest's symbol tables for a finished (or crashing) machine, from every source vmscope has:
``--symbols`` files, the guest image's own ELF symbols, and for a stock Linux kernel without them
the kernel's kallsyms, read from its image and placed at the KASLR slide found in the guest.

``record``, ``stat`` and the crash report of ``run`` all name guest addresses through
:func:`guest_symbol_tables`. The slide is found in guest memory (IDT gates, MSR_LSTAR, the code
bytes of a few functions), so a kernel image must be placed before ``machine.close()``.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from vmscope.errors import GuestMemoryError, VmscopeError
from vmscope.memory.paging import PagingMode, read_virtual
from vmscope.symbols import SymbolTable, load_symbol_file

if TYPE_CHECKING:
    from vmscope.kvm.vcpu import Vcpu
    from vmscope.loader.base import LoadedGuest
    from vmscope.profiler.kernel.context import KernelProfileInfo
    from vmscope.vmm.machine import Machine

log = logging.getLogger("vmscope.profiler.symbols")

#: PTI's user PGD is the kernel PGD + 4 KiB and maps little of the kernel (not its text)
_PTI_USER_PGD = 0x1000


def stock_kernel_image(kernel: Path | None, guest: LoadedGuest | None) -> Path | None:
    """A Linux image whose own kallsyms/ORC tables name its code: any bzImage, and a PVH vmlinux
    without an ELF symbol table (distribution kernels ship them stripped)."""
    if kernel is None or guest is None:
        return None
    if guest.kind.startswith("bzImage"):
        return kernel
    if guest.kind == "PVH ELF":
        from vmscope.symbols import load_elf_symbols

        try:
            load_elf_symbols(kernel)
        except VmscopeError:
            return kernel
    return None


def guest_symbol_tables(
    machine: Machine,
    symbol_files: Sequence[Path] = (),
    kernel: KernelProfileInfo | Path | None = None,
) -> list[SymbolTable]:
    """Symbol tables at run-time addresses for the guest ``machine`` ran.

    ``symbol_files`` (``--symbols``) win: given any, the kernel's own tables are not used, and an
    unreadable one raises (the user named it). Otherwise ``kernel`` adds a stock kernel's kallsyms:
    a :class:`KernelProfileInfo` the recorder loaded (placed during the run, or now), or an image
    path (see :func:`stock_kernel_image`) read now. Its table is left out, with one debug line,
    unless the slide is found: names at unslid addresses would be wrong under KASLR. Without a
    kernel the guest image's own symbols come first; an image without any is skipped.
    """
    tables: list[SymbolTable] = []
    if symbol_files:
        kernel = None  # --symbols overrides kallsyms
    if isinstance(kernel, Path):
        kernel = _load_kernel(kernel)
    if kernel is not None:
        if kernel.slide is None:
            place_kernel(kernel, machine)
        if kernel.slide is not None:
            tables.append(kernel.symbol_table())
        else:
            log.debug("%s: kernel symbols left out: no KASLR slide found in the guest", kernel.image.path)
    elif machine.guest is not None and machine.guest.symbol_file is not None:
        image = machine.guest.symbol_file
        if image not in symbol_files:
            try:
                tables.extend(load_symbol_file(image))
            except VmscopeError as error:  # a stripped image names nothing; the run stands
                log.debug("no symbols from the guest image: %s", error)
    for path in dict.fromkeys(symbol_files):
        tables.extend(load_symbol_file(path))
    return tables


def _load_kernel(image: Path) -> KernelProfileInfo | None:
    from vmscope.profiler.kernel.context import KernelProfileInfo

    try:
        return KernelProfileInfo.load(image, symbols_only=True)
    except VmscopeError as error:  # not a Linux image with kallsyms: addresses stay unnamed
        log.debug("no kallsyms in %s: %s", image, error)
        return None


def find_kernel_slide(
    kernel: KernelProfileInfo, vcpu: Vcpu, idt_base: int, read: Callable[[int], int | None]
) -> int | None:
    """Try to place ``kernel`` from one vCPU's state: MSR_LSTAR (an ioctl: call on the vCPU's own
    thread, or once it has stopped running) and its IDT, read with ``read`` (8-byte words)."""
    from vmscope.profiler.kernel.kaslr import MSR_LSTAR

    try:
        lstar: int | None = vcpu.get_msrs([MSR_LSTAR]).get(MSR_LSTAR)
    except VmscopeError:
        lstar = None  # the IDT alone can place it
    return kernel.find_slide(read, lstar, idt_base)


def place_kernel(kernel: KernelProfileInfo, machine: Machine) -> bool:
    """Find ``kernel``'s slide in the state of the vCPUs that may be asked now (see
    :func:`_idle_vcpus`); True once placed."""
    for vcpu in _idle_vcpus(machine):
        try:
            sregs = vcpu.get_sregs()
        except VmscopeError:
            continue
        mode = PagingMode.from_sregs(sregs)
        if not (mode.enabled and mode.long_mode):
            continue  # still in the boot loader or the decompressor: no kernel IDT yet
        modes = [mode]
        kernel_mode = pti_kernel_paging(mode, sregs.cs.selector & 3)
        if kernel_mode is not None:
            modes.append(kernel_mode)
        for paging in modes:
            if find_kernel_slide(kernel, vcpu, sregs.idt.base, _word_reader(machine, paging)) is not None:
                return True
    return False


def pti_kernel_paging(mode: PagingMode, cpl: int) -> PagingMode | None:
    """The kernel PGD's paging for a user-mode vCPU on page-table isolation's user PGD (which maps
    no per-CPU data and no kernel text), else None."""
    if cpl == 3 and mode.cr3 & _PTI_USER_PGD:
        return replace(mode, cr3=mode.cr3 & ~(_PTI_USER_PGD | 0xFFF))
    return None


def _idle_vcpus(machine: Machine) -> Iterable[Vcpu]:
    """vCPUs whose registers can be read without waiting: the caller's own (a crash report) and
    those whose thread has ended or never started. A vCPU ioctl waits while another thread holds
    the vCPU in KVM_RUN, which a halted guest may never leave."""
    current = threading.current_thread()
    for runner in machine.runners:
        if runner.thread is None or runner.thread is current or runner.exited.is_set():
            yield runner.vcpu


def _word_reader(machine: Machine, mode: PagingMode) -> Callable[[int], int | None]:
    def read(address: int) -> int | None:
        try:
            return int.from_bytes(read_virtual(machine.memory, mode, address, 8), "little")
        except GuestMemoryError:
            return None

    return read
