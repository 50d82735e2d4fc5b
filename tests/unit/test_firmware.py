"""Firmware contributions: devices and attachments describe themselves; ACPI stays byte-identical."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from vmscope.arch.x86 import acpi
from vmscope.devices.base import NullInterruptLine, RecordingMachineControl
from vmscope.devices.cmos import Cmos
from vmscope.devices.i8042 import I8042
from vmscope.devices.serial import Uart16550
from vmscope.firmware import FirmwareContribution, FirmwareContributions, FirmwareContributor
from vmscope.memory.guest_memory import GuestMemory
from vmscope.pci.bus import PciBus, pci_host_bridge_aml
from vmscope.virtio.pci_attach import PciPlatform

MMIO = [(0xD000_0000, 0x200, 5), (0xD000_0200, 0x200, 6)]


class MmioWindow:
    """Stands for a virtio-mmio attachment: one window, one command-line word."""

    def __init__(self, base: int, size: int, gsi: int) -> None:
        self.entry = (base, size, gsi)

    def firmware_contribution(self) -> FirmwareContribution:
        base, size, gsi = self.entry
        return FirmwareContribution(
            virtio_mmio=(self.entry,), cmdline=(f"virtio_mmio.device={size:#x}@{base:#x}:{gsi}",)
        )


def full_machine() -> tuple[FirmwareContributions, PciBus]:
    contributions = FirmwareContributions()
    bus = PciBus()
    for contributor in (
        Cmos(64 << 20),
        I8042(RecordingMachineControl()),
        MmioWindow(*MMIO[0]),
        PciPlatform(bus),
        MmioWindow(*MMIO[1]),
    ):
        contributions.add(contributor)
    return contributions, bus


def test_contributions_merge_in_order_and_each_contributor_counts_once() -> None:
    contributions, bus = full_machine()
    window = MmioWindow(0xD000_0400, 0x200, 7)
    contributions.add(window)
    contributions.add(window)
    merged = contributions.collect()
    assert merged.virtio_mmio == (*MMIO, window.entry)
    assert merged.cmdline == (
        "virtio_mmio.device=0x200@0xd0000000:5",
        "virtio_mmio.device=0x200@0xd0000200:6",
        "virtio_mmio.device=0x200@0xd0000400:7",
    )
    assert merged.boot_flags == {"cmos_rtc", "i8042"}
    assert merged.dsdt_aml == pci_host_bridge_aml(window_base=bus.window_base, window_size=bus.window_size)


def test_only_devices_the_guest_must_be_told_about_contribute() -> None:
    assert isinstance(Cmos(1 << 20), FirmwareContributor)
    assert isinstance(I8042(RecordingMachineControl()), FirmwareContributor)
    assert not isinstance(Uart16550(NullInterruptLine()), FirmwareContributor)
    assert FirmwareContributions().collect() == FirmwareContribution()


def test_acpi_from_contributions_is_byte_identical_to_the_direct_build() -> None:
    contributions, bus = full_machine()
    merged = contributions.collect()
    from_contributions, direct = GuestMemory.for_size(2 << 20), GuestMemory.for_size(2 << 20)
    acpi.build_acpi_tables(
        from_contributions,
        2,
        virtio_mmio_devices=merged.virtio_mmio,
        cmos_rtc="cmos_rtc" in merged.boot_flags,
        i8042="i8042" in merged.boot_flags,
        extra_dsdt_aml=merged.dsdt_aml,
    )
    acpi.build_acpi_tables(
        direct,
        2,
        virtio_mmio_devices=MMIO,
        cmos_rtc=True,
        i8042=True,
        extra_dsdt_aml=pci_host_bridge_aml(window_base=bus.window_base, window_size=bus.window_size),
    )
    area = (acpi.ACPI_AREA_START, acpi.ACPI_AREA_END - acpi.ACPI_AREA_START)
    assert from_contributions.read(*area) == direct.read(*area)


IASL = shutil.which("iasl")


@pytest.mark.skipif(IASL is None, reason="iasl not installed (apt-get install acpica-tools)")
def test_iasl_compiles_the_dsdt_built_from_contributions(tmp_path: Path) -> None:
    assert IASL is not None
    memory = GuestMemory.for_size(2 << 20)
    merged = full_machine()[0].collect()
    acpi.build_acpi_tables(memory, 1, virtio_mmio_devices=merged.virtio_mmio, extra_dsdt_aml=merged.dsdt_aml)
    (tmp_path / "dsdt.dat").write_bytes(acpi.parse_acpi_tables(memory).tables["DSDT"].data)
    for command in ([IASL, "-d", "dsdt.dat"], [IASL, "dsdt.dsl"]):
        result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, check=False)
        assert result.returncode == 0, result.stdout + result.stderr
    dsl = (tmp_path / "dsdt.dsl").read_text()
    assert dsl.count('"LNRO0005"') == 2 and "PCI0" in dsl
