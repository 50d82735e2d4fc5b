"""ACPI PM1a blocks and PM timer at the ports the generated FADT names."""

from __future__ import annotations

from vmscope.arch.x86 import acpi_registers
from vmscope.bus import PioBus
from vmscope.devices.acpi_pm import ACPI_PM_BASE, ACPI_PM_LENGTH, PM_TIMER_HZ, AcpiPm
from vmscope.devices.base import RecordingMachineControl


def make(clock: list[int]) -> tuple[PioBus, AcpiPm, RecordingMachineControl]:
    control = RecordingMachineControl()
    device = AcpiPm(control, clock_ns=lambda: clock[0])
    bus = PioBus()
    bus.register(ACPI_PM_BASE, ACPI_PM_LENGTH, device)
    return bus, device, control


def test_soft_off_write_powers_the_machine_off_with_status_0() -> None:
    bus, _, control = make([0])
    assert int.from_bytes(bus.read(acpi_registers.PM1A_CNT_PORT, 2), "little") & acpi_registers.PM1_CNT_SCI_EN
    bus.write(acpi_registers.PM1A_CNT_PORT, (5 << 10).to_bytes(2, "little"))  # SLP_TYP=5 without SLP_EN
    assert control.stops == []
    bus.write(acpi_registers.PM1A_CNT_PORT, ((5 << 10) | (1 << 13)).to_bytes(2, "little"))
    assert control.stops == [("guest powered off (ACPI S5)", 0)]


def test_other_sleep_types_do_not_power_off() -> None:
    bus, _, control = make([0])
    bus.write(acpi_registers.PM1A_CNT_PORT, ((3 << 10) | (1 << 13)).to_bytes(2, "little"))
    assert control.stops == []


def test_pm_timer_counts_at_3_579545_mhz_and_wraps_at_24_bits() -> None:
    clock = [1_000]
    bus, _, _ = make(clock)
    assert int.from_bytes(bus.read(acpi_registers.PM_TMR_PORT, 4), "little") == 0
    clock[0] += 1_000_000_000  # one second later
    assert int.from_bytes(bus.read(acpi_registers.PM_TMR_PORT, 4), "little") == PM_TIMER_HZ
    clock[0] += 10 * 1_000_000_000
    assert int.from_bytes(bus.read(acpi_registers.PM_TMR_PORT, 4), "little") == (11 * PM_TIMER_HZ) & 0xFF_FFFF


def test_status_is_write_one_to_clear_and_enable_is_stored() -> None:
    bus, device, _ = make([0])
    device.status = 0x0101
    bus.write(acpi_registers.PM1A_EVT_PORT, b"\x01\x00")
    assert bus.read(acpi_registers.PM1A_EVT_PORT, 2) == b"\x00\x01"
    bus.write(acpi_registers.PM1A_EVT_PORT + 2, b"\x20\x01")
    assert bus.read(acpi_registers.PM1A_EVT_PORT + 2, 2) == b"\x20\x01"
