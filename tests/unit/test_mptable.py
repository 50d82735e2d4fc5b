"""Intel MP table: placement, checksums and entries parsed back from guest memory."""

from __future__ import annotations

import struct

import pytest

from vmscope.arch.x86 import acpi, mptable
from vmscope.errors import ConfigError
from vmscope.memory.guest_memory import GuestMemory


@pytest.fixture
def memory() -> GuestMemory:
    return GuestMemory.for_size(2 << 20)


def test_floating_pointer_is_found_by_scanning_the_bios_area(memory: GuestMemory) -> None:
    table = mptable.build_mptable(memory, 2)
    parsed = mptable.parse_mptable(memory)
    assert parsed.floating_pointer_address == table.floating_pointer_address
    assert 0xF0000 <= parsed.floating_pointer_address < 0x100000
    assert parsed.floating_pointer_address % 16 == 0
    assert parsed.floating_pointer_checksum_ok
    assert parsed.spec_revision == 4
    assert parsed.feature_bytes == bytes(5)  # configuration table present, virtual-wire mode
    assert parsed.config_table_address == table.config_table_address


def test_configuration_table_header(memory: GuestMemory) -> None:
    table = mptable.build_mptable(memory, 4)
    parsed = mptable.parse_mptable(memory)
    assert parsed.config_checksum_ok
    assert parsed.local_apic_address == 0xFEE0_0000
    assert parsed.base_table_length == table.size - mptable.FLOATING_POINTER_SIZE
    assert memory.read(parsed.config_table_address, 4) == b"PCMP"
    count = struct.unpack_from("<H", memory.read(parsed.config_table_address + 34, 2))[0]
    assert count == len(parsed.entries)


@pytest.mark.parametrize("cpus", [1, 3, 16])
def test_one_processor_entry_per_cpu_with_bsp_on_cpu0(memory: GuestMemory, cpus: int) -> None:
    mptable.build_mptable(memory, cpus)
    processors = mptable.parse_mptable(memory).processors()
    assert [apic_id for apic_id, _, _ in processors] == list(range(cpus))
    for apic_id, version, flags in processors:
        assert flags & mptable.CPU_ENABLED
        assert bool(flags & mptable.CPU_BOOTSTRAP) == (apic_id == 0)
        assert version == mptable.LOCAL_APIC_VERSION


def test_bus_and_io_apic_entries(memory: GuestMemory) -> None:
    mptable.build_mptable(memory, 2)
    parsed = mptable.parse_mptable(memory)
    assert parsed.buses() == [(0, "ISA")]
    ((ioapic_id, _, flags, address),) = parsed.io_apics()
    assert ioapic_id == 2  # after the CPUs' APIC ids
    assert flags & mptable.IO_APIC_ENABLED
    assert address == 0xFEC0_0000


def test_isa_irqs_route_to_io_apic_pins_with_irq0_on_pin2(memory: GuestMemory) -> None:
    mptable.build_mptable(memory, 1)
    parsed = mptable.parse_mptable(memory)
    routes = {irq: (kind, bus, dest, pin) for kind, _, bus, irq, dest, pin in parsed.interrupts(3)}
    assert set(routes) == set(range(16)) - {2}  # IRQ2 is the PIC cascade
    assert routes[0] == (mptable.INT_TYPE_INT, 0, 1, 2)
    for irq in set(routes) - {0}:
        assert routes[irq] == (mptable.INT_TYPE_INT, 0, 1, irq)
    pins = [pin for _, _, _, pin in routes.values()]
    assert len(pins) == len(set(pins))  # no pin is claimed twice


def test_local_interrupts_extint_on_lint0_and_nmi_on_lint1(memory: GuestMemory) -> None:
    mptable.build_mptable(memory, 2)
    local = mptable.parse_mptable(memory).interrupts(4)
    assert sorted((kind, dest, lint) for kind, _, _, _, dest, lint in local) == [
        (mptable.INT_TYPE_NMI, 0xFF, 1),
        (mptable.INT_TYPE_EXTINT, 0xFF, 0),
    ]


def test_mp_table_and_acpi_tables_coexist(memory: GuestMemory) -> None:
    tables = acpi.build_acpi_tables(memory, 8)
    mp = mptable.build_mptable(memory, 8)
    (acpi_range,) = tables.reserved_ranges
    assert acpi_range.end <= mp.floating_pointer_address
    assert acpi.parse_acpi_tables(memory).madt().local_apics()
    assert mptable.parse_mptable(memory).config_checksum_ok


def test_corruption_is_detected(memory: GuestMemory) -> None:
    table = mptable.build_mptable(memory, 2)
    address = table.config_table_address + mptable.CONFIG_HEADER_SIZE + 1
    memory.write_u8(address, memory.read_u8(address) ^ 0x40)
    assert not mptable.parse_mptable(memory).config_checksum_ok
    memory.write_u8(table.floating_pointer_address + 4, 0x99)
    with pytest.raises(mptable.MpTableParseError, match="no MP floating pointer"):
        mptable.parse_mptable(memory)  # a bad checksum hides it from the scan


def test_invalid_cpu_counts_and_addresses_are_refused(memory: GuestMemory) -> None:
    with pytest.raises(ConfigError, match="not 0"):
        mptable.build_mptable(memory, 0)
    with pytest.raises(ConfigError, match="not 255"):
        mptable.build_mptable(memory, 255)
    with pytest.raises(ConfigError, match="not 16-byte aligned"):
        mptable.build_mptable(memory, 1, address=0xF0008)
    table = mptable.build_mptable(memory, 254)
    assert table.floating_pointer_address + table.size <= 0x100000
    assert len(mptable.parse_mptable(memory).processors()) == 254
