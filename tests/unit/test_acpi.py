"""ACPI tables: checksums, structure parsed back from guest memory, DSDT AML decoded."""

from __future__ import annotations

import itertools
import shutil
import struct
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from vmscope.arch.x86 import acpi
from vmscope.errors import ConfigError
from vmscope.memory.guest_memory import GuestMemory

DEVICES = [acpi.VirtioMmioDevice(0xD000_0000, 0x1000, 5), acpi.VirtioMmioDevice(0xD000_1000, 0x200, 6)]


@pytest.fixture
def memory() -> GuestMemory:
    return GuestMemory.for_size(2 << 20)


def build(
    memory: GuestMemory, cpus: int = 4, devices: list[acpi.VirtioMmioDevice] = DEVICES
) -> acpi.ParsedAcpi:
    tables = acpi.build_acpi_tables(memory, cpus, virtio_mmio_devices=devices)
    parsed = acpi.parse_acpi_tables(memory)  # found by scanning, as Linux does
    assert parsed.rsdp_address == tables.rsdp_address
    return parsed


# -- a small AML decoder, independent of the encoder ----------------------------------------


@dataclass
class Node:
    kind: str  # "Name", "Scope", "Device"
    name: str
    value: object = None
    children: list[Node] | None = None


class AmlReader:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def byte(self) -> int:
        value = self.data[self.pos]
        self.pos += 1
        return value

    def pkg_length(self) -> int:
        """Returns the end offset of the package."""
        start = self.pos
        lead = self.byte()
        count = lead >> 6
        if count == 0:
            return start + (lead & 0x3F)
        length = lead & 0x0F
        for index in range(count):
            length |= self.byte() << (4 + 8 * index)
        return start + length

    def name_seg(self) -> str:
        seg = self.data[self.pos : self.pos + 4].decode("ascii")
        self.pos += 4
        return seg.rstrip("_") or "_"

    def name_string(self) -> str:
        prefix = ""
        while self.data[self.pos] in (0x5C, 0x5E):
            prefix += chr(self.byte())
        first = self.data[self.pos]
        if first == 0x00:
            self.pos += 1
            return prefix
        if first == 0x2E:
            self.pos += 1
            return prefix + self.name_seg() + "." + self.name_seg()
        if first == 0x2F:
            self.pos += 1
            count = self.byte()
            return prefix + ".".join(self.name_seg() for _ in range(count))
        return prefix + self.name_seg()

    def data_object(self) -> object:
        op = self.byte()
        if op == 0x00:
            return 0
        if op == 0x01:
            return 1
        if op == 0xFF:
            return (1 << 64) - 1
        if op in (0x0A, 0x0B, 0x0C, 0x0E):
            size = {0x0A: 1, 0x0B: 2, 0x0C: 4, 0x0E: 8}[op]
            value = int.from_bytes(self.data[self.pos : self.pos + size], "little")
            self.pos += size
            return value
        if op == 0x0D:
            end = self.data.index(b"\0", self.pos)
            text = self.data[self.pos : end].decode("ascii")
            self.pos = end + 1
            return text
        if op == 0x12:
            end = self.pkg_length()
            count = self.byte()
            elements = [self.data_object() for _ in range(count)]
            assert self.pos == end, "package length disagrees with its elements"
            return ("Package", elements)
        if op == 0x11:
            end = self.pkg_length()
            buffer_size = self.data_object()
            assert isinstance(buffer_size, int)
            content = self.data[self.pos : end]
            assert len(content) == buffer_size, "buffer size disagrees with its package length"
            self.pos = end
            return ("Buffer", content)
        raise AssertionError(f"unexpected AML opcode {op:#x} at {self.pos - 1}")

    def term_list(self, end: int) -> list[Node]:
        nodes = []
        while self.pos < end:
            op = self.byte()
            if op == 0x08:
                name = self.name_string()
                nodes.append(Node("Name", name, self.data_object()))
            elif op == 0x10:
                block_end = self.pkg_length()
                name = self.name_string()
                nodes.append(Node("Scope", name, children=self.term_list(block_end)))
            elif op == 0x5B and self.data[self.pos] == 0x82:
                self.pos += 1
                block_end = self.pkg_length()
                name = self.name_string()
                nodes.append(Node("Device", name, children=self.term_list(block_end)))
            else:
                raise AssertionError(f"unexpected AML term opcode {op:#x}")
        assert self.pos == end
        return nodes


