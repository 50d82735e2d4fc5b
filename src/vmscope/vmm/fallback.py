"""Finishing in the VMM the instructions the host's KVM cannot emulate.

On a KVM_EXIT_INTERNAL_ERROR with suberror 1 (emulation failure) the exit loop hands the
vCPU to :meth:`FallbackEmulator.complete`: the instruction's bytes come from kvm_run when
KVM supplied them (KVM_CAP_EXIT_ON_EMULATION_FAILURE), else from guest memory through the
guest's page tables; vmscope.emulate completes it on a :class:`KvmCpuAccess`, whose register
writes go back through the kvm_run sync area (or KVM_SET_REGS), the FPU state through
KVM_SET_XSAVE and exceptions through KVM_SET_VCPU_EVENTS. Each completed instruction is
counted per (vCPU, mnemonic, guest rip) with the time spent completing it.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from vmscope.emulate import (
    DEFAULT_XSTATE_LAYOUT,
    Completed,
    ControlState,
    MemoryFault,
    RaiseException,
    Unsupported,
    UnsupportedAccess,
    XstateComponent,
    emulate,
)
from vmscope.emulate.outcome import PF
from vmscope.errors import GuestMemoryError, KvmError, PageFault
from vmscope.kvm import Vcpu
from vmscope.kvm import constants as c
from vmscope.kvm import structs as s
from vmscope.memory.guest_memory import GuestMemory
from vmscope.memory.paging import PagingMode, read_virtual, translate_access
from vmscope.vmm.syscall_repair import SyscallRepair

log = logging.getLogger("vmscope.fallback")

_SEGMENTS = ("cs", "ds", "es", "fs", "gs", "ss")
_DEFAULT_XCR0 = 0b111  # x87, SSE, AVX


@dataclass
class FallbackCount:
    """Completions of one instruction at one guest address on one vCPU."""

    vcpu: int
    mnemonic: str
    rip: int
    count: int = 0
    total_ns: int = 0


def xstate_from_cpuid(entries: Sequence[s.kvm_cpuid_entry2]) -> tuple[int, dict[int, XstateComponent]]:
    """Supported XCR0 bits and extended-component layout from CPUID leaf 0xD, with the
    x87/SSE/AVX defaults where the table has no leaf 0xD (KVM on PVM hosts lists none)."""
    supported = 0
    layout: dict[int, XstateComponent] = {}
    for entry in entries:
        if entry.function != 0xD:
            continue
        if entry.index == 0:
            supported = entry.eax | entry.edx << 32
        elif 2 <= entry.index < 63 and entry.eax:
            layout[entry.index] = XstateComponent(entry.ebx, entry.eax, bool(entry.ecx & 2))
    if not supported:
        return _DEFAULT_XCR0, dict(DEFAULT_XSTATE_LAYOUT)
    return supported, layout or dict(DEFAULT_XSTATE_LAYOUT)


_SYNCED = c.SYNC_X86_REGS | c.SYNC_X86_SREGS
_SREGS_OFFSET = s.kvm_run.s.offset + s.kvm_sync_regs.sregs.offset
_SREGS_SIZE = ctypes.sizeof(s.kvm_sregs) - ctypes.sizeof(ctypes.c_uint64 * 4)  # without the irq bitmap
_control_cache: dict[bytes, tuple[ControlState, PagingMode]] = {}


def _control_from_sregs(sregs: s.kvm_sregs) -> tuple[ControlState, PagingMode]:
    paging = PagingMode(cr0=sregs.cr0, cr3=sregs.cr3, cr4=sregs.cr4, efer=sregs.efer)
    control = ControlState(
        cr0=sregs.cr0,
        cr4=sregs.cr4,
        efer=sregs.efer,
        cs_l=bool(sregs.cs.l),
        cs_db=bool(sregs.cs.db),
        cpl=(sregs.cs.selector & 3) if sregs.cr0 & 1 else 0,
        segment_bases={name: int(getattr(sregs, name).base) for name in _SEGMENTS},
        cr2=sregs.cr2,
    )
    return control, paging


class KvmCpuAccess:
    """vmscope.emulate.CpuAccess over one KVM vCPU stopped at an emulation failure.

    State is read lazily and written back once, by :meth:`commit`, so an instruction that
    only flips a flag (clac) costs no ioctl when registers are synced through kvm_run.
    """

    def __init__(
        self,
        vcpu: Vcpu,
        memory: GuestMemory,
        lock: threading.Lock,
        supported_xcr0: int,
        layout: dict[int, XstateComponent],
    ) -> None:
        self.vcpu = vcpu
        self.memory = memory
        self.lock = lock
        self._supported_xcr0 = supported_xcr0
        self._layout = layout
        run = vcpu.run_struct
        self.synced = run.kvm_valid_regs & _SYNCED == _SYNCED
        if self.synced:
            self.regs: s.kvm_regs = run.s.regs.regs
            self.sregs: s.kvm_sregs = run.s.regs.sregs
            # the mode changes rarely: reuse the decoded control state while sregs are unchanged
            raw = bytes(vcpu.run_buffer[_SREGS_OFFSET : _SREGS_OFFSET + _SREGS_SIZE])
            cached = _control_cache.get(raw)
            if cached is None:
                cached = _control_cache[raw] = _control_from_sregs(self.sregs)
                if len(_control_cache) > 256:
                    _control_cache.clear()
        else:
            self.regs = vcpu.get_regs()
            self.sregs = vcpu.get_sregs()
            cached = _control_from_sregs(self.sregs)
        self.control, self.paging = cached
        self.regs_dirty = False
        self._xsave: bytes | None = None
        self._new_xsave: bytes | None = None
        self._new_xcr0: int | None = None

    # -- registers ------------------------------------------------------------------------

    def get_register(self, name: str) -> int:
        return int(getattr(self.regs, name))

    def set_register(self, name: str, value: int) -> None:
        setattr(self.regs, name, value)
        self.regs_dirty = True

    def control_state(self) -> ControlState:
        return self.control

    # -- memory -------------------------------------------------------------------------------

    def _physical(self, linear: int, write: bool) -> int:
        try:
            return translate_access(self.memory, self.paging, linear, write=write, user=self.control.cpl == 3)
        except PageFault as fault:
            raise MemoryFault(linear, fault.error_code) from None

    def _pieces(self, linear: int, size: int, write: bool) -> Iterator[tuple[int, int, int]]:
        """(physical address, offset in the access, length) per page touched."""
        offset = 0
        while offset < size:
            address = linear + offset
            chunk = min(size - offset, 0x1000 - (address & 0xFFF))
            yield self._physical(address, write), offset, chunk
            offset += chunk

    def read_memory(self, linear: int, size: int) -> bytes:
        pieces = list(self._pieces(linear, size, write=False))
        try:
            return b"".join(self.memory.read(gpa, length) for gpa, _, length in pieces)
        except GuestMemoryError as error:
            raise UnsupportedAccess(f"memory operand outside guest RAM (MMIO?): {error}") from None

    def check_writable(self, linear: int, size: int) -> None:
        for gpa, _, length in self._pieces(linear, size, write=True):
            if not self.memory.contains(gpa, length):
                raise UnsupportedAccess(f"memory operand at {gpa:#x} is outside guest RAM (MMIO?)")

    def write_memory(self, linear: int, data: bytes) -> None:
        pieces = list(self._pieces(linear, len(data), write=True))  # every page checked first
        try:
            for gpa, offset, length in pieces:
                self.memory.write(gpa, data[offset : offset + length])
        except GuestMemoryError as error:
            raise UnsupportedAccess(f"memory operand outside guest RAM (MMIO?): {error}") from None

    # -- extended state -----------------------------------------------------------------------

    def get_xsave(self) -> bytes:
        if self._new_xsave is not None:
            return self._new_xsave
        if self._xsave is None:
            self._xsave = self.vcpu.get_xsave()
        return self._xsave

    def set_xsave(self, image: bytes) -> None:
        self._new_xsave = image

    def get_xcr0(self) -> int:
        if self._new_xcr0 is not None:
            return self._new_xcr0
        return self.vcpu.get_xcrs().get(0, 1)

    def set_xcr0(self, value: int) -> None:
        try:
            self.vcpu.set_xcrs({0: value})
        except KvmError as error:
            raise ValueError(str(error)) from None
        self._new_xcr0 = value

    def supported_xcr0(self) -> int:
        return self._supported_xcr0

    def xstate_layout(self) -> dict[int, XstateComponent]:
        return self._layout

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        # Serializes the emulated locked read-modify-writes of every vCPU. Guest code that
        # the host runs natively is not held off by this; on this project's PVM hosts the
        # CPL0 cmpxchg16b always fails into this path, so its instances exclude each other.
        with self.lock:
            yield

    def random_bytes(self, count: int) -> bytes:
        return os.getrandom(count)

    # -- write-back -------------------------------------------------------------------------------

    def commit(self) -> None:
        if self._new_xsave is not None:
            self.vcpu.set_xsave(self._new_xsave)
        if self.regs_dirty:
            if self.synced:
                self.vcpu.mark_synced_regs_dirty(c.SYNC_X86_REGS)
            else:
                self.vcpu.set_regs(self.regs)

    def inject(self, outcome: RaiseException) -> None:
        if outcome.vector == PF and outcome.cr2 is not None:
            sregs = self.vcpu.get_sregs()
            sregs.cr2 = outcome.cr2
            self.vcpu.set_sregs(sregs)
            if self.synced:  # keep the sync area from loading the old cr2 back
                self.sregs.cr2 = outcome.cr2
        self.vcpu.inject_exception(outcome.vector, outcome.error_code)


class FallbackEmulator:
    """One per machine: completes emulation failures for its vCPUs and counts them."""

    def __init__(
        self,
        memory: GuestMemory,
        *,
        supported_xcr0: int = _DEFAULT_XCR0,
        xstate_layout: dict[int, XstateComponent] | None = None,
    ) -> None:
        self.memory = memory
        self.supported_xcr0 = supported_xcr0
        self.layout = dict(xstate_layout) if xstate_layout is not None else dict(DEFAULT_XSTATE_LAYOUT)
        #: held around emulated locked read-modify-writes (cmpxchg8b/16b) of every vCPU
        self.lock = threading.Lock()
        self._counts: dict[tuple[int, str, int], FallbackCount] = {}
        self._counts_lock = threading.Lock()
        #: vCPU id -> why the last instruction could not be completed (for the crash report)
        self.unsupported: dict[int, Unsupported] = {}
        self.exceptions_injected = 0
        #: SYSCALL/SYSRET transitions a kvm_pvm host gets wrong, completed here
        self.syscalls = SyscallRepair()

    def instruction_bytes(self, vcpu: Vcpu, access: KvmCpuAccess) -> bytes:
        """From kvm_run when KVM supplied them, else read at cs:rip through the page tables."""
        code = vcpu.emulation_failure_bytes()
        if code:
            return code
        regs, sregs = access.regs, access.sregs
        linear = regs.rip if access.control.code_bits == 64 else (sregs.cs.base + regs.rip) & 0xFFFF_FFFF
        try:
            return read_virtual(self.memory, access.paging, linear, 15)
        except GuestMemoryError:  # the instruction may end at an unmapped page: take what is there
            try:
                return read_virtual(self.memory, access.paging, linear, 0x1000 - (linear & 0xFFF))
            except GuestMemoryError:
                return b""

    def complete(self, vcpu: Vcpu) -> bool:
        """Finish the instruction ``vcpu`` stopped on. True: the vCPU can run on (completed,
        or an exception was injected); False: unsupported (see ``unsupported``)."""
        try:
            return self._complete(vcpu)
        except KvmError as error:  # an ioctl refused: report it with the crash, never raise
            self.unsupported[vcpu.id] = Unsupported("(ioctl failed)", str(error))
            return False

    def _complete(self, vcpu: Vcpu) -> bool:
        started = time.perf_counter_ns()
        access = KvmCpuAccess(vcpu, self.memory, self.lock, self.supported_xcr0, self.layout)
        code = self.instruction_bytes(vcpu, access)
        if not code:
            self.unsupported[vcpu.id] = Unsupported("(unreadable)", "the instruction bytes are not readable")
            return False
        rip = access.regs.rip
        syscall_site = self.syscalls.repair_failed_syscall(vcpu, access)
        if syscall_site is not None:
            self._count(vcpu.id, "syscall (repaired)", syscall_site, time.perf_counter_ns() - started)
            return True
        if self.syscalls.complete_sysret(vcpu, access, code) is not None:
            self._count(vcpu.id, "sysret", rip, time.perf_counter_ns() - started)
            return True
        outcome = emulate(access, code, access.control)
        if isinstance(outcome, Unsupported):
            self.unsupported[vcpu.id] = outcome
            return False
        access.commit()
        if isinstance(outcome, RaiseException):
            access.inject(outcome)
            self.exceptions_injected += 1
            log.debug("vCPU %d: %s at %#x raises %s", vcpu.id, outcome.mnemonic, rip, outcome.name)
        if not vcpu.run_struct.kvm_valid_regs & c.SYNC_X86_REGS:
            # from now on registers arrive in kvm_run: the next completion needs no ioctl
            vcpu.enable_sync_regs(c.SYNC_X86_REGS | c.SYNC_X86_SREGS)
        assert isinstance(outcome, Completed | RaiseException)
        self._count(vcpu.id, outcome.mnemonic, rip, time.perf_counter_ns() - started)
        return True

    def _count(self, vcpu_id: int, mnemonic: str, rip: int, elapsed_ns: int) -> None:
        key = (vcpu_id, mnemonic, rip)
        entry = self._counts.get(key)
        if entry is None:
            with self._counts_lock:
                entry = self._counts.setdefault(key, FallbackCount(vcpu_id, mnemonic, rip))
        entry.count += 1
        entry.total_ns += elapsed_ns

    def counts(self) -> list[FallbackCount]:
        """Snapshot, most frequent first."""
        with self._counts_lock:
            entries = list(self._counts.values())
        rows = [FallbackCount(e.vcpu, e.mnemonic, e.rip, e.count, e.total_ns) for e in entries]
        return sorted(rows, key=lambda row: (-row.count, row.vcpu, row.rip))

    @property
    def completed(self) -> int:
        """Instructions completed (and #BP traps delivered) so far, all vCPUs."""
        return sum(entry.count for entry in list(self._counts.values()))
