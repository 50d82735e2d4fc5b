"""kvm_run exit decoding (kvm.exits), exit keys (vmm.exit_keys) and rare-exit decisions."""

from __future__ import annotations

import ctypes

import pytest

from vmscope.kvm import constants as c
from vmscope.kvm import structs as s
from vmscope.kvm.exits import (
    EXIT_REASON_OFFSET,
    EXIT_UNION_OFFSET,
    IO_EXIT,
    MMIO_DATA_OFFSET,
    MMIO_EXIT,
    RareExit,
    decode_rare_exit,
)
from vmscope.vmm.exit_keys import (
    IO_OUT_KEY,
    MMIO_READ_KEY,
    decode_exit_key,
    describe_exit_key,
    encode_exit_key,
    exit_detail,
    key_address,
    rare_exit_key,
)
from vmscope.vmm.rare_exits import ExitAction, RareExitHandlers, decide_rare_exit


def run_page() -> tuple[bytearray, s.kvm_run]:
    page = bytearray(4096)
    return page, s.kvm_run.from_buffer(page)


def test_io_exit_struct_reads_the_fields_ctypes_wrote() -> None:
    page, run = run_page()
    run.exit_reason = c.ExitReason.IO
    run.exit.io.direction, run.exit.io.size, run.exit.io.port = 1, 2, 0x3F8
    run.exit.io.count, run.exit.io.data_offset = 3, 0x1000
    assert page[EXIT_REASON_OFFSET] == c.ExitReason.IO
    assert IO_EXIT.unpack_from(page, EXIT_UNION_OFFSET) == (1, 2, 0x3F8, 3, 0x1000)


def test_mmio_exit_struct_and_data_offset_match_ctypes() -> None:
    page, run = run_page()
    run.exit.mmio.phys_addr = 0xD000_0010
    run.exit.mmio.len, run.exit.mmio.is_write = 4, 1
    for index, value in enumerate(b"\x01\x02\x03\x04"):
        run.exit.mmio.data[index] = value
    address, data, length, is_write = MMIO_EXIT.unpack_from(page, EXIT_UNION_OFFSET)
    assert (address, data[:length], is_write) == (0xD000_0010, b"\x01\x02\x03\x04", 1)
    page[MMIO_DATA_OFFSET : MMIO_DATA_OFFSET + 2] = b"\xaa\xbb"
    assert bytes(run.exit.mmio.data)[:2] == b"\xaa\xbb"


def test_emulation_failure_instruction_bytes_are_taken_only_when_flagged() -> None:
    _, run = run_page()
    run.exit_reason = c.ExitReason.INTERNAL_ERROR
    internal = run.exit.internal
    internal.suberror, internal.ndata = 1, 3
    code = bytes.fromhex("f0480fc70e")
    raw = bytes([len(code)]) + code + bytes(16 - 1 - len(code))
    internal.data[1] = int.from_bytes(raw[:8], "little")
    internal.data[2] = int.from_bytes(raw[8:], "little")
    assert decode_rare_exit(run).instruction == b""  # flags word says no bytes
    internal.data[0] = 1
    decoded = decode_rare_exit(run)
    assert (decoded.reason, decoded.code, decoded.instruction) == (c.ExitReason.INTERNAL_ERROR, 1, code)
    internal.data[1] = int.from_bytes(bytes([200]) + raw[1:8], "little")  # hostile length
    assert len(decode_rare_exit(run).instruction) == 15


def test_rare_exit_fields_for_system_event_and_debug() -> None:
    _, run = run_page()
    run.exit_reason = c.ExitReason.SYSTEM_EVENT
    run.exit.system_event.type = 2
    assert decode_rare_exit(run) == RareExit(c.ExitReason.SYSTEM_EVENT, code=2)
    run.exit_reason = c.ExitReason.DEBUG
    run.exit.debug.pc = 0xFFFF_FFFF_8100_0000
    assert decode_rare_exit(run).pc == 0xFFFF_FFFF_8100_0000


