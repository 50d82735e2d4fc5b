"""Registers and guest-virtual memory of the stopped vCPUs, for the GDB stub's g/G/p/P/m/M/X packets.

Only used while every vCPU is parked (outside KVM_RUN); memory goes through the selected vCPU's
page tables and :class:`~vmscope.memory.guest_memory.GuestMemory` only.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from vmscope.errors import GuestMemoryError
from vmscope.gdbstub import protocol as p
from vmscope.gdbstub import registers as r
from vmscope.gdbstub.constants import EINVAL_REPLY, MAX_MEMORY_TRANSFER, OK
from vmscope.memory.paging import CR4_LA57, PagingMode, read_virtual, translate

if TYPE_CHECKING:
    from vmscope.vmm.machine import Machine
    from vmscope.vmm.runner import VcpuRunner

log = logging.getLogger("vmscope.gdbstub")


class TargetAccess:
    """Register and memory access of :class:`~vmscope.gdbstub.stub.GdbStub` (a mixin)."""

    machine: Machine
    _general_thread: int

    # -- registers and memory (only while every vCPU is parked) --------------------------------

    def _vcpu(self, vcpu_index: int | None) -> VcpuRunner:
        index = self._general_thread if vcpu_index is None else vcpu_index
        return self.machine.runners[index]

    def _read_registers(self, vcpu_index: int | None = None) -> r.RegisterValues:
        vcpu = self._vcpu(vcpu_index).vcpu
        return r.registers_from_kvm(vcpu.get_regs(), vcpu.get_sregs(), vcpu.get_fpu())

    def _write_registers(self, values: r.RegisterValues, vcpu_index: int | None = None) -> bytes:
        vcpu = self._vcpu(vcpu_index).vcpu
        regs, sregs, fpu = vcpu.get_regs(), vcpu.get_sregs(), vcpu.get_fpu()
        try:
            changed = r.apply_registers(values, regs, sregs, fpu)
        except r.RegisterWriteError as error:
            log.info("%s", error)
            return EINVAL_REPLY
        if changed.regs:
            vcpu.set_regs(regs)
        if changed.sregs:
            vcpu.set_sregs(sregs)
        if changed.fpu:
            vcpu.set_fpu(fpu)
        return OK

    def _paging_mode(self) -> PagingMode:
        sregs = self._vcpu(None).vcpu.get_sregs()
        return PagingMode.from_sregs(sregs)

    def _chunks(self, address: int, length: int) -> list[tuple[int, int]]:
        """(guest-virtual address, length) pieces that do not cross a 4 KiB page."""
        pieces = []
        end = address + length
        while address < end:
            size = min(end - address, 0x1000 - (address & 0xFFF))
            pieces.append((address, size))
            address += size
        return pieces

    def _check_address(self, mode: PagingMode, address: int, length: int) -> None:
        if address + length > 1 << 64:
            raise GuestMemoryError(f"{address:#x}+{length:#x} wraps past the end of the address space")
        if mode.enabled and mode.long_mode:
            bits = 57 if mode.cr4 & CR4_LA57 else 48
            for probe in (address, address + length - 1):
                upper = probe >> (bits - 1)
                if upper not in (0, (1 << (65 - bits)) - 1):
                    raise GuestMemoryError(f"{probe:#x} is not a canonical address")
        elif not mode.long_mode and address + length > 1 << 32:
            raise GuestMemoryError(f"{address:#x}+{length:#x} lies beyond the 32-bit address space")

    def _read_memory(self, address: int, length: int) -> bytes:
        length = min(length, MAX_MEMORY_TRANSFER)
        if length == 0:
            return b""
        mode = self._paging_mode()
        out = bytearray()
        for piece, size in self._chunks(address, min(length, (1 << 64) - address)):
            try:
                self._check_address(mode, piece, size)
                out += read_virtual(self.machine.memory, mode, piece, size)
            except GuestMemoryError:
                break
        if not out:
            raise GuestMemoryError(f"cannot read guest-virtual {address:#x}")
        return bytes(out)

    def _write_memory(self, address: int, data: bytes) -> None:
        """All or nothing: every page is translated and checked before the first byte is written."""
        if not data:
            return
        if len(data) > MAX_MEMORY_TRANSFER:
            raise p.ProtocolError(f"memory write of {len(data)} bytes exceeds {MAX_MEMORY_TRANSFER}")
        mode = self._paging_mode()
        self._check_address(mode, address, len(data))
        memory = self.machine.memory
        targets = []
        for piece, size in self._chunks(address, len(data)):
            physical = translate(memory, mode, piece)
            if not memory.contains(physical, size):
                raise GuestMemoryError(f"guest-virtual {piece:#x} maps to {physical:#x}, outside guest RAM")
            targets.append((physical, piece - address, size))
        for physical, offset, size in targets:
            memory.write(physical, data[offset : offset + size])