def decode_resources(buffer: bytes) -> list[tuple[str, tuple[int, ...]]]:
    resources: list[tuple[str, tuple[int, ...]]] = []
    pos = 0
    while True:
        tag = buffer[pos]
        if tag == 0x79:  # small item: end tag
            assert pos + 2 == len(buffer), "end tag must close the template"
            return resources
        assert tag & 0x80, f"unexpected small resource item {tag:#x}"
        length = struct.unpack_from("<H", buffer, pos + 1)[0]
        body = buffer[pos + 3 : pos + 3 + length]
        if tag == 0x86:
            resources.append(("Memory32Fixed", struct.unpack("<BII", body)))
        elif tag == 0x89:
            flags, count = body[0], body[1]
            resources.append(("Interrupt", (flags, *struct.unpack_from(f"<{count}I", body, 2))))
        else:
            raise AssertionError(f"unexpected large resource item {tag:#x}")
        pos += 3 + length


def decode_dsdt(table: acpi.AcpiTable) -> list[Node]:
    reader = AmlReader(table.data)
    reader.pos = acpi.TABLE_HEADER_SIZE
    return reader.term_list(len(table.data))


# -- tests ------------------------------------------------------------------------------------


def test_rsdp_is_v2_in_the_bios_area_with_both_checksums(memory: GuestMemory) -> None:
    parsed = build(memory)
    assert 0xE0000 <= parsed.rsdp_address < 0x100000
    assert parsed.rsdp_address % 16 == 0
    assert parsed.rsdp_revision == 2
    assert parsed.rsdp_checksum_ok
    assert parsed.rsdp_extended_checksum_ok
    raw = memory.read(parsed.rsdp_address, 36)
    assert raw[:8] == b"RSD PTR "
    assert struct.unpack_from("<I", raw, 20)[0] == 36


def test_every_table_is_checksummed_and_where_the_pointers_say(memory: GuestMemory) -> None:
    tables = acpi.build_acpi_tables(memory, 2, virtio_mmio_devices=DEVICES)
    parsed = acpi.parse_acpi_tables(memory, tables.rsdp_address)
    assert set(parsed.tables) == {"XSDT", "RSDT", "FACP", "APIC", "DSDT", "FACS"}
    for signature, table in parsed.tables.items():
        assert table.checksum_ok, signature
        assert table.address == tables.addresses[signature]
        assert table.signature == signature
        assert table.address % 16 == 0
    assert parsed.tables["FACS"].address % 64 == 0
    xsdt_entries = struct.unpack_from("<2Q", parsed.tables["XSDT"].data, 36)
    rsdt_entries = struct.unpack_from("<2I", parsed.tables["RSDT"].data, 36)
    assert xsdt_entries == rsdt_entries == (tables.addresses["FACP"], tables.addresses["APIC"])


def test_tables_do_not_overlap_and_lie_in_the_reserved_range(memory: GuestMemory) -> None:
    tables = acpi.build_acpi_tables(memory, 8, virtio_mmio_devices=DEVICES)
    parsed = acpi.parse_acpi_tables(memory)
    spans = sorted([(parsed.rsdp_address, parsed.rsdp_address + 36)] + [
        (t.address, t.address + t.length) for t in parsed.tables.values()
    ])  # fmt: skip
    for (_, end), (start, _) in itertools.pairwise(spans):
        assert end <= start
    (reserved,) = tables.reserved_ranges
    assert reserved.address <= spans[0][0] and spans[-1][1] <= reserved.end
    assert spans[-1][1] <= acpi.ACPI_AREA_END  # clear of the MP table's 0xF0000


def test_a_corrupted_byte_fails_the_checksum(memory: GuestMemory) -> None:
    tables = acpi.build_acpi_tables(memory, 1)
    address = tables.addresses["APIC"] + 40
    memory.write_u8(address, memory.read_u8(address) ^ 0x01)
    assert not acpi.parse_acpi_tables(memory).tables["APIC"].checksum_ok


def test_madt_entries(memory: GuestMemory) -> None:
    cpus = 3
    madt = build(memory, cpus).madt()
    assert madt.local_apic_address == 0xFEE0_0000
    assert madt.flags & acpi.MADT_PCAT_COMPAT
    assert madt.local_apics() == [(cpu, cpu, acpi.MADT_LAPIC_ENABLED) for cpu in range(cpus)]
    assert madt.io_apics() == [(cpus, 0xFEC0_0000, 0)]
    overrides = madt.overrides()
    assert (0, 0, 2, 0) in overrides  # ISA IRQ0 -> GSI 2, conforming
    (sci,) = [o for o in overrides if o[1] == 9]
    assert sci[2] == 9
    assert sci[3] & 0b11 == 0b01  # active high
    assert (sci[3] >> 2) & 0b11 == 0b11  # level triggered
    (nmi,) = madt.of_type(acpi.MADT_LOCAL_APIC_NMI)
    assert nmi.data[0] == 0xFF and nmi.data[3] == 1  # all processors, LINT1
    assert build(GuestMemory.for_size(2 << 20), 1).tables["APIC"].revision == acpi.MADT_REVISION


