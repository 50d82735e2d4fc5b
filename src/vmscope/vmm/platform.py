"""The legacy PC devices every guest expects, mapped where a PC has them."""

from __future__ import annotations

from vmscope.devices.acpi_pm import ACPI_PM_BASE, ACPI_PM_LENGTH, AcpiPm
from vmscope.devices.char_backends import SerialBackend, open_serial_backend
from vmscope.devices.cmos import Cmos
from vmscope.devices.debug_exit import DebugExit
from vmscope.devices.i8042 import I8042
from vmscope.devices.port80 import Port80
from vmscope.devices.serial import Uart16550
from vmscope.memory.guest_memory import HIGH_RAM_START
from vmscope.records import record_repr
from vmscope.vmm.machine import Machine

COM1_PORT, COM1_IRQ = 0x3F8, 4
I8042_PORT, I8042_KEYBOARD_IRQ, I8042_AUX_IRQ = 0x60, 1, 12
CMOS_PORT = 0x70
POST_PORT = 0x80


class PlatformDevices:
    """The devices :func:`install_platform_devices` mapped (``debug_exit`` None without a port)."""

    __slots__ = ("acpi_pm", "cmos", "debug_exit", "i8042", "port80", "serial")

    serial: Uart16550
    debug_exit: DebugExit | None
    port80: Port80
    i8042: I8042
    cmos: Cmos
    acpi_pm: AcpiPm

    def __init__(
        self,
        serial: Uart16550,
        debug_exit: DebugExit | None,
        port80: Port80,
        i8042: I8042,
        cmos: Cmos,
        acpi_pm: AcpiPm,
    ) -> None:
        self.serial = serial
        self.debug_exit = debug_exit
        self.port80 = port80
        self.i8042 = i8042
        self.cmos = cmos
        self.acpi_pm = acpi_pm

    __repr__ = record_repr


def install_platform_devices(
    machine: Machine,
    *,
    serial: SerialBackend | str = "stdio",
    debug_exit_port: int | None = 0xF4,
) -> PlatformDevices:
    """COM1 (IRQ 4), debug-exit, POST port 0x80, i8042, CMOS/RTC and ACPI power management
    (the ports the generated FADT names) on ``machine``'s port bus."""
    backend = open_serial_backend(serial) if isinstance(serial, str) else serial
    uart = Uart16550(machine.interrupt_line(COM1_IRQ), backend, name="serial0")
    machine.add_pio_device(COM1_PORT, 8, uart)
    debug_exit = None
    if debug_exit_port is not None:
        debug_exit = DebugExit(machine)
        machine.add_pio_device(debug_exit_port, 1, debug_exit)
    port80 = Port80()
    machine.add_pio_device(POST_PORT, 1, port80)
    i8042 = I8042(machine, machine.interrupt_line(I8042_KEYBOARD_IRQ), machine.interrupt_line(I8042_AUX_IRQ))
    machine.add_pio_device(I8042_PORT, 5, i8042)
    high = sum(size for base, size in machine.memory.ranges() if base >= HIGH_RAM_START)
    cmos = Cmos(machine.memory.low_size, high, cpu_count=machine.cpu_count)
    machine.add_pio_device(CMOS_PORT, 2, cmos)
    acpi_pm = AcpiPm(machine)
    machine.add_pio_device(ACPI_PM_BASE, ACPI_PM_LENGTH, acpi_pm)
    return PlatformDevices(uart, debug_exit, port80, i8042, cmos, acpi_pm)
