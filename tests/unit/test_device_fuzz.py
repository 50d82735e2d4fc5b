"""A misbehaving guest must not crash device models: random register traffic at every offset and
size, with a fixed seed so a failure reproduces. Device code that raises would be caught by the
bus and counted in ``device_errors``; these tests require that it never comes to that."""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest

from vmscope.bus import PioBus
from vmscope.devices.acpi_pm import ACPI_PM_LENGTH, AcpiPm
from vmscope.devices.base import Device, RecordingInterruptLine, RecordingMachineControl
from vmscope.devices.cmos import Cmos
from vmscope.devices.debug_exit import DebugExit
from vmscope.devices.i8042 import I8042, I8042_WINDOW_LENGTH
from vmscope.devices.port80 import Port80
from vmscope.devices.serial import Uart16550

ACCESSES = 20_000


def uart(control: RecordingMachineControl) -> Device:
    return Uart16550(RecordingInterruptLine())


DEVICES: dict[str, tuple[Callable[[RecordingMachineControl], Device], int]] = {
    "uart": (uart, 8),
    "i8042": (lambda control: I8042(control), I8042_WINDOW_LENGTH),
    "cmos": (lambda control: Cmos(64 << 20, 0), 2),
    "port80": (lambda control: Port80(capacity=100), 1),
    "debug-exit": (lambda control: DebugExit(control), 1),
    "acpi-pm": (lambda control: AcpiPm(control), ACPI_PM_LENGTH),
}


@pytest.mark.parametrize("name", sorted(DEVICES))
def test_random_register_traffic_never_makes_a_device_raise(name: str) -> None:
    factory, length = DEVICES[name]
    control = RecordingMachineControl()
    device = factory(control)
    bus = PioBus()
    base = 0x1000
    bus.register(base, length, device)
    rng = random.Random(f"vmscope-{name}")
    for _ in range(ACCESSES):
        offset = rng.randrange(length)
        size = rng.choice((1, 2, 4))
        if rng.random() < 0.5:
            data = bus.read(base + offset, size)
            assert len(data) == size
        else:
            bus.write(base + offset, rng.randbytes(size))
    assert bus.device_errors[device.name] == 0
    device.close()