def test_fadt_describes_the_pm1a_ports_sci_and_dsdt(memory: GuestMemory) -> None:
    parsed = build(memory)
    fadt = parsed.tables["FACP"]
    assert fadt.revision == 6 and fadt.length == 276
    dsdt_address = parsed.tables["DSDT"].address
    assert parsed.fadt_field("<Q", acpi.FADT_X_DSDT) == dsdt_address
    assert parsed.fadt_field("<I", acpi.FADT_DSDT) == dsdt_address
    assert parsed.fadt_field("<I", acpi.FADT_FIRMWARE_CTRL) == parsed.tables["FACS"].address
    assert parsed.fadt_field("<Q", acpi.FADT_X_FIRMWARE_CTRL) == 0  # one FACS pointer, not two
    assert parsed.fadt_field("<H", acpi.FADT_SCI_INT) == 9
    assert parsed.fadt_field("<I", acpi.FADT_SMI_CMD) == 0
    assert parsed.fadt_field("<I", acpi.FADT_PM1A_EVT_BLK) == 0x600
    assert parsed.fadt_field("<B", acpi.FADT_PM1_EVT_LEN) == 4
    assert parsed.fadt_field("<I", acpi.FADT_PM1A_CNT_BLK) == 0x604
    assert parsed.fadt_field("<B", acpi.FADT_PM1_CNT_LEN) == 2
    assert parsed.fadt_field("<I", acpi.FADT_PM_TMR_BLK) == 0x608
    assert not parsed.fadt_field("<I", acpi.FADT_FLAGS) & acpi.FADT_HW_REDUCED_ACPI
    # the 64-bit GAS form of PM1a_CNT: system I/O, 16 bits, at 0x604
    space, width, _, _, address = struct.unpack_from("<BBBBQ", fadt.data, acpi.FADT_X_PM1A_CNT_BLK)
    assert (space, width, address) == (acpi.GAS_SYSTEM_IO, 16, 0x604)
    facs = parsed.tables["FACS"]
    assert facs.data[:4] == b"FACS" and facs.length == 64


def test_fadt_boot_flags_follow_the_platform(memory: GuestMemory) -> None:
    acpi.build_acpi_tables(memory, 1)
    flags = acpi.parse_acpi_tables(memory).fadt_field("<H", acpi.FADT_IAPC_BOOT_ARCH)
    assert flags & acpi.IAPC_CMOS_RTC_NOT_PRESENT and not flags & acpi.IAPC_8042
    acpi.build_acpi_tables(memory, 1, cmos_rtc=True, i8042=True)
    flags = acpi.parse_acpi_tables(memory).fadt_field("<H", acpi.FADT_IAPC_BOOT_ARCH)
    assert not flags & acpi.IAPC_CMOS_RTC_NOT_PRESENT and flags & acpi.IAPC_8042


def test_dsdt_aml_has_s5_and_one_device_per_virtio_mmio_transport(memory: GuestMemory) -> None:
    nodes = decode_dsdt(build(memory).tables["DSDT"])
    s5 = nodes[0]
    assert (s5.kind, s5.name) == ("Name", "\\_S5")
    assert s5.value == ("Package", [5, 5, 0, 0])
    (scope,) = [n for n in nodes if n.kind == "Scope"]
    assert scope.name == "\\_SB"
    assert scope.children is not None
    assert [d.name for d in scope.children] == ["VR00", "VR01"]
    for index, (device, expected) in enumerate(zip(scope.children, DEVICES, strict=True)):
        assert device.kind == "Device" and device.children is not None
        names = {n.name: n.value for n in device.children}
        assert names["_HID"] == "LNRO0005"
        assert names["_UID"] == index
        crs = names["_CRS"]
        assert isinstance(crs, tuple) and crs[0] == "Buffer"
        buffer = crs[1]
        assert isinstance(buffer, bytes)
        assert decode_resources(buffer) == [
            ("Memory32Fixed", (1, expected.base, expected.size)),
            ("Interrupt", (acpi.INTERRUPT_CONSUMER, expected.irq)),  # level, active-high, exclusive
        ]


def test_dsdt_without_devices_has_only_s5(memory: GuestMemory) -> None:
    nodes = decode_dsdt(build(memory, devices=[]).tables["DSDT"])
    assert [(n.kind, n.name) for n in nodes] == [("Name", "\\_S5")]


