"""Timer samples at an interrupt handler's first instruction are charged to the interrupted code."""

from __future__ import annotations

import struct

from vmscope.profiler.interrupt_entry import (
    InterruptEntries,
    gate_targets,
    interrupted_context,
)

IDT_BASE = 0xFFFF_FE00_0000_0000
TIMER_HANDLER = 0xFFFF_FFFF_81C0_0AB0
PF_HANDLER = 0xFFFF_FFFF_81C0_0A10


def gate(handler: int, present: bool = True) -> bytes:
    return struct.pack(
        "<HHBBHIL", handler & 0xFFFF, 0x10, 0, 0x8E if present else 0x0E, (handler >> 16) & 0xFFFF,
        handler >> 32, 0,
    )  # fmt: skip


def idt() -> bytes:
    table = bytearray(256 * 16)
    table[14 * 16 : 15 * 16] = gate(PF_HANDLER)
    table[0xEC * 16 : 0xED * 16] = gate(TIMER_HANDLER)
    table[0xED * 16 : 0xEE * 16] = gate(0x1234, present=False)
    return bytes(table)


def frame(rip: int, cs: int, rsp: int, error_code: int | None = None) -> bytes:
    head = struct.pack("<Q", error_code) if error_code is not None else b""
    return head + struct.pack("<QQQQQ", rip, cs, 0x246, rsp, 0x18 if cs & 3 == 0 else 0x2B)


def test_gate_targets_lists_present_gates_only() -> None:
    targets = gate_targets(idt())
    assert targets[PF_HANDLER] == 14 and targets[TIMER_HANDLER] == 0xEC
    assert 0x1234 not in targets


def test_frames_with_and_without_an_error_code() -> None:
    timer = interrupted_context(frame(0xFFFF_FFFF_8123_4567, 0x10, 0xFFFF_C900_0000_1F00), 0xEC)
    assert timer is not None and (timer.ip, timer.sp, timer.cpl) == (
        0xFFFF_FFFF_8123_4567,
        0xFFFF_C900_0000_1F00,
        0,
    )
    fault = interrupted_context(frame(0x40_1000, 0x33, 0x7FFE_0000, error_code=6), 14)
    assert fault is not None and (fault.ip, fault.sp, fault.cpl) == (0x40_1000, 0x7FFE_0000, 3)
    assert interrupted_context(b"\x00" * 16, 0xEC) is None


def test_only_a_handlers_first_instruction_is_an_entry_and_the_idt_is_cached() -> None:
    reads: list[tuple[int, int]] = []
    memory = {IDT_BASE: idt(), 0x5000: frame(0xFFFF_FFFF_8111_0000, 0x10, 0x6000)}

    def read(address: int, length: int) -> bytes | None:
        reads.append((address, length))
        data = memory.get(address)
        return data[:length] if data is not None else None

    clock = [0.0]
    entries = InterruptEntries(clock=lambda: clock[0])
    assert entries.interrupted(TIMER_HANDLER + 4, 0x5000, IDT_BASE, 4095, read) is None  # past the entry
    context = entries.interrupted(TIMER_HANDLER, 0x5000, IDT_BASE, 4095, read)
    assert context is not None and context.ip == 0xFFFF_FFFF_8111_0000 and context.vector == 0xEC
    assert [address for address, _ in reads].count(IDT_BASE) == 1  # read once
    clock[0] = 10.0  # the kernel may have rewritten its IDT since: read it again
    entries.vector_at(TIMER_HANDLER, IDT_BASE, 4095, read)
    assert [address for address, _ in reads].count(IDT_BASE) == 2
    assert entries.interrupted(TIMER_HANDLER, 0x9000, IDT_BASE, 4095, read) is None  # frame unreadable
    assert entries.vector_at(TIMER_HANDLER, 0xDEAD_0000, 4095, read) is None  # IDT unreadable
