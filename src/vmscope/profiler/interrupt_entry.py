"""Samples that land on an interrupt or exception entry before its handler ran.

A vCPU stopped for a sample (a signal kick) while an interrupt was pending can show its rip at
the first instruction of the IDT handler: the interrupt was delivered on the way back into the
guest (the frame pushed, rip set), but no handler instruction has run. The guest spent the
time before that point in the code it interrupted, so such a sample belongs to that code. On
hosts where the guest always has a timer tick pending (kvm_pvm, whose emulated kernel lags its
clock), most kicks find the vCPU exactly there: in one recorded Debian boot 74% of the timer
samples did. :class:`InterruptEntries` knows the handlers' addresses from the guest's own IDT
and gives the interrupted context from the hardware frame.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Callable
from dataclasses import dataclass

from vmscope.profiler.unwinders.base import BytesReader

#: exceptions whose frame carries an error code below the return address
ERROR_CODE_VECTORS = frozenset({8, 10, 11, 12, 13, 14, 17, 21, 29, 30})
_GATE = struct.Struct("<HHBBHIL")  # offset 15:0, selector, ist, type_attr, offset 31:16, 63:32, reserved
_FRAME = struct.Struct("<QQQQQ")  # rip, cs, rflags, rsp, ss
#: the kernel rewrites its IDT during boot: look again at least this often
REFRESH_S = 5.0


@dataclass(frozen=True, slots=True)
class InterruptedContext:
    ip: int
    sp: int
    cpl: int
    vector: int


def gate_targets(table: bytes) -> dict[int, int]:
    """Handler address -> vector for every present 64-bit gate of an IDT image."""
    targets: dict[int, int] = {}
    for vector in range(min(len(table) // 16, 256)):
        low, _selector, _ist, type_attr, middle, high, _ = _GATE.unpack_from(table, vector * 16)
        if type_attr & 0x80:  # present
            targets.setdefault(low | middle << 16 | high << 32, vector)
    return targets


def interrupted_context(frame: bytes, vector: int) -> InterruptedContext | None:
    """The context a delivered interrupt's hardware frame says it interrupted (None: no frame)."""
    skip = 8 if vector in ERROR_CODE_VECTORS else 0
    if len(frame) < skip + _FRAME.size:
        return None
    rip, cs, _rflags, rsp, _ss = _FRAME.unpack_from(frame, skip)
    return InterruptedContext(rip, rsp, cs & 3, vector)


class InterruptEntries:
    """The IDT handler addresses of one vCPU's guest, read through the given reader and cached."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._key: tuple[int, int] | None = None
        self._read_at = 0.0
        self._targets: dict[int, int] = {}

    def vector_at(self, ip: int, idt_base: int, idt_limit: int, read: BytesReader) -> int | None:
        """The vector whose handler starts at ``ip``, or None."""
        key = (idt_base, idt_limit)
        now = self._clock()
        if key != self._key or now - self._read_at > REFRESH_S:
            table = read(idt_base, min(idt_limit + 1, 256 * 16))
            self._targets = gate_targets(table) if table else {}
            self._key, self._read_at = key, now
        return self._targets.get(ip)

    def interrupted(
        self, ip: int, sp: int, idt_base: int, idt_limit: int, read: BytesReader
    ) -> InterruptedContext | None:
        """When ``ip`` is a handler's first instruction, the context the frame at ``sp`` interrupted."""
        vector = self.vector_at(ip, idt_base, idt_limit, read)
        if vector is None:
            return None
        frame = read(sp, 8 + _FRAME.size)
        return interrupted_context(frame, vector) if frame else None