def test_many_devices_need_multi_byte_package_lengths(memory: GuestMemory) -> None:
    devices = [acpi.VirtioMmioDevice(0xD000_0000 + i * 0x1000, 0x1000, 5 + i % 16) for i in range(40)]
    nodes = decode_dsdt(build(memory, devices=devices).tables["DSDT"])
    (scope,) = [n for n in nodes if n.kind == "Scope"]
    assert scope.children is not None
    assert [d.name for d in scope.children] == [f"VR{i:02X}" for i in range(40)]


@pytest.mark.parametrize("body", [0, 62, 63, 0xFFD, 0xFFE, 0xFFFFD, 0xFFFFE, 0x1000_0000 - 5])
def test_pkg_length_encoding_boundaries(body: int) -> None:
    encoded = acpi.aml_pkg_length(body)
    reader = AmlReader(encoded + bytes(body))
    assert reader.pkg_length() == len(encoded) + body
    assert reader.pos == len(encoded)
    expected_size = 1 if body + 1 < 0x40 else 2 if body + 2 < 1 << 12 else 3 if body + 3 < 1 << 20 else 4
    assert len(encoded) == expected_size


def test_pkg_length_refuses_oversized_packages() -> None:
    with pytest.raises(ValueError, match="PkgLength"):
        acpi.aml_pkg_length(1 << 28)


def test_aml_integers_use_the_shortest_encoding() -> None:
    for value, expected in [(0, b"\x00"), (1, b"\x01"), (5, b"\x0a\x05"), (0x1234, b"\x0b\x34\x12")]:
        assert acpi.aml_integer(value) == expected
    for value in (0x12345678, 0x1_0000_0000):
        reader = AmlReader(acpi.aml_integer(value))
        assert reader.data_object() == value


def test_aml_name_strings() -> None:
    assert acpi.aml_name_string("_HID") == b"_HID"
    assert acpi.aml_name_string("\\_S5") == b"\\_S5_"
    assert acpi.aml_name_string("\\_SB.VR00") == b"\\\x2e_SB_VR00"
    assert AmlReader(acpi.aml_name_string("\\_SB.PCI0.VR01")).name_string() == "\\_SB.PCI0.VR01"
    with pytest.raises(ValueError, match="name segment"):
        acpi.aml_name_string("toolong")


def test_invalid_configurations_are_refused(memory: GuestMemory) -> None:
    with pytest.raises(ConfigError, match="1 to 254 vCPUs, not 0"):
        acpi.build_acpi_tables(memory, 0)
    with pytest.raises(ConfigError, match="not 255"):
        acpi.build_acpi_tables(memory, 255)
    with pytest.raises(ConfigError, match="not a 32-bit address range"):
        acpi.build_acpi_tables(memory, 1, virtio_mmio_devices=[(0xFFFF_F000, 0x2000, 5)])
    acpi.build_acpi_tables(memory, 254)
    assert len(acpi.parse_acpi_tables(memory).madt().local_apics()) == 254


IASL = shutil.which("iasl")


@pytest.mark.skipif(IASL is None, reason="iasl not installed (apt-get install acpica-tools)")
def test_iasl_disassembles_and_recompiles_the_tables(memory: GuestMemory, tmp_path: Path) -> None:
    assert IASL is not None
    parsed = build(memory)
    for signature in ("DSDT", "FACP", "APIC"):
        (tmp_path / f"{signature.lower()}.dat").write_bytes(parsed.tables[signature].data)
    for signature in ("dsdt", "facp", "apic"):
        result = subprocess.run(
            [IASL, "-d", f"{signature}.dat"], cwd=tmp_path, capture_output=True, text=True, check=False
        )
        assert result.returncode == 0, result.stdout + result.stderr
    dsl = (tmp_path / "dsdt.dsl").read_text()
    assert 'Name (_HID, "LNRO0005")' in dsl
    assert "0xD0001000" in dsl and "0x00000200" in dsl
    assert "Interrupt (ResourceConsumer, Level, ActiveHigh, Exclusive" in dsl
    assert "Name (\\_S5, Package (0x04)" in dsl
    compiled = subprocess.run([IASL, "dsdt.dsl"], cwd=tmp_path, capture_output=True, text=True, check=False)
    assert compiled.returncode == 0, compiled.stdout + compiled.stderr
    assert "0 Errors, 0 Warnings" in compiled.stdout
    facp = (tmp_path / "facp.dsl").read_text()
    assert "Hardware Reduced (V5) : 0" in facp
    assert "PM1A Control Block Address : 00000604" in facp
    apic = (tmp_path / "apic.dsl").read_text()
    assert apic.count("[Processor Local APIC]") == 4
    assert "Address : FEC00000" in apic
