"""A KVM virtual CPU: the kvm_run shared page, KVM_RUN, and register access.

On this project's reference hosts every vCPU ioctl costs microseconds, so the exit loop
reads registers from the kvm_run page through KVM_CAP_SYNC_REGS instead of KVM_GET_REGS;
the ioctl accessors here are for setup and for a paused VM.
"""

from __future__ import annotations

import ctypes
import fcntl
import functools
import mmap
import os
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING

from vmscope.kvm import constants as c
from vmscope.kvm import structs as s
from vmscope.kvm._ioctl import ioctl
from vmscope.kvm.coalesced import CoalescedRing, ring_offset
from vmscope.kvm.exits import emulation_failure_bytes

if TYPE_CHECKING:
    from vmscope.kvm.vm import Vm


class Vcpu:
    """One vCPU file descriptor with its mmap'd kvm_run structure."""

    def __init__(self, vm: Vm, vcpu_id: int, fd: int) -> None:
        self.vm = vm
        self.id = vcpu_id
        self.fd = fd
        #: the shared kvm_run page(s); the exit loop unpacks fields from it directly
        self.run_buffer = mmap.mmap(
            fd, vm.kvm.vcpu_mmap_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE
        )
        #: a typed view of the same memory, for the less hot paths
        self.run_struct = s.kvm_run.from_buffer(self.run_buffer)
        #: KVM_RUN as a ready-made C-level callable: the exit loop calls it with no Python frame
        #: in between; it returns 0 or raises OSError (InterruptedError when a signal kicked it)
        self.kvm_run: Callable[[], int] = functools.partial(fcntl.ioctl, fd, c.KVM_RUN, 0)

    # -- running ------------------------------------------------------------------------

    def run(self) -> int:
        """KVM_RUN once; returns the exit reason (raises InterruptedError on a signal kick)."""
        self.kvm_run()
        return int(self.run_struct.exit_reason)

    def set_immediate_exit(self, value: bool) -> None:
        self.run_struct.immediate_exit = int(value)

    def enable_sync_regs(self, mask: int = c.SYNC_X86_REGS | c.SYNC_X86_SREGS) -> None:
        """Ask KVM to copy these register sets into kvm_run on every exit."""
        self.run_struct.kvm_valid_regs = mask

    @property
    def synced_regs(self) -> s.kvm_regs:
        """General registers as of the last exit (needs enable_sync_regs)."""
        regs: s.kvm_regs = self.run_struct.s.regs.regs
        return regs

    @property
    def synced_sregs(self) -> s.kvm_sregs:
        """Special registers as of the last exit (needs enable_sync_regs with SREGS)."""
        sregs: s.kvm_sregs = self.run_struct.s.regs.sregs
        return sregs

    def mark_synced_regs_dirty(self, mask: int = c.SYNC_X86_REGS) -> None:
        """Have the next KVM_RUN load the register sets edited in synced_regs/synced_sregs."""
        self.run_struct.kvm_dirty_regs |= mask

    def coalesced_ring(self) -> CoalescedRing | None:
        """The VM's coalesced-write ring through this vCPU's mmap; None when the mmap does not
        reach it (a host without KVM_CAP_COALESCED_MMIO)."""
        if len(self.run_buffer) < ring_offset() + mmap.PAGESIZE:
            return None
        return CoalescedRing(self.run_buffer)

    # -- registers (ioctls: setup and paused-VM paths) ------------------------------------

    def get_regs(self) -> s.kvm_regs:
        regs = s.kvm_regs()
        ioctl(self.fd, c.KVM_GET_REGS, regs, "KVM_GET_REGS")
        return regs

    def set_regs(self, regs: s.kvm_regs) -> None:
        ioctl(self.fd, c.KVM_SET_REGS, regs, "KVM_SET_REGS")

    def get_sregs(self) -> s.kvm_sregs:
        sregs = s.kvm_sregs()
        ioctl(self.fd, c.KVM_GET_SREGS, sregs, "KVM_GET_SREGS")
        return sregs

    def set_sregs(self, sregs: s.kvm_sregs) -> None:
        ioctl(self.fd, c.KVM_SET_SREGS, sregs, "KVM_SET_SREGS")

    def get_fpu(self) -> s.kvm_fpu:
        fpu = s.kvm_fpu()
        ioctl(self.fd, c.KVM_GET_FPU, fpu, "KVM_GET_FPU")
        return fpu

    def set_fpu(self, fpu: s.kvm_fpu) -> None:
        ioctl(self.fd, c.KVM_SET_FPU, fpu, "KVM_SET_FPU")

    def get_vcpu_events(self) -> s.kvm_vcpu_events:
        events = s.kvm_vcpu_events()
        ioctl(self.fd, c.KVM_GET_VCPU_EVENTS, events, "KVM_GET_VCPU_EVENTS")
        return events

    def set_vcpu_events(self, events: s.kvm_vcpu_events) -> None:
        ioctl(self.fd, c.KVM_SET_VCPU_EVENTS, events, "KVM_SET_VCPU_EVENTS")

    def inject_exception(self, vector: int, error_code: int | None = None) -> None:
        """Deliver exception ``vector`` on the next KVM_RUN (KVM_SET_VCPU_EVENTS).

        Only the exception part is applied: flags leave NMI, SIPI and the interrupt shadow
        as they are. For #PF the caller sets CR2 first (KVM_SET_SREGS).
        """
        events = self.get_vcpu_events()
        events.exception.injected = 1
        events.exception.pending = 0
        events.exception.nr = vector
        events.exception.has_error_code = int(error_code is not None)
        events.exception.error_code = error_code or 0
        events.exception_has_payload = 0
        events.flags = 0
        self.set_vcpu_events(events)

    def get_xsave(self) -> bytes:
        """The FPU/SSE/AVX state as the 4 KiB standard-format XSAVE image."""
        area = s.kvm_xsave()
        ioctl(self.fd, c.KVM_GET_XSAVE, area, "KVM_GET_XSAVE")
        return bytes(area)

    def set_xsave(self, image: bytes) -> None:
        area = s.kvm_xsave()
        ctypes.memmove(ctypes.addressof(area), image, min(len(image), ctypes.sizeof(area)))
        ioctl(self.fd, c.KVM_SET_XSAVE, area, "KVM_SET_XSAVE")

    def get_xcrs(self) -> dict[int, int]:
        """Extended control registers: {0: XCR0, ...}."""
        table = s.kvm_xcrs()
        ioctl(self.fd, c.KVM_GET_XCRS, table, "KVM_GET_XCRS")
        return {int(table.xcrs[i].xcr): int(table.xcrs[i].value) for i in range(min(table.nr_xcrs, 16))}

    def set_xcrs(self, values: dict[int, int]) -> None:
        table = s.kvm_xcrs(nr_xcrs=len(values))
        for slot, (index, value) in enumerate(values.items()):
            table.xcrs[slot].xcr = index
            table.xcrs[slot].value = value
        ioctl(self.fd, c.KVM_SET_XCRS, table, "KVM_SET_XCRS")

    def emulation_failure_bytes(self) -> bytes | None:
        """The failing instruction's bytes from kvm_run after an emulation-failure exit, when
        KVM supplied them (KVM_CAP_EXIT_ON_EMULATION_FAILURE hosts), else None."""
        return emulation_failure_bytes(self.run_struct) or None

    def get_debugregs(self) -> s.kvm_debugregs:
        debugregs = s.kvm_debugregs()
        ioctl(self.fd, c.KVM_GET_DEBUGREGS, debugregs, "KVM_GET_DEBUGREGS")
        return debugregs

    def set_debugregs(self, debugregs: s.kvm_debugregs) -> None:
        ioctl(self.fd, c.KVM_SET_DEBUGREGS, debugregs, "KVM_SET_DEBUGREGS")

    def get_tsc_khz(self) -> int:
        return ioctl(self.fd, c.KVM_GET_TSC_KHZ, 0, "KVM_GET_TSC_KHZ")

    def set_tsc_khz(self, khz: int) -> None:
        ioctl(self.fd, c.KVM_SET_TSC_KHZ, khz, "KVM_SET_TSC_KHZ")

    # -- CPU model ------------------------------------------------------------------------

    def set_cpuid(self, entries: Sequence[s.kvm_cpuid_entry2]) -> None:
        table = s.cpuid2_with_entries(len(entries))()
        table.nent = len(entries)
        for index, entry in enumerate(entries):
            table.entries[index] = entry
        ioctl(self.fd, c.KVM_SET_CPUID2, table, "KVM_SET_CPUID2")

    def get_cpuid(self, capacity: int = 256) -> list[s.kvm_cpuid_entry2]:
        """KVM_GET_CPUID2: the table this vCPU was given with set_cpuid."""
        table = s.cpuid2_with_entries(capacity)()
        table.nent = capacity
        ioctl(self.fd, c.KVM_GET_CPUID2, table, "KVM_GET_CPUID2")
        return [s.kvm_cpuid_entry2.from_buffer_copy(table.entries[i]) for i in range(table.nent)]

    def get_msrs(self, indices: Iterable[int]) -> dict[int, int]:
        wanted = list(indices)
        table = s.msrs_with_entries(len(wanted))()
        table.nmsrs = len(wanted)
        for slot, index in enumerate(wanted):
            table.entries[slot].index = index
        read = ioctl(self.fd, c.KVM_GET_MSRS, table, "KVM_GET_MSRS")
        return {table.entries[i].index: table.entries[i].data for i in range(read)}

    def set_msrs(self, values: dict[int, int]) -> None:
        table = s.msrs_with_entries(len(values))()
        table.nmsrs = len(values)
        for slot, (index, data) in enumerate(values.items()):
            table.entries[slot].index = index
            table.entries[slot].data = data
        written = ioctl(self.fd, c.KVM_SET_MSRS, table, "KVM_SET_MSRS")
        if written != len(values):
            bad = list(values)[written]
            from vmscope.errors import KvmError

            raise KvmError(f"KVM_SET_MSRS rejected MSR {bad:#x}")

    def get_mp_state(self) -> int:
        state = s.kvm_mp_state()
        ioctl(self.fd, c.KVM_GET_MP_STATE, state, "KVM_GET_MP_STATE")
        return int(state.mp_state)

    def set_mp_state(self, value: int) -> None:
        ioctl(self.fd, c.KVM_SET_MP_STATE, s.kvm_mp_state(value), "KVM_SET_MP_STATE")

    def get_lapic(self) -> bytes:
        state = s.kvm_lapic_state()
        ioctl(self.fd, c.KVM_GET_LAPIC, state, "KVM_GET_LAPIC")
        return ctypes.string_at(ctypes.addressof(state), ctypes.sizeof(state))

    def set_lapic(self, registers: bytes) -> None:
        state = s.kvm_lapic_state()
        ctypes.memmove(ctypes.addressof(state), registers, min(len(registers), 1024))
        ioctl(self.fd, c.KVM_SET_LAPIC, state, "KVM_SET_LAPIC")

    # -- debugging ------------------------------------------------------------------------

    def set_guest_debug(self, control: int, debugreg: Sequence[int] = ()) -> None:
        request = s.kvm_guest_debug(control=control)
        for index, value in enumerate(debugreg):
            request.debugreg[index] = value
        ioctl(self.fd, c.KVM_SET_GUEST_DEBUG, request, "KVM_SET_GUEST_DEBUG")

    def stats_fd(self) -> int:
        return ioctl(self.fd, c.KVM_GET_STATS_FD, 0, "KVM_GET_STATS_FD")

    def close(self) -> None:
        if self.fd >= 0:
            del self.run_struct
            try:
                self.run_buffer.close()
            except BufferError:
                pass
            os.close(self.fd)
            self.fd = -1