def test_exit_keys_round_trip_and_describe() -> None:
    key = IO_OUT_KEY | 0x3F8
    assert decode_exit_key(key) == ("IO", 0x3F8, "out")
    assert describe_exit_key(key) == "IO port 0x3f8 out"
    assert key == encode_exit_key(c.ExitReason.IO, 2, 0x3F8)
    assert decode_exit_key(MMIO_READ_KEY | 0xD000_0000) == ("MMIO", 0xD000_0000, "read")
    assert key_address(MMIO_READ_KEY | 0x10) == 0x10
    assert key_address(rare_exit_key(c.ExitReason.HLT)) is None
    assert decode_exit_key(rare_exit_key(c.ExitReason.HLT)) == ("HLT", -1, "")
    assert decode_exit_key(rare_exit_key(250)).reason == "EXIT_250"
    assert exit_detail("HLT", -1, "") == ""


@pytest.mark.parametrize(
    ("rare", "action", "status", "words"),
    [
        (RareExit(c.ExitReason.INTR), ExitAction.KICK, 0, ""),
        (RareExit(c.ExitReason.IRQ_WINDOW_OPEN), ExitAction.CONTINUE, 0, ""),
        (RareExit(c.ExitReason.HLT), ExitAction.STOP, 0, "halted"),
        (RareExit(c.ExitReason.SYSTEM_EVENT, code=1), ExitAction.STOP, 0, "shutdown"),
        (RareExit(c.ExitReason.SYSTEM_EVENT, code=2), ExitAction.STOP, 0, "reset"),
        (RareExit(c.ExitReason.SYSTEM_EVENT, code=3), ExitAction.CRASH, 1, "crash"),
        (RareExit(c.ExitReason.DEBUG, pc=0x1234), ExitAction.CONTINUE, 0, "0x1234"),
        (RareExit(c.ExitReason.SHUTDOWN), ExitAction.CRASH, 1, "triple fault"),
        (RareExit(c.ExitReason.FAIL_ENTRY, code=0x21), ExitAction.CRASH, 1, "0x21"),
        (RareExit(c.ExitReason.INTERNAL_ERROR, code=1), ExitAction.CRASH, 1, "emulation failure"),
        (RareExit(199), ExitAction.CRASH, 1, "unhandled exit reason 199"),
    ],
)
def test_default_decisions(rare: RareExit, action: ExitAction, status: int, words: str) -> None:
    decision = decide_rare_exit(rare, vcpu_id=0)
    assert decision.action is action
    assert decision.exit_status == status
    assert words in decision.message
    assert decision.internal_error == (rare.reason == c.ExitReason.INTERNAL_ERROR)


def test_handlers_are_asked_newest_first_and_none_passes_on() -> None:
    handlers = RareExitHandlers()
    calls: list[str] = []

    def passes(runner: object, rare: RareExit) -> bool | None:
        calls.append("passes")
        return None

    def takes(runner: object, rare: RareExit) -> bool | None:
        calls.append("takes")
        return False

    rare = RareExit(c.ExitReason.DEBUG)
    assert handlers.dispatch(None, rare) is None  # type: ignore[arg-type]
    handlers.add(c.ExitReason.DEBUG, takes)
    handlers.add(c.ExitReason.DEBUG, passes)
    assert handlers.dispatch(None, rare) is False  # type: ignore[arg-type]
    assert calls == ["passes", "takes"]
    assert handlers.dispatch(None, RareExit(c.ExitReason.HLT)) is None  # type: ignore[arg-type]
    handlers.remove(c.ExitReason.DEBUG, takes)
    handlers.remove(c.ExitReason.DEBUG, passes)
    assert handlers.handlers_for(c.ExitReason.DEBUG) == ()


def test_struct_offsets_come_from_ctypes() -> None:
    assert s.kvm_run.exit.offset == EXIT_UNION_OFFSET
    assert ctypes.sizeof(s._exit_io) >= IO_EXIT.size
    assert ctypes.sizeof(s._exit_mmio) >= MMIO_EXIT.size
