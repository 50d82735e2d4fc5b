"""Port and MMIO buses: registration, lookup, unclaimed accesses, failing devices."""

from __future__ import annotations

import pytest

from vmscope.bus import MmioBus, PioBus
from vmscope.devices.base import Device
from vmscope.errors import BusConflictError


class Register(Device):
    def __init__(self, name: str = "reg") -> None:
        self.name = name
        self.writes: list[tuple[int, bytes]] = []

    def read(self, offset: int, size: int) -> bytes:
        return bytes([offset]) * size

    def write(self, offset: int, data: bytes) -> None:
        self.writes.append((offset, data))


class Broken(Device):
    name = "broken"

    def read(self, offset: int, size: int) -> bytes:
        return b"\x01"  # wrong size on purpose

    def write(self, offset: int, data: bytes) -> None:
        raise RuntimeError("device bug")


def test_dispatch_passes_offsets_relative_to_the_window() -> None:
    bus = PioBus()
    device = Register()
    bus.register(0x3F8, 8, device)
    bus.write(0x3FB, b"\x80")
    assert device.writes == [(3, b"\x80")]
    assert bus.read(0x3FD, 1) == b"\x05"
    assert bus.lookup(0x3FF) == (device, 0x3F8)
    assert bus.lookup(0x400) is None


def test_overlapping_registration_is_refused_with_both_names() -> None:
    bus = PioBus()
    bus.register(0x60, 5, Register("i8042"))
    with pytest.raises(BusConflictError, match=r"overlaps i8042 at 0x60-0x64"):
        bus.register(0x64, 1, Register("other"))
    bus.register(0x65, 1, Register("adjacent"))  # touching is fine
    with pytest.raises(BusConflictError, match="outside the bus"):
        bus.register(0xFFFF, 2, Register("past-the-end"))


def test_unclaimed_accesses_read_all_ones_and_are_counted_by_address_and_size() -> None:
    bus = MmioBus()
    assert bus.read(0xD000_0000, 4) == b"\xff\xff\xff\xff"
    bus.write(0xD000_0000, b"\x00\x00")
    bus.write(0xD000_0000, b"\x00\x00")
    assert bus.unclaimed_reads == {(0xD000_0000, 4): 1}
    assert bus.unclaimed_writes == {(0xD000_0000, 2): 2}


def test_a_failing_device_is_logged_and_counted_and_the_guest_sees_all_ones(
    caplog: pytest.LogCaptureFixture,
) -> None:
    bus = PioBus()
    bus.register(0x500, 4, Broken())
    bus.write(0x500, b"\x01")
    assert bus.read(0x501, 2) == b"\x01\xff"  # padded to the requested size
    assert bus.device_errors["broken"] == 2
    assert "device broken: write at port 0x500 failed: device bug" in caplog.text


def test_unregister_removes_the_window_and_clears_the_lookup_cache() -> None:
    bus = PioBus()
    device = Register()
    bus.register(0x510, 1, device)
    assert bus.lookup(0x510) is not None
    bus.unregister(device)
    assert bus.lookup(0x510) is None


def test_bound_write_handlers_reach_the_device_and_follow_map_changes() -> None:
    bus = PioBus()
    first = Register("first")
    bus.register(0x510, 2, first)
    handler = bus.bind_write(0x511)
    assert bus.write_handlers[0x511] is handler
    handler(b"\x07")
    assert first.writes == [(1, b"\x07")]
    bus.unregister(first)
    assert bus.write_handlers == {}  # the exit loop's dict is cleared in place
    bus.bind_write(0x511)(b"\x08\x00")
    assert bus.unclaimed_writes[0x511, 2] == 1
    second = Register("second")
    bus.register(0x500, 0x20, second)
    assert 0x511 not in bus.write_handlers
    bus.bind_write(0x511)(b"\x09")
    assert second.writes == [(0x11, b"\x09")] and first.writes == [(1, b"\x07")]


def test_a_failing_bound_write_is_reported_like_a_bus_write() -> None:
    bus = MmioBus()
    failures: list[str] = []
    bus.on_device_error = lambda device, error: failures.append(device.name)
    bus.register(0xD000_0000, 0x1000, Broken())
    handler = bus.bind_write(0xD000_0004)
    with pytest.raises(RuntimeError) as caught:
        handler(b"\x01\x02\x03\x04")
    bus.write_failed(0xD000_0004, caught.value)
    assert bus.device_errors["broken"] == 1 and failures == ["broken"]


def test_bound_unclaimed_writes_are_counted_by_size_when_settled_and_none_twice() -> None:
    bus = PioBus()
    handler = bus.bind_write(0x510)
    for data in (b"\x01", b"\x02", b"\x03\x00", b"\x04\x00\x00\x00"):
        handler(data)
    bus.settle_unclaimed_writes()
    handler(b"\x05")
    assert bus.unclaimed_writes == {(0x510, 1): 3, (0x510, 2): 1, (0x510, 4): 1}
    assert bus.unclaimed_writes == {(0x510, 1): 3, (0x510, 2): 1, (0x510, 4): 1}  # settled once
    bus.register(0x510, 1, Register())  # a device claims the port: earlier writes stay unclaimed
    bus.bind_write(0x510)(b"\x06")
    assert bus.unclaimed_writes[0x510, 1] == 3
