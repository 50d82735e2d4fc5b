"""The x86 debug registers as the GDB stub uses them: up to four hardware breakpoints and
watchpoints in DR0-DR3, and the DR7 that enables them (see :mod:`vmscope.gdbstub.stub`)."""

from __future__ import annotations

from dataclasses import dataclass

from vmscope.gdbstub import protocol as p
from vmscope.gdbstub.constants import DR7_RESERVED_ONE, HW_SLOTS

_DR7_RW = {"exec": 0b00, "write": 0b01, "read": 0b11, "access": 0b11}
_DR7_LEN = {1: 0b00, 2: 0b01, 8: 0b10, 4: 0b11}
WATCH_PREFIX = {"write": "watch", "read": "rwatch", "access": "awatch"}
#: Z/z packet type -> breakpoint kind
Z_TYPES = {0: "exec", 1: "exec", 2: "write", 3: "read", 4: "access"}


@dataclass
class HwBreakpoint:
    kind: str  # "exec", "write", "read" (x86 can only watch reads with writes) or "access"
    address: int
    length: int
    references: int = 1


class DebugRegisters:
    """Breakpoints and watchpoints assigned to DR0-DR3, and the DR7 that enables them."""

    def __init__(self) -> None:
        self.slots: list[HwBreakpoint | None] = [None] * HW_SLOTS

    def _find(self, kind: str, address: int, length: int) -> int | None:
        for index, slot in enumerate(self.slots):
            if slot is not None and (slot.kind, slot.address, slot.length) == (kind, address, length):
                return index
        return None

    def insert(self, kind: str, address: int, length: int) -> bool:
        """Add a breakpoint (length 1) or watchpoint; False when all four slots are taken."""
        if kind not in _DR7_RW:
            raise p.ProtocolError(f"unknown breakpoint kind {kind!r}")
        if kind == "exec":
            length = 1
        elif length not in _DR7_LEN or address % length:
            raise p.ProtocolError(
                f"watchpoints cover 1, 2, 4 or 8 aligned bytes, not {length} at {address:#x}"
            )
        found = self._find(kind, address, length)
        if found is not None:
            slot = self.slots[found]
            assert slot is not None
            slot.references += 1
            return True
        for index, slot in enumerate(self.slots):
            if slot is None:
                self.slots[index] = HwBreakpoint(kind, address, length)
                return True
        return False

    def remove(self, kind: str, address: int, length: int) -> bool:
        found = self._find(kind, address, 1 if kind == "exec" else length)
        if found is None:
            return False
        slot = self.slots[found]
        assert slot is not None
        slot.references -= 1
        if slot.references <= 0:
            self.slots[found] = None
        return True

    def clear(self) -> None:
        self.slots = [None] * HW_SLOTS

    @property
    def active(self) -> bool:
        return any(slot is not None for slot in self.slots)

    def exec_at(self, address: int) -> bool:
        return any(slot.kind == "exec" and slot.address == address for slot in self.slots if slot is not None)

    def debugregs(self, *, disarm_exec_at: int | None = None) -> list[int]:
        """kvm_guest_debug.debugreg: DR0-DR3, two unused, DR6 (0) and DR7."""
        values = [0] * 8
        dr7 = DR7_RESERVED_ONE
        for index, slot in enumerate(self.slots):
            if slot is None:
                continue
            values[index] = slot.address
            if slot.kind == "exec" and slot.address == disarm_exec_at:
                continue
            dr7 |= 1 << (2 * index + 1)  # G<n>: enabled in every task
            dr7 |= (_DR7_RW[slot.kind] | (_DR7_LEN[slot.length] << 2)) << (16 + 4 * index)
        values[7] = dr7
        return values

    def hits(self, dr6: int) -> list[HwBreakpoint]:
        """The breakpoints whose B<n> bit is set in ``dr6``."""
        return [slot for index, slot in enumerate(self.slots) if slot is not None and dr6 & (1 << index)]
