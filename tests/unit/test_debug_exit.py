"""isa-debug-exit: a write of v stops the machine with status (v << 1) | 1."""

from __future__ import annotations

import pytest

from vmscope.bus import PioBus
from vmscope.devices.base import RecordingMachineControl
from vmscope.devices.debug_exit import DEFAULT_DEBUG_EXIT_PORT, DEFAULT_DEBUG_EXIT_SIZE, DebugExit


@pytest.mark.parametrize(
    ("data", "status"),
    [
        (b"\x00", 1),
        (b"\x01", 3),
        (b"\x10", 0x21),
        (b"\xff", 0x1FF),
        (b"\x34\x12", (0x1234 << 1) | 1),
        (b"\xff\xff", 0x1FFFF),
        (b"\x78\x56\x34\x12", (0x12345678 << 1) | 1),
        (b"\xff\xff\xff\xff", 0x1_FFFF_FFFF),
    ],
)
def test_write_requests_stop_with_shifted_odd_status(data: bytes, status: int) -> None:
    machine = RecordingMachineControl()
    DebugExit(machine).write(0, data)
    assert [exit_status for _, exit_status in machine.stops] == [status]
    reason = machine.stops[0][0]
    assert hex(int.from_bytes(data, "little")) in reason


def test_every_write_requests_a_stop() -> None:
    machine = RecordingMachineControl()
    device = DebugExit(machine)
    device.write(0, b"\x02")
    device.write(0, b"\x03")
    assert [status for _, status in machine.stops] == [5, 7]


def test_reads_are_all_ones_and_empty_writes_do_nothing() -> None:
    machine = RecordingMachineControl()
    device = DebugExit(machine)
    for size in (1, 2, 4):
        assert device.read(0, size) == b"\xff" * size
    device.write(0, b"")
    assert machine.stops == []


def test_default_port_on_the_bus_like_qemu() -> None:
    machine = RecordingMachineControl()
    bus = PioBus()
    bus.register(DEFAULT_DEBUG_EXIT_PORT, DEFAULT_DEBUG_EXIT_SIZE, DebugExit(machine))
    bus.write(0xF4, b"\x2a")  # outb 42, 0xf4
    bus.write(0xF5, b"\x01")  # beside it: unclaimed
    assert machine.stops and machine.stops[0][1] == 85
    assert len(machine.stops) == 1
    assert bus.unclaimed_writes[0xF5, 1] == 1
