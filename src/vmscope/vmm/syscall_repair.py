"""Completing the SYSCALL and SYSRET transitions a kvm_pvm host gets wrong (see emulate.syscall).

A user-mode ``syscall`` of a guest on such a host reaches the kernel as a #PF on the kernel's
entry address, taken at CPL3. The guest kernel's page-fault entry then runs at CPL0, and on a
SMAP kernel its first instruction (``clac``) is one KVM cannot emulate there, so it reaches
the fallback emulator before the kernel has done anything with the fault: that is where
:meth:`SyscallRepair.repair_failed_syscall` recognises the frame and loads the state SYSCALL
should have produced instead (CPL0, the kernel's CS/SS from IA32_STAR, RIP = IA32_LSTAR,
RFLAGS masked by IA32_FMASK, the user's RSP), abandoning the #PF. Any instruction the host
fails to emulate at the page-fault entry works the same way; a guest whose entry the host
emulates completely is not repaired (the fault is not visible to the VMM).

SYSRET at CPL0, where the host's emulator fails on it, is completed the same way.
"""

from __future__ import annotations

from typing import Protocol

from vmscope.emulate import ControlState, MemoryFault, UnsupportedAccess
from vmscope.emulate.syscall import (
    FRAME_WITH_ERROR_CODE_SIZE,
    MSR_LSTAR,
    MSR_STAR,
    MSR_SYSCALL_MASK,
    SYSCALL_MSRS,
    ExceptionFrame,
    ModeSwitch,
    Segment,
    SyscallMsrs,
    failed_syscall,
    syscall_entry,
    sysret,
)
from vmscope.kvm import Vcpu
from vmscope.kvm import constants as c
from vmscope.kvm import structs as s

_EFER_SCE = 1
_SYSRET_64 = b"\x48\x0f\x07"
_SYSRET_32 = b"\x0f\x07"


class RepairAccess(Protocol):
    """What a repair needs of a vCPU stopped at an emulation failure (vmm.fallback.KvmCpuAccess)."""

    control: ControlState
    regs: s.kvm_regs
    sregs: s.kvm_sregs
    #: registers live in the kvm_run sync area (written back by marking them dirty)
    synced: bool

    def read_memory(self, linear: int, size: int) -> bytes: ...


def load_segment(target: s.kvm_segment, segment: Segment) -> None:
    target.selector = segment.selector
    target.base = 0
    target.limit = 0xFFFF_FFFF
    target.type = segment.type
    target.present = 1
    target.dpl = segment.dpl
    target.db = int(segment.default_big)
    target.s = 1
    target.l = int(segment.code and segment.long_mode)
    target.g = 1
    target.avl = 0
    target.unusable = 0


class SyscallRepair:
    """Per machine; the vCPU methods run on that vCPU's thread."""

    def __init__(self) -> None:
        self._msrs: dict[int, SyscallMsrs] = {}
        #: guest rips of the page-fault entry instructions a repair was found at: once one is
        #: known, only emulation failures there need the stack frame read
        self._entry_rips: set[int] = set()
        self.repaired_syscalls = 0
        self.completed_sysrets = 0

    def _read_msrs(self, vcpu: Vcpu) -> SyscallMsrs:
        values = vcpu.get_msrs(SYSCALL_MSRS)
        msrs = SyscallMsrs(values.get(MSR_STAR, 0), values.get(MSR_LSTAR, 0), values.get(MSR_SYSCALL_MASK, 0))
        self._msrs[vcpu.id] = msrs
        return msrs

    def _msrs_for(self, vcpu: Vcpu) -> SyscallMsrs:
        cached = self._msrs.get(vcpu.id)
        return cached if cached is not None else self._read_msrs(vcpu)

    def repair_failed_syscall(self, vcpu: Vcpu, access: RepairAccess) -> int | None:
        """Turn a failed syscall's #PF into the syscall it should have been; returns the user
        address of the syscall instruction when it did, None when this is no such fault."""
        control = access.control
        if control.cpl != 0 or control.code_bits != 64:
            return None
        regs = access.regs
        if self._entry_rips and regs.rip not in self._entry_rips:
            return None
        try:
            frame = ExceptionFrame.unpack(access.read_memory(regs.rsp, FRAME_WITH_ERROR_CODE_SIZE))
        except (MemoryFault, UnsupportedAccess):
            return None
        if frame.cs & 3 != 3 or frame.rip != control.cr2:
            return None
        msrs = self._msrs_for(vcpu)
        if not failed_syscall(frame, control.cr2, msrs):
            msrs = self._read_msrs(vcpu)  # the kernel may have moved its entry since we looked
            if not failed_syscall(frame, control.cr2, msrs):
                return None
        self._entry_rips.add(regs.rip)
        self._load(vcpu, access, syscall_entry(frame, msrs))
        self.repaired_syscalls += 1
        return (int(regs.rcx) - 2) & 0xFFFF_FFFF_FFFF_FFFF  # rcx: the address after the 2-byte syscall

    def complete_sysret(self, vcpu: Vcpu, access: RepairAccess, code: bytes) -> ModeSwitch | None:
        """Execute the SYSRET at rip (where the host's emulator failed on it). None: not a
        SYSRET this can complete here (the caller reports it as before)."""
        control = access.control
        to_64_bit = code.startswith(_SYSRET_64)
        if not (to_64_bit or code.startswith(_SYSRET_32)) or control.cpl != 0 or not control.efer & _EFER_SCE:
            return None
        regs = access.regs
        switch = sysret(regs.rcx, regs.r11, regs.rsp, self._msrs_for(vcpu), to_64_bit=to_64_bit)
        if switch is None:
            return None  # #GP(0) on a non-canonical return address: leave it to the report
        self._load(vcpu, access, switch)
        self.completed_sysrets += 1
        return switch

    @staticmethod
    def _load(vcpu: Vcpu, access: RepairAccess, switch: ModeSwitch) -> None:
        regs, sregs = access.regs, access.sregs
        regs.rip, regs.rsp, regs.rflags = switch.rip, switch.rsp, switch.rflags
        load_segment(sregs.cs, switch.cs)
        load_segment(sregs.ss, switch.ss)
        if access.synced:
            vcpu.mark_synced_regs_dirty(c.SYNC_X86_REGS | c.SYNC_X86_SREGS)
        else:
            vcpu.set_sregs(sregs)
            vcpu.set_regs(regs)
